"""AC (activation communication): numeric checks of the graft on a tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvcomm import _hf
from kvcomm.errors import IncompatibleModelsError, KVCommError, LayerSelectionError
from kvcomm.methods.ac import AC, ACError, ACPacket, HiddenSizeMismatchError, default_layer
from kvcomm.methods.baseline import Baseline
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example

EXAMPLE = Example.qa(context="Bob lives in Ollerby. Alice's code is 4821.", question="What is Alice's code?",
                     answers=["4821"], max_new_tokens=12, answer_prefix="Alice's code is")


def _query(model):
    return chat_ids(model.tokenizer, EXAMPLE.messages["receiver"], EXAMPLE.answer_prefix)


def _logits(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids).logits


def _no_pre_hooks(model) -> bool:
    return all(not layer._forward_pre_hooks for layer in _hf.decoder_layers(model.model))


def test_default_layers_are_valid_for_any_depth(tiny):
    assert [default_layer(n) for n in (1, 2, 4, 28, 32)] == [0, 1, 3, 22, 26]
    method = AC(tiny, tiny)
    assert method.layer_k == method.layer_j == 3


def test_sender_vector_is_the_last_token_input_of_sender_layer_k(tiny):
    packet, _ = AC(tiny, tiny, layer_k=2).send(EXAMPLE)
    sender_ids = chat_ids(tiny.tokenizer, EXAMPLE.messages["sender"])
    with torch.no_grad():
        states = tiny.model(input_ids=sender_ids, output_hidden_states=True).hidden_states
    assert packet.vector.shape == (1, 64) and torch.equal(packet.vector, states[2][:, -1])
    assert packet.sender_prompt_tokens == sender_ids.shape[-1] and packet.nbytes == 64 * 4


@pytest.mark.parametrize("layer_j", [0, 2, 3])
def test_sum_with_a_zero_sender_vector_is_the_receiver_alone(tiny, layer_j):
    method = AC(tiny, tiny, layer_j=layer_j, combine="sum")
    zero = ACPacket(torch.zeros(1, 64), sender_prompt_tokens=5)
    query = _query(tiny)
    with method.injected(zero):
        grafted = _logits(tiny, query)
    assert torch.equal(grafted, _logits(tiny, query))
    assert EXAMPLE.messages["baseline"] == EXAMPLE.messages["receiver"]  # Baseline reads the same prompt
    baseline = Baseline(tiny).answer(EXAMPLE)
    output = method.receive(zero, EXAMPLE)
    assert output.answer == baseline.answer
    assert output.costs.receiver_prefill_tokens == baseline.costs.receiver_prefill_tokens
    assert output.costs.generated_tokens == baseline.costs.generated_tokens


def test_replace_with_the_receivers_own_vector_is_a_no_op_and_replace_with_the_senders_changes_logits(tiny):
    query = _query(tiny)
    plain = _logits(tiny, query)
    own = ACPacket(_hf.hidden_states_at(tiny.model, query, 2)[:, -1].clone(), sender_prompt_tokens=1)
    for combine in ("replace", "mean"):
        with AC(tiny, tiny, layer_j=2, combine=combine).injected(own):
            assert (_logits(tiny, query) - plain).abs().max().item() < 1e-5
    method = AC(tiny, tiny, layer_k=2, layer_j=2, combine="replace")
    packet, _ = method.send(EXAMPLE)
    with method.injected(packet):
        grafted = _logits(tiny, query)
    assert torch.allclose(grafted[:, :-1], plain[:, :-1], atol=1e-6)  # only the last position is grafted
    assert (grafted[:, -1] - plain[:, -1]).abs().max().item() > 1e-3
    output = method.answer(EXAMPLE)
    assert output.costs.kv_bytes == 256 and output.costs.sender_prefill_tokens == packet.sender_prompt_tokens
    assert _no_pre_hooks(tiny)


def test_mean_is_half_of_sum(tiny):
    query = _query(tiny)
    b = _hf.hidden_states_at(tiny.model, query, 1)[:, -1]
    a = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    with AC(tiny, tiny, layer_j=1, combine="mean").injected(ACPacket(a, 1)):
        mean = _logits(tiny, query)
    with AC(tiny, tiny, layer_j=1, combine="replace").injected(ACPacket((a + b) / 2, 1)):
        replaced = _logits(tiny, query)
    assert (mean - replaced).abs().max().item() < 1e-5


def test_hook_is_removed_after_the_call_even_on_error(tiny, monkeypatch):
    method = AC(tiny, tiny, combine="sum")
    packet, _ = method.send(EXAMPLE)
    method.receive(packet, EXAMPLE)
    assert _no_pre_hooks(tiny)

    def broken(*args, **kwargs):
        assert not _no_pre_hooks(tiny)  # the hook is in place during generation
        raise RuntimeError("generation failed")

    monkeypatch.setattr("kvcomm.methods.ac.generate", broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        method.receive(packet, EXAMPLE)
    assert _no_pre_hooks(tiny)


def test_invalid_settings_raise(tiny):
    with pytest.raises(ACError, match="combine"):
        AC(tiny, tiny, combine="concat")
    for bad in ({"layer_k": -1}, {"layer_j": 4}, {"layer_k": 1.5}, {"layer_j": True}):
        with pytest.raises(LayerSelectionError):
            AC(tiny, tiny, **bad)


def test_different_hidden_sizes_need_a_mapping(tiny):
    narrow = dataclasses.replace(tiny, name="narrow",
                                 fingerprint=dataclasses.replace(tiny.fingerprint, hidden_size=32))
    with pytest.raises(HiddenSizeMismatchError, match="hidden sizes") as error:
        AC(tiny, narrow)
    assert isinstance(error.value, IncompatibleModelsError) and isinstance(error.value, KVCommError)
    method = AC(narrow, tiny, mapping=lambda a: torch.cat([a, a], dim=-1))
    assert method.receiver_vector(ACPacket(torch.ones(1, 32), 1)).shape == (1, 64)
    wrong = AC(narrow, tiny, mapping=lambda a: a)
    with pytest.raises(ACError, match="shape"):
        wrong.receiver_vector(ACPacket(torch.ones(1, 32), 1))
