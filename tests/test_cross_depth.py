"""Sender and receiver of different depth: layers paired by relative depth, moment matching end to end."""

from __future__ import annotations

import pytest
import torch

from conftest import FACTS_EXAMPLE, context_and_query, receiver_logits, tiny_llama
from kvcomm import _hf
from kvcomm.depth import nearest_sender_layer, receiver_sources
from kvcomm.errors import IncompatibleModelsError, LayerSelectionError
from kvcomm.experiment import QuantOptions, RunOptions, SelectionOptions, choose_layers, fit_matcher, run
from kvcomm.message import encode_context, map_depth, receiver_cache
from kvcomm.methods.qkvcomm import QKVComm
from kvcomm.tasks import get_task


@pytest.fixture(scope="module")
def deep():
    return tiny_llama(seed=1, layers=6, name="tiny-6")


@pytest.fixture(scope="module")
def shallow():
    return tiny_llama(seed=2, layers=4, name="tiny-4")


def test_receiver_sources_pick_the_nearest_sender_layer():
    # 6 -> 4: sender layers 0,1 land on 0 (0 is nearer), 3,4 land on 2 (3 is nearer: |3.5/6-2.5/4| < |4.5/6-2.5/4|)
    assert receiver_sources(range(6), 6, 4) == {0: 0, 1: 2, 2: 3, 3: 5}
    # 4 -> 6: no collisions, receiver layers 0, 2, 3, 5 get sender 0, 1, 2, 3
    assert receiver_sources(range(4), 4, 6) == {0: 0, 2: 1, 3: 2, 5: 3}
    assert [nearest_sender_layer(j, 4, 6) for j in range(6)] == [0, 0, 1, 2, 2, 3]  # receiver layer 1 sits halfway: the tie goes to 0


def test_equal_depth_is_the_identity(tiny):
    context, _ = context_and_query(tiny)
    message = encode_context(tiny, context, (1, 2))
    assert map_depth(message, tiny.fingerprint) is message


def test_deeper_sender_is_mapped_onto_the_receiver_layers(deep, shallow):
    context, _ = context_and_query(deep)
    message = encode_context(deep, context, tuple(range(6)))
    mapped = map_depth(message, shallow.fingerprint)
    assert mapped.layers == (0, 1, 2, 3)
    assert mapped.fingerprint.num_layers == 4
    for receiver_layer, sender_layer in {0: 0, 1: 2, 2: 3, 3: 5}.items():
        assert mapped.keys[receiver_layer] is message.keys[sender_layer]
        assert mapped.values[receiver_layer] is message.values[sender_layer]
    assert not mapped.sink_keys


def test_shallower_sender_fills_unmapped_layers_with_the_nearest_sink(deep, shallow):
    context, _ = context_and_query(shallow)
    message = encode_context(shallow, context, (1, 2), sink_tokens=1)
    mapped = map_depth(message, deep.fingerprint)
    assert mapped.layers == (2, 3)
    assert mapped.keys[2] is message.keys[1] and mapped.keys[3] is message.keys[2]
    assert sorted(mapped.sink_keys) == [0, 1, 4, 5]
    torch.testing.assert_close(mapped.sink_keys[0], message.sink_keys[0])
    torch.testing.assert_close(mapped.sink_keys[1], message.sink_keys[0])
    torch.testing.assert_close(mapped.sink_keys[4], message.keys[2][..., :1, :])  # nearest sender layer was sent in full
    torch.testing.assert_close(mapped.sink_keys[5], message.sink_keys[3])


def test_cross_depth_cache_holds_the_mapped_kv_and_changes_the_answer(deep, shallow):
    context, query = context_and_query(shallow)
    message = encode_context(deep, context, tuple(range(6)))
    with pytest.raises(IncompatibleModelsError, match="map-depth"):
        receiver_cache(message, shallow)
    cache = receiver_cache(message, shallow, cross_depth=True)
    assert len(cache.layers) == 4
    for receiver_layer, sender_layer in {0: 0, 1: 2, 2: 3, 3: 5}.items():
        keys, values = _hf.cache_layer_kv(cache, receiver_layer)
        torch.testing.assert_close(keys, message.keys[sender_layer])
        torch.testing.assert_close(values, message.values[sender_layer])
    with_kv = receiver_logits(shallow, map_depth(message, shallow.fingerprint), query)
    empty = encode_context(deep, context, (), sink_tokens=0)
    without_kv = receiver_logits(shallow, map_depth(empty, shallow.fingerprint), query)
    assert (with_kv - without_kv).abs().max() > 1e-3


def test_qkvcomm_across_depths_with_moment_matching(deep, shallow):
    from kvcomm.quant import KVQuantConfig

    split = get_task("demo").load()
    with pytest.raises(IncompatibleModelsError):
        QKVComm(deep, shallow, (0, 3, 5), quant=None)
    matcher = fit_matcher(deep, shallow, split.calibration[:3], (0, 3, 5), "per_dimension")
    assert matcher.layer_map == {0: 0, 3: 2, 5: 3}
    plain = QKVComm(deep, shallow, (0, 3, 5), quant=KVQuantConfig(8, 8), map_depth=True)
    matched = QKVComm(deep, shallow, (0, 3, 5), quant=KVQuantConfig(8, 8), matcher=matcher, map_depth=True)
    plain_out, matched_out = plain.answer(FACTS_EXAMPLE), matched.answer(FACTS_EXAMPLE)
    assert plain_out.layers == matched_out.layers == (0, 3, 5)  # sender layers sent
    packet_plain, _ = plain.send(FACTS_EXAMPLE)
    packet_matched, _ = matched.send(FACTS_EXAMPLE)
    assert packet_plain.payload != packet_matched.payload  # matching changed what is sent


def test_harness_runs_qkvcomm_across_depths(deep, shallow, tmp_path):
    options = RunOptions(method="qkvcomm", task="demo", limit=2, selection=SelectionOptions(layers="0,3,5"),
                         quant=QuantOptions(bits=8, match="scalar", match_samples=2, map_depth=True))
    summary = run(options, tmp_path, progress=False, models=(deep, shallow))
    assert summary["n"] == 2 and summary["errors"] == 0
    assert summary["layers"] == [0, 3, 5]


def test_calibrated_selection_needs_equal_depth(deep, shallow):
    split = get_task("demo").load()
    with pytest.raises(LayerSelectionError, match="same depth"):
        choose_layers(deep, shallow, split, SelectionOptions(ratio=0.5))
    layers, _ = choose_layers(deep, shallow, split, SelectionOptions(ratio=0.5, strategy="random"))
    assert len(layers) == 3 and max(layers) < 6


def test_bad_match_option_is_refused():
    from kvcomm.errors import KVCommError

    with pytest.raises(KVCommError, match="--match"):
        QuantOptions(match="zscore")
