"""One test per transformers internal that kvcomm._hf touches."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvcomm import _hf


def _kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 8, generator=generator), torch.randn(1, 2, tokens, 8, generator=generator)


def test_hidden_prefix_layer_reports_full_length():
    keys, values = _kv(1)
    layer = _hf.hidden_prefix_layer(10, keys, values)
    assert layer.keys.shape[-2] == 1
    assert layer.get_seq_length() == 10
    assert layer.get_mask_sizes(query_length=4) == (14, 0)
    new_keys, new_values = _kv(4, seed=1)
    full_keys, _ = layer.update(new_keys, new_values)
    assert full_keys.shape[-2] == 5 and layer.get_seq_length() == 14


def test_hidden_prefix_layer_without_sink_lazily_initialises():
    layer = _hf.hidden_prefix_layer(7)
    assert layer.get_seq_length() == 7 and layer.get_mask_sizes(3) == (10, 0)
    keys, values = _kv(3)
    out_keys, _ = layer.update(keys, values)
    assert torch.equal(out_keys, keys) and layer.get_seq_length() == 10


def test_full_layer_is_a_prefilled_dynamic_layer():
    keys, values = _kv(6)
    layer = _hf.full_layer(keys, values)
    assert isinstance(layer, DynamicLayer) and layer.get_seq_length() == 6
    assert layer.get_mask_sizes(2) == (8, 0)


def test_receiver_cache_is_a_dynamic_cache_reading_layer_zero():
    keys, values = _kv(5)
    cache = _hf.ReceiverCache([_hf.hidden_prefix_layer(5, keys[..., :1, :], values[..., :1, :]),
                               _hf.full_layer(keys, values)])
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == 5 and cache.get_mask_sizes(3, 0) == (8, 0)
    assert _hf.cache_num_layers(cache) == 2
    assert torch.equal(_hf.cache_layer_kv(cache, 1)[0], keys)


def test_registration_is_idempotent_and_registers_the_mask_builder():
    assert _hf.register_attention() == _hf.ATTENTION_NAME
    assert _hf.register_attention() == _hf.ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[_hf.ATTENTION_NAME] is _hf.kvcomm_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[_hf.ATTENTION_NAME] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def test_use_kvcomm_attention_sets_the_implementation(tiny):
    assert _hf.attention_implementation(tiny.model) == _hf.ATTENTION_NAME


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int = 0, groups: int = 2):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal, self.training = layer_idx, groups, True, False


def test_attention_keeps_last_mask_columns_when_keys_are_fewer():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 3, 8, generator=generator)
    keys, values = _kv(4)  # 1 sink + 3 receiver tokens
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool).tril(diagonal=7)  # 7 context columns, causal receiver
    out, _ = _hf.kvcomm_attention(_Module(), query, keys, values, mask, scaling=8**-0.5)
    expected, _ = _hf.kvcomm_attention(_Module(), query, keys, values, mask[..., -4:], scaling=8**-0.5)
    assert torch.allclose(out, expected)
    # first receiver row must not see later receiver tokens
    probs_mask = mask[..., -4:][0, 0]
    assert probs_mask[0].tolist() == [True, True, False, False]


def test_capture_records_sender_mass_with_causal_softmax():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 3, 8, generator=generator)
    keys, values = _kv(8)  # 5 context + 3 receiver
    mask = torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(diagonal=5)
    with _hf.capture_context_attention() as capture:
        out, _ = _hf.kvcomm_attention(_Module(layer_idx=3), query, keys, values, mask, scaling=0.5)
    full_keys = keys.repeat_interleave(2, 1)
    scores = (query @ full_keys.transpose(2, 3) * 0.5).masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    assert abs(capture.mass[3][0] - probs[..., 1:5].sum(-1).mean().item()) < 1e-6
    sdpa_out, _ = _hf.kvcomm_attention(_Module(layer_idx=3), query, keys, values, mask, scaling=0.5)
    assert torch.allclose(out, sdpa_out, atol=1e-5)


def test_model_output_exposes_cache(tiny):
    out = tiny.model(input_ids=torch.tensor([[0, 5, 6]]), use_cache=True)
    assert out.cache is not None and out.cache.get_seq_length() == 3


def test_layer_types_default_to_full_attention(tiny):
    assert _hf.layer_types(tiny.model.config) == ["full_attention"] * tiny.num_layers
