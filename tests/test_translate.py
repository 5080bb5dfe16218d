"""Moment matching between sender and receiver KV statistics, and the layer map."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import CalibrationError, KVCommError, LayerSelectionError
from kvcomm.message import KVMessage
from kvcomm.models import Fingerprint
from kvcomm.translate import (
    KVStatistics,
    MomentMatcher,
    collect_model_statistics,
    collect_statistics,
    layer_map,
    layer_mapping,
)

KV_HEADS, HEAD_DIM = 2, 8


def fingerprint(num_layers: int, name: str = "model", kv_heads: int = KV_HEADS,
                head_dim: int = HEAD_DIM) -> Fingerprint:
    return Fingerprint(model_id=name, architecture="LlamaForCausalLM", num_layers=num_layers, num_kv_heads=kv_heads,
                       head_dim=head_dim, num_attention_heads=4, hidden_size=kv_heads * head_dim * 2, rope="{}",
                       vocab_size=259, tokenizer_hash="t")


def random_message(generator: torch.Generator, layers: tuple[int, ...], num_layers: int, length: int,
                   scale: float = 1.0, shift: float = 0.0, name: str = "model", kv_heads: int = KV_HEADS,
                   head_dim: int = HEAD_DIM) -> KVMessage:
    """A message whose every (head, dim) has its own mean and scale: ``[1, kv_heads, length, head_dim]`` per layer."""

    def tensor(layer: int) -> torch.Tensor:
        dim_scale = scale * (1 + torch.arange(kv_heads * head_dim, dtype=torch.float32).reshape(1, kv_heads, 1,
                                                                                                  head_dim) / 7)
        dim_shift = shift + layer + torch.linspace(-2, 2, kv_heads * head_dim).reshape(1, kv_heads, 1, head_dim)
        return torch.randn(1, kv_heads, length, head_dim, generator=generator) * dim_scale + dim_shift

    keys = {layer: tensor(layer) for layer in layers}
    values = {layer: tensor(layer) * 0.5 - 1 for layer in layers}
    sink = {layer: torch.zeros(1, kv_heads, 1, head_dim) for layer in range(num_layers) if layer not in layers}
    return KVMessage(layers, keys, values, sink, dict(sink), length, 1,
                     fingerprint(num_layers, name, kv_heads, head_dim))


def per_dim_moments(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std per (head, dim) over all tokens, float64: ``[kv_heads, head_dim]``."""
    pooled = torch.cat([t.to(torch.float64) for t in tensors], dim=2)
    return pooled.mean(dim=(0, 2)), pooled.std(dim=(0, 2), unbiased=False)


@pytest.fixture
def pair():
    generator = torch.Generator().manual_seed(0)
    layers = (0, 2, 3)
    sender_messages = [random_message(generator, layers, 4, length, name="sender") for length in (5, 9, 13)]
    receiver_messages = [random_message(generator, layers, 4, length, scale=3.0, shift=-4.0, name="receiver")
                         for length in (6, 11)]
    return sender_messages, receiver_messages


def test_statistics_equal_the_pooled_moments(pair):
    sender_messages, _ = pair
    stats = collect_statistics(sender_messages)
    assert (stats.num_layers, sorted(stats.layers), stats.model_id) == (4, [0, 2, 3], "sender")
    for layer in (0, 2, 3):
        for kind in ("keys", "values"):
            tensors = [getattr(m, kind)[layer] for m in sender_messages]
            mean, std = per_dim_moments(tensors)
            moments = getattr(stats.layers[layer], kind)
            assert moments.count == 5 + 9 + 13
            torch.testing.assert_close(moments.mean, mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(moments.std, std, rtol=0, atol=1e-10)
            flat = torch.cat([t.to(torch.float64).flatten() for t in tensors])
            assert moments.scalar_mean == pytest.approx(float(flat.mean()), abs=1e-10)
            assert moments.scalar_std == pytest.approx(float(flat.std(unbiased=False)), abs=1e-10)


def test_tensor_samples_give_the_same_statistics(pair):
    sender_messages, _ = pair
    mappings = [{layer: (m.keys[layer], m.values[layer]) for layer in m.layers} for m in sender_messages]
    from_messages, from_tensors = collect_statistics(sender_messages), collect_statistics(mappings, num_layers=4)
    for layer in from_messages.layers:
        torch.testing.assert_close(from_tensors.layers[layer].keys.std, from_messages.layers[layer].keys.std)
    with pytest.raises(CalibrationError, match="num_layers"):
        collect_statistics(mappings)


def test_matching_maps_sender_onto_receiver_moments(pair):
    sender_messages, receiver_messages = pair
    sender, receiver = collect_statistics(sender_messages), collect_statistics(receiver_messages)
    matcher = MomentMatcher.fit(sender, receiver)
    moved = [matcher.apply(message) for message in sender_messages]
    for layer in (0, 2, 3):
        for kind in ("keys", "values"):
            mean, std = per_dim_moments([getattr(m, kind)[layer] for m in moved])
            goal = getattr(receiver.layers[layer], kind)
            torch.testing.assert_close(mean, goal.mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(std, goal.std, rtol=0, atol=1e-4)
    message = moved[0]
    assert message.layers == sender_messages[0].layers and message.fingerprint == sender_messages[0].fingerprint
    assert message.keys[0].shape == sender_messages[0].keys[0].shape and message.keys[0].dtype == torch.float32
    assert message.sink_keys[1] is sender_messages[0].sink_keys[1]  # sinks pass through
    assert not torch.equal(sender_messages[0].keys[0], message.keys[0])  # the input message is left alone


def test_identity_when_statistics_are_equal(pair):
    sender_messages, _ = pair
    stats = collect_statistics(sender_messages)
    for mode in ("per_dimension", "scalar"):
        matcher = MomentMatcher.fit(stats, stats, mode=mode)
        message = sender_messages[1]
        moved = matcher.apply(message)
        for layer in message.layers:
            torch.testing.assert_close(moved.keys[layer], message.keys[layer], rtol=0, atol=1e-6)
            torch.testing.assert_close(moved.values[layer], message.values[layer], rtol=0, atol=1e-6)


def test_scalar_mode_differs_from_per_dimension(pair):
    sender_messages, receiver_messages = pair
    sender, receiver = collect_statistics(sender_messages), collect_statistics(receiver_messages)
    per_dim = MomentMatcher.fit(sender, receiver).apply(sender_messages[0])
    scalar_matcher = MomentMatcher.fit(sender, receiver, mode="scalar")
    scalar = scalar_matcher.apply(sender_messages[0])
    assert not torch.allclose(per_dim.keys[2], scalar.keys[2], atol=1e-3)
    k_scale, k_shift, _, _ = scalar_matcher.coefficients(2)
    assert k_scale.shape == k_shift.shape == (1, 1, 1, 1)
    moved = [scalar_matcher.apply(m) for m in sender_messages]  # scalar mode matches the global moments
    flat = torch.cat([m.keys[2].to(torch.float64).flatten() for m in moved])
    assert float(flat.mean()) == pytest.approx(receiver.layers[2].keys.scalar_mean, abs=1e-4)
    assert float(flat.std(unbiased=False)) == pytest.approx(receiver.layers[2].keys.scalar_std, abs=1e-4)


def test_low_precision_dtype_is_kept(pair):
    sender_messages, receiver_messages = pair
    matcher = MomentMatcher.fit(collect_statistics(sender_messages), collect_statistics(receiver_messages))
    message = sender_messages[0]
    half = KVMessage(message.layers, {k: v.to(torch.bfloat16) for k, v in message.keys.items()},
                     {k: v.to(torch.bfloat16) for k, v in message.values.items()}, {}, {}, message.context_length, 0,
                     message.fingerprint)
    assert matcher.apply(half).keys[0].dtype == torch.bfloat16


@pytest.mark.parametrize("sender_layers, receiver_layers, expected", [
    (30, 30, {layer: layer for layer in range(30)}),
    (30, 18, {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 3, 7: 4, 10: 6, 15: 9, 20: 12, 28: 17, 29: 17}),
    (16, 32, {0: 0, 1: 2, 2: 4, 5: 10, 15: 30}),  # exact ties (l + 0.5)·2 − 0.5 = 2l + 0.5 round to even
])
def test_layer_map_values(sender_layers, receiver_layers, expected):
    for layer, target in expected.items():
        assert layer_map(layer, sender_layers, receiver_layers) == target
    mapping = layer_mapping(range(sender_layers), sender_layers, receiver_layers)
    targets = list(mapping.values())
    assert targets == sorted(targets) and 0 <= targets[0] and targets[-1] < receiver_layers


def test_layer_map_refuses_out_of_range():
    with pytest.raises(LayerSelectionError):
        layer_map(30, 30, 18)
    with pytest.raises(LayerSelectionError):
        layer_map(0, 0, 18)


def test_different_depths_use_the_mapped_receiver_layer():
    generator = torch.Generator().manual_seed(1)
    sender_messages = [random_message(generator, (1, 5), 6, 10, name="deep")]
    receiver_messages = [random_message(generator, (0, 2), 3, 12, scale=2.0, name="shallow")]
    sender, receiver = collect_statistics(sender_messages), collect_statistics(receiver_messages)
    matcher = MomentMatcher.fit(sender, receiver)
    assert matcher.layer_map == {1: 0, 5: 2}
    moved = matcher.apply(sender_messages[0])
    mean, std = per_dim_moments([moved.keys[5]])
    torch.testing.assert_close(std, receiver.layers[2].keys.std, rtol=0, atol=1e-4)
    torch.testing.assert_close(mean, receiver.layers[2].keys.mean, rtol=0, atol=1e-4)


def test_missing_statistics_are_refused(pair):
    sender_messages, receiver_messages = pair
    sender = collect_statistics(sender_messages)
    receiver = collect_statistics([{0: (m.keys[0], m.values[0])} for m in receiver_messages], num_layers=4)
    with pytest.raises(CalibrationError, match="receiver statistics for layer 2"):
        MomentMatcher.fit(sender, receiver)
    matcher = MomentMatcher.fit(sender, receiver, layers=[0])
    with pytest.raises(CalibrationError, match="layer 2"):
        matcher.apply(sender_messages[0])
    only_first = collect_statistics([{0: (m.keys[0], m.values[0])} for m in sender_messages], num_layers=4)
    with pytest.raises(CalibrationError, match="sender statistics for layer 3"):
        MomentMatcher.fit(only_first, collect_statistics(receiver_messages), layers=[0, 3])


@pytest.mark.parametrize("other", [{"head_dim": 16}, {"kv_heads": 4}])
def test_mismatched_shapes_are_refused(pair, other):
    sender_messages, _ = pair
    generator = torch.Generator().manual_seed(2)
    receiver = collect_statistics([random_message(generator, (0, 2, 3), 4, 7, **other)])
    with pytest.raises(CalibrationError, match="projection") as raised:
        MomentMatcher.fit(collect_statistics(sender_messages), receiver)
    assert isinstance(raised.value, KVCommError)


def test_wrong_message_is_refused(pair):
    sender_messages, receiver_messages = pair
    matcher = MomentMatcher.fit(collect_statistics(sender_messages), collect_statistics(receiver_messages))
    other_depth = random_message(torch.Generator().manual_seed(3), (0,), 5, 4)
    with pytest.raises(CalibrationError, match="5-layer"):
        matcher.apply(other_depth)
    other_shape = random_message(torch.Generator().manual_seed(3), (0,), 4, 4, head_dim=4)
    with pytest.raises(CalibrationError, match="shape"):
        matcher.apply(other_shape)


def test_bad_settings_are_refused(pair):
    stats = collect_statistics(pair[0])
    with pytest.raises(ValueError):
        MomentMatcher(stats, stats, mode="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MomentMatcher(stats, stats, epsilon=0)
    with pytest.raises(CalibrationError):
        collect_statistics([])


def test_save_load_round_trip(pair, tmp_path):
    sender_messages, receiver_messages = pair
    sender, receiver = collect_statistics(sender_messages), collect_statistics(receiver_messages)
    path = sender.save(tmp_path / "stats.safetensors")
    loaded = KVStatistics.load(path)
    assert (loaded.num_layers, loaded.model_id, sorted(loaded.layers)) == (4, "sender", [0, 2, 3])
    for layer, stats in sender.layers.items():
        for kind in ("keys", "values"):
            mine, theirs = getattr(stats, kind), getattr(loaded.layers[layer], kind)
            assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.std, theirs.std)
            assert (mine.scalar_mean, mine.scalar_std, mine.count) == (theirs.scalar_mean, theirs.scalar_std,
                                                                       theirs.count)
    matcher = MomentMatcher.fit(sender, receiver, mode="scalar", epsilon=1e-6)
    folder = matcher.save(tmp_path / "matcher")
    assert sorted(p.name for p in folder.iterdir()) == ["matcher.json", "receiver.safetensors", "sender.safetensors"]
    again = MomentMatcher.load(folder)
    assert (again.mode, again.epsilon) == ("scalar", 1e-6)
    message = sender_messages[0]
    assert torch.equal(again.apply(message).keys[2], matcher.apply(message).keys[2])
    with pytest.raises(CalibrationError):
        KVStatistics.load(tmp_path / "missing.safetensors")
    with pytest.raises(CalibrationError):
        MomentMatcher.load(tmp_path)


def test_collect_model_statistics(tiny):
    contexts = [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13]])]
    stats = collect_model_statistics(tiny, contexts, [0, 2])
    assert sorted(stats.layers) == [0, 2] and stats.num_layers == tiny.num_layers
    assert stats.layers[0].keys.count == 9
    assert stats.layers[0].keys.shape == (tiny.fingerprint.num_kv_heads, tiny.fingerprint.head_dim)


def test_quantized_kv_is_refused(pair):
    sender_messages, receiver_messages = pair
    matcher = MomentMatcher.fit(collect_statistics(sender_messages), collect_statistics(receiver_messages))
    message = sender_messages[0]
    packed = KVMessage(message.layers, {**message.keys, 0: object()}, message.values, {}, {},  # type: ignore[dict-item]
                       message.context_length, 0, message.fingerprint)
    with pytest.raises(CalibrationError, match="before quantization"):
        matcher.apply(packed)
    with pytest.raises(CalibrationError, match="before quantization"):
        collect_statistics([packed])
