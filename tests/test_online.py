"""Online recalibration: static when the interval exceeds the run, per-item selection with interval 1."""

from __future__ import annotations

import pytest

import kvcomm.methods.kvcomm as kvcomm_module
import kvcomm.online as online_module
from kvcomm.errors import LayerSelectionError
from kvcomm.methods.kvcomm import KVComm
from kvcomm.online import OnlineKVComm
from kvcomm.selection import attention_importance, calibrate, combine
from kvcomm.tasks.base import Example

ITEMS = [
    Example.qa(context="Bob lives in Ollerby.", question="Where does Bob live?", answers=["Ollerby"],
               id="a", max_new_tokens=4),
    Example.qa(context="Alice's code is 4821. Carol owns a red boat.", question="What is Alice's code?",
               answers=["4821"], id="b", max_new_tokens=4),
    Example.qa(context="Dan was born in 1970.", question="When was Dan born?", answers=["1970"], id="c",
               max_new_tokens=4),
]


@pytest.fixture
def spies(monkeypatch):
    """Counts scoring passes and generations; scoring returns a different ranking on every call."""
    calls = {"importance": [], "generate": 0, "prefill": 0}
    real_generate, real_encode = kvcomm_module.generate, kvcomm_module.encode_context

    def importance(sender, receiver, example, message=None):
        calls["importance"].append(example.id)
        values = attention_importance(sender, receiver, example, message)
        shift = len(calls["importance"])  # rotate so consecutive recalibrations pick different layers
        return values[shift % len(values):] + values[: shift % len(values)]

    def generate(*args, **kwargs):
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    def encode(*args, **kwargs):
        calls["prefill"] += 1
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(online_module, "attention_importance", importance)
    monkeypatch.setattr(kvcomm_module, "generate", generate)
    monkeypatch.setattr(kvcomm_module, "encode_context", encode)
    return calls


def test_interval_longer_than_the_run_equals_the_static_selection(tiny, spies):
    method = OnlineKVComm(tiny, tiny, ratio=0.5, interval=10, initial_layers=(0, 2))
    static = KVComm(tiny, tiny, (0, 2))
    online_answers = [method.answer(item) for item in ITEMS]
    static_answers = [static.answer(item) for item in ITEMS]
    assert [o.answer for o in online_answers] == [s.answer for s in static_answers]
    assert all(o.layers == (0, 2) for o in online_answers)
    assert [o.costs.kv_bytes for o in online_answers] == [s.costs.kv_bytes for s in static_answers]
    assert spies["importance"] == [] and method.recalibrations == [] and method.items_seen == 3


def test_interval_one_recomputes_the_layers_for_every_item_and_answers_once(tiny, spies):
    method = OnlineKVComm(tiny, tiny, ratio=0.5, interval=1, initial_layers=(0, 2))
    outputs = [method.answer(item) for item in ITEMS]
    assert spies["importance"] == ["b", "c"]  # item 0 uses the initial selection
    assert spies["generate"] == len(ITEMS)  # each item is answered exactly once
    assert spies["prefill"] == len(ITEMS)  # and prefilled once by the sender, recalibration items too
    assert outputs[0].layers == (0, 2)
    for output, record in zip(outputs[1:], method.recalibrations):
        assert output.layers == record.layers == record.scores.select(0.5)
    assert [r.item_index for r in method.recalibrations] == [1, 2]
    assert outputs[1].layers != outputs[2].layers  # the spy's rotation really changed the ranking
    full = 2 * 2 * 16 * 4 * tiny.num_layers * outputs[1].costs.sender_prefill_tokens
    assert outputs[1].costs.kv_bytes == full  # scoring needs every layer's KV
    # the recalibrated answer equals KVComm with the new layers
    assert outputs[2].answer == KVComm(tiny, tiny, outputs[2].layers).answer(ITEMS[2]).answer


def test_recalibration_uses_attention_importance_and_combine(tiny, spies):
    method = OnlineKVComm(tiny, tiny, ratio=0.25, interval=2, alpha=0.5, mu=0.2, sigma=1.0)
    method.answer(ITEMS[0])  # no initial selection: the first item recalibrates
    method.answer(ITEMS[1])
    method.answer(ITEMS[2])
    assert spies["importance"] == ["a", "c"]
    record = method.recalibrations[0]
    expected = combine(record.scores.importance, 0.5, 0.2, 1.0)
    assert record.scores.combined == expected.combined and record.layers == expected.select(0.25)
    method.reset()
    assert method.items_seen == 0 and method.layers is None and method.recalibrations == []


def test_invalid_settings_raise(tiny):
    for bad in ({"interval": 0}, {"interval": 1.5}, {"ratio": 0.0}, {"alpha": 2.0}, {"initial_layers": (9,)}):
        options = {"ratio": 0.5, "interval": 3, **bad}
        with pytest.raises(LayerSelectionError):
            OnlineKVComm(tiny, tiny, **options)


def test_from_calibration_uses_the_static_calibration(tiny):
    method = OnlineKVComm.from_calibration(tiny, tiny, ITEMS[:1], ratio=0.5, interval=5)
    assert method.layers == method.initial_layers == calibrate(tiny, tiny, ITEMS[:1]).select(0.5)


def test_importance_from_a_given_all_layer_message_equals_its_own_prefill(tiny):
    from kvcomm.errors import LayerSelectionError
    from kvcomm.message import encode_context
    from kvcomm.prompts import chat_ids

    item = ITEMS[0]
    context = chat_ids(tiny.tokenizer, item.messages["sender"])
    message = encode_context(tiny, context, range(tiny.num_layers), sink_tokens=1)
    given = attention_importance(tiny, tiny, item, message)
    assert given == pytest.approx(attention_importance(tiny, tiny, item), abs=1e-6)
    with pytest.raises(LayerSelectionError, match="every layer"):
        attention_importance(tiny, tiny, item, message.restrict((0, 1)))
