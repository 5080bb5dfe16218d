"""Several senders: merging messages, single-sender equivalence with KVComm, importance, two-sender HotpotQA items."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kvcomm.errors import LayerSelectionError, PromptError, TaskError
from kvcomm.message import encode_context, receiver_cache
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.multi import attention_importance_multi, calibrate_multi, merge_messages, sender_prompts
from kvcomm.prompts import chat_ids
from kvcomm.quant import KVQuantConfig, quantize_message
from kvcomm.selection import attention_importance
from kvcomm.tasks.base import Example
from kvcomm.tasks.multi import load_hotpotqa_two_senders, split_halves, two_sender_item
from tests.conftest import shared_data_dir

FACTS = ["Bob lives in Ollerby.", "Alice's code is 4821.", "Carol owns a red boat.", "Dan was born in 1970."]
BASE = Example.qa(context=" ".join(FACTS), question="What is Alice's code?", answers=["4821"], max_new_tokens=8,
                  answer_prefix="Alice's code is")
SINGLE = dataclasses.replace(BASE, extra={"contexts": [BASE.context]})
TWO = dataclasses.replace(BASE, extra={"contexts": [" ".join(FACTS[:2]), " ".join(FACTS[2:])]})


def _logits(model, message, query):
    mask = torch.ones(1, message.context_length + query.shape[-1], dtype=torch.long)
    with torch.no_grad():
        return model.model(input_ids=query, attention_mask=mask, cache=receiver_cache(message, model)).logits


def _query(model, example):
    return chat_ids(model.tokenizer, example.messages["receiver"], example.answer_prefix)


def test_sender_prompts_replace_the_context_by_each_part():
    assert sender_prompts(SINGLE) == [BASE.messages["sender"]]
    first, second = sender_prompts(TWO)
    assert first.endswith("Context: Bob lives in Ollerby. Alice's code is 4821.")
    assert second.endswith("Context: Carol owns a red boat. Dan was born in 1970.")
    explicit = dataclasses.replace(TWO, extra={**TWO.extra, "sender_messages": ["a", "b"]})
    assert sender_prompts(explicit) == ["a", "b"]
    for bad in ({}, {"contexts": []}, {"contexts": ["x", " "]}, {"contexts": ["x"], "sender_messages": ["a", "b"]}):
        with pytest.raises(PromptError):
            sender_prompts(dataclasses.replace(BASE, extra=bad))


@pytest.mark.parametrize("layers", [(0, 2), (1,), (0, 1, 2, 3)])
def test_one_sender_equals_kvcomm(tiny, layers):
    multi = MultiSenderKVComm([tiny], tiny, layers)
    single = KVComm(tiny, tiny, layers)
    merged, _ = multi.send(SINGLE)
    message, _ = single.send(SINGLE)
    assert merged.context_length == message.context_length and merged.layers == message.layers
    query = _query(tiny, SINGLE)
    assert torch.equal(_logits(tiny, merged, query), _logits(tiny, message, query))
    if layers == (0, 2):  # generation is the slow part: compare whole answers once
        ours, theirs = multi.answer(SINGLE), single.answer(SINGLE)
        assert ours.answer == theirs.answer and ours.costs.kv_bytes == theirs.costs.kv_bytes
        assert ours.costs.sender_prefill_tokens == theirs.costs.sender_prefill_tokens


def test_merged_message_concatenates_senders_and_keeps_the_first_sink(tiny):
    parts = [chat_ids(tiny.tokenizer, prompt) for prompt in sender_prompts(TWO)]
    first, second = (encode_context(tiny, ids, (0, 2), sink_tokens=1) for ids in parts)
    merged = merge_messages([first, second])
    assert merged.context_length == parts[0].shape[-1] + parts[1].shape[-1]
    assert torch.equal(merged.keys[2], torch.cat([first.keys[2], second.keys[2]], dim=-2))
    assert torch.equal(merged.values[0][..., first.context_length:, :], second.values[0])
    assert set(merged.sink_keys) == {1, 3} and torch.equal(merged.sink_keys[1], first.sink_keys[1])
    quantized = merge_messages([quantize_message(first, KVQuantConfig(8, 8)), second])
    assert quantized.keys[0].shape == merged.keys[0].shape
    with pytest.raises(LayerSelectionError):
        merge_messages([first, encode_context(tiny, parts[1], (0, 1))])
    with pytest.raises(LayerSelectionError):
        merge_messages([])


def test_two_senders_merge_to_the_summed_length_and_the_receiver_answers(tiny):
    method = MultiSenderKVComm([tiny, tiny], tiny, (0, 2))
    merged, seconds = method.send(TWO)
    lengths = [chat_ids(tiny.tokenizer, prompt).shape[-1] for prompt in sender_prompts(TWO)]
    assert merged.context_length == sum(lengths) and seconds >= 0
    assert merged.keys[0].shape == (1, 2, sum(lengths), 16)
    output = method.answer(TWO)
    assert isinstance(output.answer, str) and output.layers == (0, 2)
    assert output.costs.sender_prefill_tokens == sum(lengths) and output.costs.kv_bytes == merged.nbytes
    query = _query(tiny, TWO)
    one = KVComm(tiny, tiny, (0, 2)).send(dataclasses.replace(TWO, extra={}))[0]
    assert (_logits(tiny, merged, query) - _logits(tiny, one, query)).abs().max().item() > 1e-4
    with pytest.raises(PromptError, match="3 senders"):
        MultiSenderKVComm([tiny, tiny, tiny], tiny, (0,)).answer(TWO)


def test_importance_over_all_senders_lies_in_unit_interval(tiny):
    two = attention_importance_multi([tiny, tiny], tiny, TWO)
    assert len(two) == tiny.num_layers and all(0.0 <= value <= 1.0 for value in two)
    one = attention_importance_multi([tiny], tiny, SINGLE)
    assert one == pytest.approx(attention_importance(tiny, tiny, SINGLE), abs=1e-6)
    scores = calibrate_multi([tiny, tiny], tiny, [TWO])
    assert scores.importance == pytest.approx(two) and len(scores.select(0.5)) == 2


def test_halves_and_two_sender_items():
    assert split_halves(["a", "b", "c"]) == (["a"], ["b", "c"])
    with pytest.raises(TaskError):
        split_halves(["a"])
    item = two_sender_item("x", FACTS, "What is Alice's code?", ["4821"])
    assert item.context == "\n".join(FACTS)
    assert item.extra["contexts"] == ["\n".join(FACTS[:2]), "\n".join(FACTS[2:])]


def _row(index: int, facts: int) -> dict:
    sentences = [f"Sentence {index}.{k}." for k in range(3)]
    return {"id": f"r{index}", "question": f"Question {index}?", "answer": "yes",
            "supporting_facts": {"title": ["T"] * facts, "sent_id": list(range(facts))},
            "context": {"title": ["T", "U"], "sentences": [sentences, ["Distractor."]]}}


def test_hotpotqa_two_sender_split_keeps_items_with_two_facts(tmp_path, monkeypatch):
    monkeypatch.setattr("kvcomm.tasks.multi.HOTPOTQA_TEST_SIZE", 3)
    rows = [_row(0, 2), _row(1, 1), _row(2, 3), _row(3, 2), _row(4, 1)]
    (tmp_path / "hotpotqa_dev_distractor_seed42_600.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    split = load_hotpotqa_two_senders(tmp_path)
    assert [item.id for item in split.test] == ["r0", "r2"] and [item.id for item in split.calibration] == ["r3"]
    assert split.test[1].extra["contexts"] == ["Sentence 2.0.", "Sentence 2.1.\nSentence 2.2."]
    assert split.test[1].context == "Sentence 2.0.\nSentence 2.1.\nSentence 2.2."


def test_real_hotpotqa_file_gives_500_two_sender_items():
    data_dir = shared_data_dir()  # CI always has ../shared/data beside the clone; a missing file must fail
    split = load_hotpotqa_two_senders(data_dir)
    assert len(split.test) == 500  # every paper test item has at least two supporting sentences (KVCOMM.md §7.1)
    assert all(len(item.extra["contexts"]) == 2 for item in split.test + split.calibration)


def test_two_sender_task_is_registered():
    from conftest import shared_data_dir
    from kvcomm.tasks import get_task

    split = get_task("hotpotqa_2senders").load(shared_data_dir())
    item = split.test[0]
    first, second = item.extra["contexts"]
    assert item.context == first + "\n" + second
    assert len(split.test) == 500 and not {e.id for e in split.test} & {e.id for e in split.calibration}
