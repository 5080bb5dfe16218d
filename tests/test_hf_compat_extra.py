"""One test per transformers internal touched by the AC / KVComm-S additions to kvcomm._hf."""

from __future__ import annotations

import pytest
import torch

from kvcomm import _hf
from kvcomm.errors import KVCommError
from kvcomm.generation import generate

IDS = torch.tensor([[0, 40, 41, 42, 43, 44, 45]])


def test_decoder_layers_are_the_model_layers_in_order(tiny):
    layers = _hf.decoder_layers(tiny.model)
    assert len(layers) == tiny.num_layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(tiny.num_layers))


def test_hidden_states_index_zero_is_embeddings_and_k_is_the_input_of_layer_k(tiny):
    with torch.no_grad():
        embeddings = tiny.model.get_input_embeddings()(IDS)
    assert torch.equal(_hf.hidden_states_at(tiny.model, IDS, 0), embeddings)
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, args[0].clone()),
                                               with_kwargs=True)
               for i, layer in enumerate(_hf.decoder_layers(tiny.model))]
    try:
        states = [_hf.hidden_states_at(tiny.model, IDS, k) for k in range(tiny.num_layers)]
    finally:
        for handle in handles:
            handle.remove()
    for k, state in enumerate(states):
        assert state.shape == (1, IDS.shape[-1], 64)
        assert torch.equal(state, seen[k])
    with pytest.raises(KVCommError):
        _hf.hidden_states_at(tiny.model, IDS, tiny.num_layers)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.model(input_ids=ids).logits


def _no_pre_hooks(model) -> bool:
    return all(not layer._forward_pre_hooks for layer in _hf.decoder_layers(model.model))


def test_last_token_injection_changes_only_the_last_position_and_is_removed(tiny):
    plain = _logits(tiny)
    with _hf.last_token_injection(tiny.model, 2, lambda b: b):
        identity = _logits(tiny)
    assert torch.equal(identity, plain)
    with _hf.last_token_injection(tiny.model, 2, lambda b: b + 3.0):
        changed = _logits(tiny)
    assert torch.allclose(changed[:, :-1], plain[:, :-1], atol=1e-6)  # causal: earlier rows never see the last one
    assert (changed[:, -1] - plain[:, -1]).abs().max().item() > 1e-3
    assert _no_pre_hooks(tiny) and torch.equal(_logits(tiny), plain)


def test_last_token_injection_runs_on_prefill_only_and_is_removed_on_error(tiny):
    calls: list[tuple[int, ...]] = []

    def spy(b: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(b.shape))
        return b

    with _hf.last_token_injection(tiny.model, 1, spy):
        tokens = generate(tiny, IDS, 5)
    assert calls == [(1, 64)] and tokens == generate(tiny, IDS, 5)
    with pytest.raises(RuntimeError, match="boom"), _hf.last_token_injection(tiny.model, 1, spy):
        raise RuntimeError("boom")
    assert _no_pre_hooks(tiny)
    with pytest.raises(KVCommError), _hf.last_token_injection(tiny.model, tiny.num_layers, spy):
        pass


def test_rotary_cos_sin_is_the_models_rotary_module_without_scaling(tiny):
    positions = torch.tensor([0, 1, 7, 100])
    cos, sin = _hf.rotary_cos_sin(tiny.model, positions)
    rotary = tiny.model.get_decoder().rotary_emb
    expected_cos, expected_sin = rotary(torch.zeros(1), positions.view(1, -1))
    assert cos.shape == (4, 16) and cos.dtype == torch.float32
    assert torch.allclose(cos, expected_cos[0] / rotary.attention_scaling)
    assert torch.allclose(sin, expected_sin[0] / rotary.attention_scaling)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-6)
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))
