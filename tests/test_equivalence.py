"""The core invariants on a tiny random model: all layers shared == one model on [context ; query]; a subset of
layers == an explicit-mask reference; generate() == a manual greedy loop."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from kvcomm.generation import GenerationSettings, generate
from kvcomm.message import encode_context, receiver_cache
from kvcomm.methods import KVComm, Skyline
from tests.conftest import FACTS_EXAMPLE, context_and_query, receiver_logits, tiny_llama

EXAMPLE = FACTS_EXAMPLE
_ids = context_and_query
_receiver_logits = receiver_logits


def test_all_layers_equal_single_model_logits(tiny):
    context, query = _ids(tiny)
    message = encode_context(tiny, context, range(tiny.num_layers))
    shared = _receiver_logits(tiny, message, query)
    with torch.no_grad():
        single = tiny.model(input_ids=torch.cat([context, query], -1)).logits[:, context.shape[-1]:]
    assert shared.shape == single.shape
    assert (shared - single).abs().max().item() < 1e-4


def test_all_layers_equal_single_model_greedy_tokens(tiny):
    context, query = _ids(tiny)
    message = encode_context(tiny, context, range(tiny.num_layers))
    shared = generate(tiny, query, 16, cache=receiver_cache(message, tiny), past_length=message.context_length)
    single = generate(tiny, torch.cat([context, query], -1), 16)
    assert len(shared) == 16 and shared == single


def test_removing_kv_changes_logits(tiny):
    context, query = _ids(tiny)
    full = _receiver_logits(tiny, encode_context(tiny, context, range(tiny.num_layers)), query)
    none = _receiver_logits(tiny, encode_context(tiny, context, [], sink_tokens=1), query)
    assert (full - none).abs().max().item() > 1e-2


# --- explicit-mask reference -------------------------------------------------------------------------------------

_REFERENCE = {"context_length": 0, "selected": set(), "sink": 1}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention over [context ; query] in one pass, hiding non-sink context columns from query rows at
    non-selected layers (the definition of KVComm's receiver attention)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, 1)
    value = value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len)[None, :]
    allowed = cols <= rows
    if module.layer_idx not in _REFERENCE["selected"]:
        context_length, sink = _REFERENCE["context_length"], _REFERENCE["sink"]
        hidden = (rows >= context_length) & (cols >= sink) & (cols < context_length)
        allowed = allowed & ~hidden
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), -1).to(value.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


@pytest.fixture(scope="module")
def reference_model():
    AttentionInterface.register("kvcomm_test_reference", _reference_attention)
    AttentionMaskInterface.register("kvcomm_test_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = tiny_llama(seed=3, layers=4)
    return model


@pytest.mark.parametrize("sink", [1, 0])
@pytest.mark.parametrize("selected", [(1, 3), (0,), (2,), (0, 1, 2, 3)])
def test_subset_of_layers_equals_explicit_mask_reference(reference_model, sink, selected):
    model = reference_model
    context, query = _ids(model)
    message = encode_context(model, context, selected, sink_tokens=sink)
    kvcomm_logits = _receiver_logits(model, message, query)
    _REFERENCE.update(context_length=context.shape[-1], selected=set(selected), sink=sink)
    model.model.set_attn_implementation("kvcomm_test_reference")
    try:
        with torch.no_grad():
            reference = model.model(input_ids=torch.cat([context, query], -1)).logits[:, context.shape[-1]:]
    finally:
        model.model.set_attn_implementation("kvcomm_sdpa")
    assert (kvcomm_logits - reference).abs().max().item() < 1e-4


def test_sink_and_no_sink_differ(reference_model):
    context, query = _ids(reference_model)
    with_sink = _receiver_logits(reference_model, encode_context(reference_model, context, (1,), 1), query)
    without = _receiver_logits(reference_model, encode_context(reference_model, context, (1,), 0), query)
    assert (with_sink - without).abs().max().item() > 1e-4


def test_generate_equals_manual_greedy_loop(tiny):
    context, query = _ids(tiny)
    message = encode_context(tiny, context, (0, 2))
    tokens = generate(tiny, query, 10, cache=receiver_cache(message, tiny), past_length=message.context_length)
    cache = receiver_cache(message, tiny)
    ids, manual = query, []
    past = message.context_length
    with torch.no_grad():
        for _ in range(10):
            mask = torch.ones(1, past + ids.shape[-1], dtype=torch.long)
            logits = tiny.model(input_ids=ids, attention_mask=mask, cache=cache).logits
            past += ids.shape[-1]
            ids = logits[:, -1:].argmax(-1)
            manual.append(int(ids))
            if manual[-1] == 1:
                manual.pop()
                break
    assert tokens == manual


def test_sampling_through_generate_is_seeded(tiny):
    method = KVComm(tiny, tiny, (0, 1), settings=GenerationSettings(do_sample=True, temperature=1.5, seed=5))
    first, second = method.answer(EXAMPLE).answer, method.answer(EXAMPLE).answer
    assert first == second
    greedy = KVComm(tiny, tiny, (0, 1)).answer(EXAMPLE).answer
    other_seed = KVComm(tiny, tiny, (0, 1), settings=GenerationSettings(do_sample=True, temperature=1.5, seed=6))
    assert greedy != first or other_seed.answer(EXAMPLE).answer != first


def test_kvcomm_method_all_layers_equals_concatenated_skyline_tokens(tiny):
    """Method-level: KVComm(all layers) answers as one model reading the sender then the receiver prompt."""
    output = KVComm(tiny, tiny, range(tiny.num_layers)).answer(EXAMPLE)
    context, query = _ids(tiny)
    single = generate(tiny, torch.cat([context, query], -1), EXAMPLE.max_new_tokens)
    assert output.answer == tiny.tokenizer.decode(single, skip_special_tokens=True).strip()
    assert output.costs.sender_prefill_tokens == context.shape[-1]
    assert output.costs.receiver_prefill_tokens == query.shape[-1]
    per_token_layer = 2 * 2 * 16 * 4  # K and V, kv_heads 2, head_dim 16, fp32
    assert output.costs.kv_bytes == per_token_layer * context.shape[-1] * tiny.num_layers
    assert Skyline(tiny).answer(EXAMPLE).costs.kv_bytes == 0


def test_one_message_can_be_received_twice_unchanged(tiny):
    method = KVComm(tiny, tiny, (0, 2))
    message, _ = method.send(EXAMPLE)
    before = {layer: keys.clone() for layer, keys in message.keys.items()}
    first = method.receive(message, EXAMPLE).answer
    second = method.receive(message, EXAMPLE).answer
    assert first == second
    assert all(torch.equal(before[layer], message.keys[layer]) for layer in before)
    assert set(message.sink_keys) == {1, 3} and message.sink_keys[1].shape[-2] == 1
