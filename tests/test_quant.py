"""Transmission quantization: bit packing, error bounds, sink handling, byte accounting, sensitivity, bit allocation,
and the effect on a receiver."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvcomm.errors import KVCommError, QuantizationError
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.models import Fingerprint
from kvcomm.prompts import chat_ids
from kvcomm.bitalloc import (
    allocate_bits, distortion_profile, output_sensitivity, rank_rule_bits, relative_error, round_trip_mse,
)
from kvcomm.quant import (
    ALLOWED_BITS, AXES, KVQuantConfig, QuantizedTensor, as_tensor, dequantize_message, pack_bits, packed_size,
    quantize, quantize_message, unpack_bits,
)
from kvcomm.tasks.base import Example

FINGERPRINT = Fingerprint("test", "LlamaForCausalLM", 4, 2, 16, 4, 64, "{}", 259, "0" * 64)
OUTPUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def make_message(layers=(0, 2), context=9, heads=2, head_dim=16, dtype=torch.float32, seed=0, scale=None) -> KVMessage:
    generator = torch.Generator().manual_seed(seed)
    scale = scale or {}

    def draw(tokens):
        return torch.randn(1, heads, tokens, head_dim, generator=generator)

    keys = {layer: (draw(context) * scale.get(layer, 1.0)).to(dtype) for layer in layers}
    values = {layer: (draw(context) * scale.get(layer, 1.0)).to(dtype) for layer in layers}
    others = [layer for layer in range(4) if layer not in layers]
    return KVMessage(tuple(layers), keys, values, {l: draw(1).to(dtype) for l in others},
                     {l: draw(1).to(dtype) for l in others}, context, 1, FINGERPRINT)


# --- packing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_pack_unpack_round_trip_every_width_and_odd_counts(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in (0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 1001):
        codes = torch.randint(0, 1 << bits, (count,), dtype=torch.uint8, generator=generator)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == math.ceil(count * bits / 8) == packed_size(count, bits)
        assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_accepts_any_shape_and_returns_new_tensors():
    codes = torch.randint(0, 256, (3, 5), dtype=torch.uint8)
    packed = pack_bits(codes, 8)
    packed[0] = 255 - packed[0]
    assert torch.equal(unpack_bits(pack_bits(codes, 8), 8, 15).view(3, 5), codes)
    assert packed.untyped_storage().data_ptr() != codes.untyped_storage().data_ptr()


def test_bit_layout_is_little_endian_within_runs():
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    v = [0b101010, 0b110011, 0b011100, 0b111111]  # six bits: the paper's layout (QKVCOMM.md §3.4)
    expected = [(v[0] | v[1] << 6) & 255, (v[1] >> 2 | v[2] << 4) & 255, (v[2] >> 4 | v[3] << 2) & 255]
    assert pack_bits(torch.tensor(v, dtype=torch.uint8), 6).tolist() == expected
    three = list(range(8))
    word = sum(code << (3 * index) for index, code in enumerate(three))
    assert pack_bits(torch.tensor(three, dtype=torch.uint8), 3).tolist() == [word & 255, word >> 8 & 255, word >> 16]


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(QuantizationError):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(QuantizationError):
        pack_bits(torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(QuantizationError):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(QuantizationError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(QuantizationError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, -1)


# --- quantizer --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", ALLOWED_BITS)
def test_round_trip_error_within_half_a_step(bits, axis):
    source = torch.randn(1, 3, 37, 20, generator=torch.Generator().manual_seed(bits)) * 3
    source[..., 5] += 10  # an outlier channel
    for dtype, group, keep in itertools.product(OUTPUT_EPS, (8, 32, 5), (0, 1, 3)):
        tensor = source.to(dtype)
        quantized = quantize(tensor, bits, group, axis, keep)
        restored = quantized.dequantize()
        assert restored.dtype == dtype and restored.shape == tensor.shape
        error = (restored.float() - tensor.float())[..., keep:, :].abs()
        bound = quantized.element_scales() / 2 * (1 + 1e-5) + OUTPUT_EPS[dtype] * restored.float()[..., keep:, :].abs()
        assert bool((error <= bound + 1e-7).all()), (dtype, group, keep, float((error - bound).max()))
        assert torch.equal(restored[..., :keep, :], tensor[..., :keep, :])


@pytest.mark.parametrize("dtype", list(OUTPUT_EPS))
def test_sink_tokens_are_kept_exactly(dtype):
    tensor = (torch.randn(1, 2, 10, 16) * 50).to(dtype)
    quantized = quantize(tensor, 2, 4, "channel", keep_first_tokens=2)
    assert quantized.keep == 2 and quantized.sink.dtype == dtype
    assert torch.equal(quantized.dequantize()[..., :2, :], tensor[..., :2, :])
    everything = quantize(tensor, 2, 4, "token", keep_first_tokens=10)
    assert everything.packed.numel() == 0 and torch.equal(everything.dequantize(), tensor)


def test_byte_accounting():
    tensor = torch.randn(1, 2, 11, 16, dtype=torch.float16)
    for bits, axis in itertools.product(ALLOWED_BITS, AXES):
        quantized = quantize(tensor, bits, 4, axis, keep_first_tokens=1)
        body = 2 * 10 * 16
        groups = {"channel": 2 * math.ceil(10 / 4) * 16, "token": 2 * 10 * math.ceil(16 / 4), "tensor": 1}[axis]
        assert quantized.packed.numel() == math.ceil(body * bits / 8)
        assert quantized.scales.numel() == quantized.zeros.numel() == groups
        assert quantized.nbytes == math.ceil(body * bits / 8) + 4 * groups + 2 * 16 * 2


def test_group_size_longer_than_the_axis_is_shortened():
    tensor = torch.randn(1, 1, 6, 8)
    quantized = quantize(tensor, 4, 128, "channel")
    assert quantized.group_size == 6 and quantized.scales.shape == (1, 1, 1, 8)
    assert quantize(tensor, 4, 128, "token").scales.shape == (1, 1, 6, 1)
    assert quantize(tensor, 4, 128, "tensor").scales.shape == (1,)


def test_constant_tensor_is_exact():
    tensor = torch.full((1, 2, 5, 8), 0.375)
    for axis in AXES:
        quantized = quantize(tensor, 2, 4, axis)
        assert torch.equal(quantized.dequantize(), tensor)
        assert float(quantized.scales.float().max()) == 0.0


def test_quantize_rejects_bad_input():
    tensor = torch.randn(1, 2, 5, 8)
    for bad in [dict(bits=5), dict(bits=0), dict(bits=True), dict(bits=16), dict(axis="head"), dict(group_size=0),
                dict(group_size=-3), dict(group_size=2.5), dict(keep_first_tokens=6), dict(keep_first_tokens=-1)]:
        arguments = dict(tensor=tensor, bits=4, group_size=4, axis="channel", keep_first_tokens=0) | bad
        with pytest.raises(QuantizationError):
            quantize(**arguments)
    for bad_tensor in (torch.ones(1, 2, 5, 8, dtype=torch.int32), torch.randn(8), torch.randn(2, 4).double()):
        with pytest.raises(QuantizationError):
            quantize(bad_tensor, 4)
    for value in (math.inf, math.nan, 1e6):
        broken = tensor.clone()
        broken[0, 0, 0, 0] = value
        with pytest.raises(QuantizationError):
            quantize(broken, 4, 4, "token")
    assert issubclass(QuantizationError, KVCommError)


def test_quantized_tensor_validates_its_parts():
    quantized = quantize(torch.randn(1, 2, 6, 8), 4, 4, "channel", 1)
    with pytest.raises(QuantizationError):
        QuantizedTensor(quantized.packed, quantized.scales[..., :1, :], quantized.zeros, 4, 4, "channel", quantized.shape,
                        torch.float32, quantized.sink)
    with pytest.raises(QuantizationError):
        QuantizedTensor(quantized.packed[:-1], quantized.scales, quantized.zeros, 4, 4, "channel", quantized.shape,
                        torch.float32, quantized.sink)
    with pytest.raises(QuantizationError):
        QuantizedTensor(quantized.packed, quantized.scales, quantized.zeros, 3, 4, "channel", quantized.shape,
                        torch.float32, quantized.sink)


# --- messages -----------------------------------------------------------------------------------------------------------

def test_quantize_message_per_layer_widths():
    message = make_message(dtype=torch.float16)
    quantized = quantize_message(message, KVQuantConfig(group_size=4), key_bits={0: 8, 2: 3}, value_bits={2: 2})
    assert {layer: q.bits for layer, q in quantized.keys.items()} == {0: 8, 2: 3}
    assert {layer: q.bits for layer, q in quantized.values.items()} == {0: 4, 2: 2}
    assert all(q.axis == "channel" for q in quantized.keys.values())
    assert all(q.axis == "token" and q.keep == 1 for q in quantized.values.values())
    assert quantized.sink_keys.keys() == message.sink_keys.keys()
    assert quantized.nbytes == sum(q.nbytes for q in [*quantized.keys.values(), *quantized.values.values()]) + \
        sum(t.nbytes for t in [*message.sink_keys.values(), *message.sink_values.values()])
    assert quantized.nbytes < message.nbytes
    restored = dequantize_message(quantized)
    for layer in message.layers:
        assert isinstance(restored.keys[layer], torch.Tensor)
        assert torch.equal(restored.keys[layer], as_tensor(quantized.keys[layer]))
    with pytest.raises(QuantizationError):
        quantize_message(message, key_bits={1: 4})
    with pytest.raises(QuantizationError):
        quantize_message(quantized)
    with pytest.raises(QuantizationError):
        KVQuantConfig(group_size=0)
    with pytest.raises(QuantizationError):
        KVQuantConfig(value_axis="layer")


# --- sensitivity ------------------------------------------------------------------------------------------------------

def test_round_trip_mse_is_the_papers_per_tensor_4_bit_mse():
    message = make_message(scale={2: 10.0})
    mse = round_trip_mse(message)
    for layer in message.layers:
        expected = sum(float((quantize(t, 4, axis="tensor").dequantize() - t).square().mean())
                       for t in (message.keys[layer], message.values[layer]))
        assert mse[layer] == pytest.approx(expected, rel=1e-5)
    assert mse[2] > 50 * mse[0]  # raw MSE rewards large magnitudes ...
    relative = relative_error(message, 4, KVQuantConfig(key_axis="tensor", value_axis="tensor", keep_sink=0))
    assert relative[2] == pytest.approx(relative[0], rel=0.5)  # ... the relative error does not


def test_relative_error_falls_with_bits_and_profile_shapes():
    message = make_message()
    errors = [relative_error(message, bits)[0] for bits in ALLOWED_BITS]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    keys, values = relative_error(message, 2, part="keys")[0], relative_error(message, 2, part="values")[0]
    assert min(keys, values) <= errors[0] <= max(keys, values)
    key_table, value_table = distortion_profile(message, (2, 4, 8))
    assert set(key_table) == set(value_table) == {0, 2} and set(key_table[0]) == {2, 4, 8}
    assert key_table[0][2] == pytest.approx(keys**2)


def test_output_sensitivity_hook_quantizes_one_layer_at_a_time():
    message = make_message()
    seen = []

    def score(perturbed):
        quantized = [layer for layer in perturbed.layers if isinstance(perturbed.keys[layer], QuantizedTensor)]
        seen.append(quantized)
        return float(sum(as_tensor(perturbed.keys[layer]).sum() for layer in perturbed.layers))

    result = output_sensitivity(message, score, bits=2)
    assert seen == [[0], [2]] and set(result) == {0, 2}
    with pytest.raises(QuantizationError):
        output_sensitivity(message, score, layers=[1])


# --- bit allocation ---------------------------------------------------------------------------------------------------

def test_rank_rule_30_40_30_counts():
    sensitivity = {layer: float(layer) for layer in range(4, 19)}  # 15 layers, 18 most sensitive
    widths = rank_rule_bits(sensitivity)
    assert sorted(widths.values()).count(8) == 4 and list(widths.values()).count(6) == 7
    assert list(widths.values()).count(4) == 4
    assert all(widths[layer] == 8 for layer in (15, 16, 17, 18)) and all(widths[layer] == 4 for layer in (4, 5, 6, 7))
    # the paper's averages for N = 15: target 4 → 5.07, 6 → 6.00, 8 → 6.93
    for target, average in ((4, 5.07), (6, 6.0), (8, 6.93)):
        assert sum(rank_rule_bits(sensitivity, target_bits=target).values()) / 15 == pytest.approx(average, abs=0.005)
    ten = rank_rule_bits({layer: -layer for layer in range(10)})
    assert [ten[layer] for layer in range(10)] == [8, 8, 8, 6, 6, 6, 6, 4, 4, 4]
    assert set(rank_rule_bits({0: 1.0, 1: 2.0, 2: 3.0}).values()) == {6}
    with pytest.raises(QuantizationError):
        rank_rule_bits(sensitivity, target_bits=9)
    with pytest.raises(QuantizationError):
        rank_rule_bits(sensitivity, target_bits=5)  # int(5) is not an allowed width


def _average(allocation, key_numel=None, value_numel=None):
    layers = allocation.key_bits
    key_numel = key_numel or {layer: 1 for layer in layers}
    value_numel = value_numel or {layer: 1 for layer in layers}
    total = sum(key_numel[l] * allocation.key_bits[l] + value_numel[l] * allocation.value_bits[l] for l in layers)
    return total / sum(key_numel[l] + value_numel[l] for l in layers)


@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 3.25, 4.0, 4.55, 5.0, 6.1, 7.9, 8.0])
def test_solver_hits_the_budget_exactly(target):
    sensitivity = {layer: 1.0 + (layer * 7919 % 13) for layer in range(10)}
    allocation = allocate_bits(sensitivity, {layer: 0.5 * s for layer, s in sensitivity.items()}, target)
    assert _average(allocation) == pytest.approx(target, abs=1e-12) and allocation.average_bits == pytest.approx(target)
    assert set(allocation.key_bits.values()) | set(allocation.value_bits.values()) <= set(ALLOWED_BITS)


def test_solver_is_optimal_against_brute_force():
    keys = {0: {b: 9.0 / b**2 for b in ALLOWED_BITS}, 1: {b: 1.0 / b for b in ALLOWED_BITS}, 2: 3.0}
    values = {0: 0.1, 1: {b: 5.0 * 4.0**-b for b in ALLOWED_BITS}, 2: 0.7}
    table = lambda s, b: s[b] if isinstance(s, dict) else s * 4.0 ** (4 - b)  # noqa: E731
    for target in (3.0, 4.5, 5.5):
        allocation = allocate_bits(keys, values, target)
        best = min(sum(table(keys[l], kb[l]) + table(values[l], vb[l]) for l in range(3))
                   for kb in itertools.product(ALLOWED_BITS, repeat=3) for vb in itertools.product(ALLOWED_BITS, repeat=3)
                   if sum(kb) + sum(vb) == target * 6)
        assert allocation.distortion == pytest.approx(best)


def test_solver_keys_at_least_values():
    keys = {layer: 1.0 for layer in range(6)}
    values = {layer: 50.0 for layer in range(6)}  # values look more sensitive
    free = allocate_bits(keys, values, 4.0)
    assert any(free.value_bits[l] > free.key_bits[l] for l in range(6))
    constrained = allocate_bits(keys, values, 4.0, keys_at_least_values=True)
    assert all(constrained.key_bits[l] >= constrained.value_bits[l] for l in range(6))
    assert _average(constrained) == 4.0


def test_solver_weights_by_element_count_and_uses_measured_tables():
    message = make_message(layers=(0, 1, 2))
    key_table, value_table = distortion_profile(message)
    numel = {0: 30, 1: 30, 2: 60}
    allocation = allocate_bits(key_table, value_table, 3.5, key_numel=numel, value_numel=numel)
    assert _average(allocation, numel, numel) == 3.5
    quantized = quantize_message(message, key_bits=allocation.key_bits, value_bits=allocation.value_bits)
    assert {l: q.bits for l, q in quantized.keys.items()} == allocation.key_bits


def test_solver_rejects_unreachable_targets_and_bad_input():
    sensitivity = {layer: 1.0 for layer in range(3)}
    for target in (1.5, 3.33, 47 / 6, 9.0):  # 3.33·6 is no integer; 47 bits over 6 tensors would need a 7
        with pytest.raises(QuantizationError, match="nearest reachable"):
            allocate_bits(sensitivity, None, target)
    with pytest.raises(QuantizationError):
        allocate_bits(sensitivity, None, 4.0, widths=(2, 5))
    with pytest.raises(QuantizationError):
        allocate_bits(sensitivity, {0: 1.0}, 4.0)
    with pytest.raises(QuantizationError):
        allocate_bits({0: {2: 1.0}}, None, 4.0)
    with pytest.raises(QuantizationError):
        allocate_bits(sensitivity, None, 4.0, key_numel={0: 1, 1: 0, 2: 1})
    single = allocate_bits({0: 1.0}, None, 5.0, widths=(4, 6))  # one layer: K and V must split 4 + 6
    assert sorted((single.key_bits[0], single.value_bits[0])) == [4, 6]


# --- effect on a receiver --------------------------------------------------------------------------------------------

def test_receiver_logits_depend_on_bits(tiny):
    example = Example.qa(context="Bob lives in Ollerby. Alice's code is 4821.", question="What is Alice's code?",
                         answers=["4821"], answer_prefix="Alice's code is")
    context = chat_ids(tiny.tokenizer, example.messages["sender"])
    query = chat_ids(tiny.tokenizer, example.messages["receiver"], example.answer_prefix)
    message = encode_context(tiny, context, range(tiny.num_layers))

    def logits(shared):
        mask = torch.ones(1, shared.context_length + query.shape[-1], dtype=torch.long)
        with torch.no_grad():
            return tiny.model(input_ids=query, attention_mask=mask, cache=receiver_cache(shared, tiny)).logits

    exact = logits(message)
    two = logits(quantize_message(message, KVQuantConfig(key_bits=2, value_bits=2, group_size=8)))
    eight = logits(quantize_message(message, KVQuantConfig(key_bits=8, value_bits=8, group_size=8)))
    assert (two - eight).abs().max().item() > 1e-3
    assert (eight - exact).abs().max().item() < (two - exact).abs().max().item()
