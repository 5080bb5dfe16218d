"""KVComm-S: RoPE re-rotation of keys, and the sink re-rotation against an explicit shift-back reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvcomm import _hf
from kvcomm.message import encode_context
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.kvcomm_s import KVCommS, shift_sinks
from kvcomm.rope import rerotate_keys
from tests.conftest import FACTS_EXAMPLE, context_and_query, receiver_logits, tiny_llama

EXAMPLE = FACTS_EXAMPLE
_ids = context_and_query
_receiver_logits = receiver_logits


def _key_at(model, hidden: torch.Tensor, position: int) -> torch.Tensor:
    """The model's own key ``[1, kv_heads, n, head_dim]`` for ``hidden`` ``[1, n, 64]`` at positions from ``position``."""
    attention = model.model.model.layers[1].self_attn
    raw = attention.k_proj(hidden).view(1, hidden.shape[1], -1, attention.head_dim).transpose(1, 2)
    positions = torch.arange(position, position + hidden.shape[1]).view(1, -1)
    cos, sin = model.model.model.rotary_emb(hidden, positions)
    _, key = apply_rotary_pos_emb(raw, raw, cos, sin)
    return key


@pytest.mark.parametrize(("start", "target"), [(0, 1), (0, 57), (0, 300), (40, 3)])
def test_rerotating_a_key_equals_the_key_computed_at_the_target_position(tiny, start, target):
    hidden = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(start + target))
    with torch.no_grad():
        at_start, at_target = _key_at(tiny, hidden, start), _key_at(tiny, hidden, target)
        moved = rerotate_keys(tiny, at_start, target - start)
    assert (at_start - at_target).abs().max().item() > 1e-3  # the positions really differ
    assert (moved - at_target).abs().max().item() < 1e-5
    assert rerotate_keys(tiny, at_start, 0) is at_start


def test_kvcomm_s_with_every_layer_equals_kvcomm(tiny):
    layers = range(tiny.num_layers)
    shifted = KVCommS(tiny, tiny, layers, shift_back=True)
    plain = KVComm(tiny, tiny, layers)
    message, _ = shifted.send(EXAMPLE)
    assert shift_sinks(message, tiny) is message  # no sink to move
    assert shifted.answer(EXAMPLE).answer == plain.answer(EXAMPLE).answer


def test_shift_back_off_is_kvcomm_and_on_differs_and_leaves_the_message_alone(tiny):
    layers = (0, 2)
    assert KVCommS(tiny, tiny, layers).answer(EXAMPLE).answer == KVComm(tiny, tiny, layers).answer(EXAMPLE).answer
    context, query = _ids(tiny)
    message = encode_context(tiny, context, layers)
    before = {layer: keys.clone() for layer, keys in message.sink_keys.items()}
    shifted = shift_sinks(message, tiny)
    assert all(torch.equal(before[layer], message.sink_keys[layer]) for layer in before)
    assert all(shifted.sink_values[layer] is message.sink_values[layer] for layer in before)
    assert all(shifted.keys[layer] is message.keys[layer] for layer in layers)
    difference = (_receiver_logits(tiny, shifted, query) - _receiver_logits(tiny, message, query)).abs().max()
    assert difference.item() > 1e-4
    output = KVCommS(tiny, tiny, layers, shift_back=True).answer(EXAMPLE)
    assert output.layers == layers and output.costs.kv_bytes == message.nbytes


# --- explicit shift-back reference -------------------------------------------------------------------------------
# One pass over [context ; query]. At non-selected layers the query rows are in the shift-back frame: their RoPE
# positions restart at n (right after the n sink tokens at 0..n-1), and they see only the sink context columns.
# Context rows keep positions 0..|C|-1 everywhere, so they compute exactly the sender's prefill.

_SHIFT = {"context_length": 0, "selected": set(), "sink": 1}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len)[None, :]
    allowed = cols <= rows
    if module.layer_idx not in _SHIFT["selected"]:
        context_length, sink = _SHIFT["context_length"], _SHIFT["sink"]
        allowed = allowed & ~((rows >= context_length) & (cols >= sink) & (cols < context_length))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), -1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


@pytest.fixture(scope="module")
def shift_model():
    AttentionInterface.register("kvcomm_test_shift_back", _reference_attention)
    AttentionMaskInterface.register("kvcomm_test_shift_back", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return tiny_llama(seed=5, layers=4)


def _shift_back_reference(model, context, query, selected, sink):
    context_length, query_length = context.shape[-1], query.shape[-1]
    positions = torch.cat([torch.arange(context_length), torch.arange(sink, sink + query_length)]).view(1, -1)
    shifted = model.model.model.rotary_emb(torch.zeros(1), positions)

    def use_shifted_frame(module, args, kwargs):
        return args, {**kwargs, "position_embeddings": shifted}

    attentions = [layer.self_attn for layer in model.model.model.layers]
    handles = [attention.register_forward_pre_hook(use_shifted_frame, with_kwargs=True)
               for index, attention in enumerate(attentions) if index not in selected]
    _SHIFT.update(context_length=context_length, selected=set(selected), sink=sink)
    model.model.set_attn_implementation("kvcomm_test_shift_back")
    try:
        with torch.no_grad():
            return model.model(input_ids=torch.cat([context, query], -1)).logits[:, context_length:]
    finally:
        model.model.set_attn_implementation(_hf.ATTENTION_NAME)
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("sink", [1, 2])
@pytest.mark.parametrize("selected", [(1, 3), (0,), (2,), ()])
def test_kvcomm_s_equals_explicit_shift_back_reference(shift_model, sink, selected):
    model = shift_model
    context, query = _ids(model)
    message = encode_context(model, context, selected, sink_tokens=sink)
    kvcomm_s = _receiver_logits(model, shift_sinks(message, model), query)
    reference = _shift_back_reference(model, context, query, selected, sink)
    assert (kvcomm_s - reference).abs().max().item() < 1e-4
    kvcomm = _receiver_logits(model, message, query)
    assert (kvcomm - reference).abs().max().item() > 1e-4  # plain KVComm is a different layout
