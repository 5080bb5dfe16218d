"""Analytic FLOPs (kvcomm.flops) against hand counts, torch's FLOP counter, and what the methods record."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvcomm.errors import KVCommError
from kvcomm.flops import ModelDims, attended_pairs, decode_steps, forward_flops, generation_flops
from kvcomm.generation import GenerationSettings
from kvcomm.methods import KVComm, Skyline
from kvcomm.methods.base import answer_flops, max_new_tokens, model_dims
from kvcomm.prompts import chat_ids
from tests.conftest import FACTS_EXAMPLE

# tiny_llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 128 (SwiGLU), 4 layers, 259 tokens
ATTENTION_PARAMS = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k, v, o = 12,288
MLP_PARAMS = 3 * 64 * 128  # gate, up, down = 24,576
LINEAR = 4 * (ATTENTION_PARAMS + MLP_PARAMS)  # 147,456
LM_HEAD = 64 * 259  # 16,576
PER_PAIR = 4 * 4 * 16  # 4 · heads · head_dim = 256 FLOPs per attended (query, key) pair and layer


def test_dims_match_the_model_weights(tiny):
    dims = model_dims(tiny)
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim) == (4, 64, 4, 2, 16)
    assert dims.linear_params == LINEAR
    layer_weights = sum(p.numel() for name, p in tiny.model.named_parameters() if ".layers." in name and p.dim() == 2)
    assert dims.linear_params == layer_weights
    assert dims.lm_head_params == LM_HEAD == tiny.model.lm_head.weight.numel()


def test_forward_hand_count(tiny):
    dims = model_dims(tiny)
    # 3 new tokens after 5 cached keys: 3·5 + 3·4/2 = 21 pairs per layer
    assert attended_pairs(3, 5) == 21
    expected = 2 * LINEAR * 3 + PER_PAIR * 21 * 4 + 2 * LM_HEAD
    assert expected == 939_392
    assert forward_flops(dims, 3, 5) == expected
    # per-layer past: 5 keys at layer 0, one sink elsewhere → pairs 21, 9, 9, 9
    assert forward_flops(dims, 3, [5, 1, 1, 1]) == 2 * LINEAR * 3 + PER_PAIR * (21 + 3 * 9) + 2 * LM_HEAD
    # all logits kept
    assert forward_flops(dims, 3, 0, logits_kept=3) == 2 * LINEAR * 3 + PER_PAIR * 6 * 4 + 6 * LM_HEAD
    assert forward_flops(dims, 0, 7) == 0
    with pytest.raises(KVCommError, match="2 entries"):
        forward_flops(dims, 3, [1, 2])


def test_generation_is_prefill_plus_single_token_steps(tiny):
    dims = model_dims(tiny)
    total = generation_flops(dims, prompt_tokens=3, decode_steps=2, past_keys=5)
    assert total == 939_392 + (2 * LINEAR + 2 * LM_HEAD + PER_PAIR * 9 * 4) + (2 * LINEAR + 2 * LM_HEAD + PER_PAIR * 10 * 4)
    assert total == 1_614_976
    per_layer = [5, 1, 1, 1]
    assert generation_flops(dims, 3, 4, per_layer) == forward_flops(dims, 3, per_layer) + sum(
        forward_flops(dims, 1, [p + 3 + i for p in per_layer]) for i in range(4))
    assert generation_flops(dims, 3, 0, 5) == forward_flops(dims, 3, 5)


def test_decode_steps():
    assert decode_steps(3, 8) == 3  # stopped by EOS: one more step produced it
    assert decode_steps(7, 8) == 7  # EOS as the last allowed token
    assert decode_steps(8, 8) == 7  # budget reached: the last token is never fed back
    assert decode_steps(0, 8) == 0  # EOS first
    assert decode_steps(2, 8, ignore_eos=True) == 7
    assert decode_steps(0, 0) == 0


def test_linear_part_matches_torch_flop_counter(tiny):
    """torch's counter sees the matmuls of q/k/v/o, the MLP and the kept lm_head row (this model's attention kernel
    is not counted), so it must equal the analytic count minus the attention term."""
    dims = model_dims(tiny)
    for tokens in (1, 6):
        ids = torch.randint(3, 250, (1, tokens))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            tiny.model(input_ids=ids, logits_to_keep=1)
        attention = PER_PAIR * attended_pairs(tokens, 0) * dims.num_layers
        assert counter.get_total_flops() == forward_flops(dims, tokens) - attention


def test_config_variants():
    from transformers import GPT2Config, LlamaConfig

    llama = ModelDims.from_config(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=4, vocab_size=10))
    assert llama.mlp_matrices == 3 and llama.linear_params == 2 * (4 * 32 * 32 + 3 * 32 * 48)
    gpt2 = ModelDims.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=10))
    assert gpt2.mlp_matrices == 2 and gpt2.intermediate_size == 128
    with pytest.raises(KVCommError, match="must be >= 1"):
        ModelDims(0, 1, 1, 1, 1, 1, 1)


def test_kvcomm_records_what_the_formula_needs(tiny):
    settings = GenerationSettings(max_new_tokens=4)
    method = KVComm(tiny, tiny, layers=(1,), sink_tokens=1, settings=settings)
    costs = method.answer(FACTS_EXAMPLE).costs
    context = int(chat_ids(tiny.tokenizer, FACTS_EXAMPLE.messages["sender"]).shape[-1])
    query = costs.receiver_prefill_tokens
    assert costs.sender_prefill_tokens == context
    assert costs.attended_context_keys == context + 3 * 1  # layer 1 sees |C|, the three others the sink
    assert costs.sender_flops == forward_flops(model_dims(tiny), context)
    budget = max_new_tokens(FACTS_EXAMPLE, settings)
    assert costs.receiver_flops == answer_flops(tiny, query, costs.generated_tokens, budget, settings,
                                                [1, context, 1, 1])
    skyline = Skyline(tiny, settings).answer(FACTS_EXAMPLE).costs
    assert skyline.sender_flops == 0 and skyline.receiver_prefill_tokens > query
    assert skyline.receiver_flops > costs.receiver_flops  # the receiver never prefills the context
    everything = KVComm(tiny, tiny, layers=(0, 1, 2, 3), sink_tokens=1, settings=settings).answer(FACTS_EXAMPLE).costs
    assert everything.attended_context_keys == 4 * context
    if everything.generated_tokens == costs.generated_tokens:
        assert everything.receiver_flops > costs.receiver_flops
