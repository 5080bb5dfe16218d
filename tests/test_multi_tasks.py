"""Two-sender MuSiQue and 2WikiMQA (spec §5.4, §7.4): the halves of the supporting paragraphs / ``Passage N:``
passages, agreement with the single-sender twins, disjoint calibration, other sources and errors. Reads the real files
of the shared data folder."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from kvcomm.errors import TaskError
from kvcomm.tasks import TASKS, get_task
from kvcomm.tasks.base import Example
from kvcomm.tasks.multi import split_passage_context, split_passages
from kvcomm.tasks.sources import hf_shuffled
from tests.conftest import shared_data_dir

DATA = shared_data_dir()
NEW_TASKS = ("musique_2senders", "twowikimqa_2senders")


def rows_of(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def supporting(row: dict) -> list[str]:
    return [p["paragraph_text"].strip() for p in row["paragraphs"] if p["is_supporting"]]


def assert_same_item(two: Example, one: Example) -> None:
    """The two-sender item is its single-sender twin plus ``extra["contexts"]``."""
    assert (two.id, two.context, two.question, two.answers) == (one.id, one.context, one.question, one.answers)
    assert (two.messages, two.max_new_tokens, two.template) == (one.messages, one.max_new_tokens, one.template)
    assert {key: value for key, value in two.extra.items() if key != "contexts"} == one.extra


def assert_disjoint(split) -> None:
    test_ids = [item.id for item in split.test]
    assert len(set(test_ids)) == len(test_ids)
    assert not set(test_ids) & {item.id for item in split.calibration}
    assert not {item.question for item in split.test} & {item.question for item in split.calibration}


def assert_two_parts(item: Example) -> tuple[str, str]:
    parts = item.extra["contexts"]
    assert isinstance(parts, list) and len(parts) == 2 and all(part.strip() for part in parts)
    return parts[0], parts[1]


def test_new_tasks_are_registered_like_hotpotqa_2senders():
    for name in NEW_TASKS:
        task = TASKS[name]
        assert (task.metric, task.truncate, task.needs_data) == ("f1_match", True, True)


# --- MuSiQue --------------------------------------------------------------------------------------------------------


def test_musique_two_senders_halve_the_supporting_paragraphs():
    split = get_task("musique_2senders").load(DATA)
    single = get_task("musique").load(DATA)
    assert (len(split.test), len(split.calibration)) == (200, 100)
    dev = [row for row in hf_shuffled(rows_of("musique_dev_200.jsonl")) if len(supporting(row)) >= 2]
    train = [row for row in rows_of("musique_train_100.jsonl") if len(supporting(row)) >= 2]
    assert [item.id for item in split.test] == [row["id"] for row in dev][:500]
    assert [item.id for item in split.calibration] == [row["id"] for row in train][:100]
    assert_disjoint(split)
    twins = {item.id: item for item in single.test + single.calibration}
    counts = set()
    for row, item in zip(dev + train, split.test + split.calibration):
        facts = supporting(row)
        first, second = assert_two_parts(item)
        middle = len(facts) // 2
        assert first == "\n".join(facts[:middle]) and second == "\n".join(facts[middle:])
        assert first.split("\n") + second.split("\n") == facts  # halves concatenated = supporting texts, in order
        assert item.context == "\n".join(facts) == first + "\n" + second
        assert item.answers == tuple([row["answer"]] + [alias for alias in row["answer_aliases"] if alias])
        assert item.max_new_tokens == 48
        assert_same_item(item, twins[item.id])
        counts.add((len(facts), first.count("\n") + 1, second.count("\n") + 1))
    assert counts == {(2, 1, 1), (3, 1, 2), (4, 2, 2)}  # odd counts: the second sender gets one more


def musique_row(name: str, facts: int) -> dict:
    paragraphs = [{"idx": k, "title": f"T{k}", "paragraph_text": f" {name} fact {k}. ", "is_supporting": k < facts}
                  for k in range(4)]
    return {"id": name, "paragraphs": paragraphs, "question": f"Question {name}?", "answer": name.upper(),
            "answer_aliases": ["", f"alias {name}"]}


def test_musique_two_senders_keep_rows_with_two_facts_after_shuffling(tmp_path):
    dev = [musique_row(f"d{n}", n % 4) for n in range(12)]  # 0, 1, 2, 3 supporting paragraphs in turn
    train = [musique_row(f"t{n}", 1 + n % 3) for n in range(6)]
    write_jsonl(tmp_path / "musique_dev_200.jsonl", dev)
    write_jsonl(tmp_path / "musique_train_100.jsonl", train)
    split = get_task("musique_2senders").load(tmp_path)
    assert [item.id for item in split.test] == [row["id"] for row in hf_shuffled(dev) if len(supporting(row)) >= 2]
    assert [item.id for item in split.calibration] == ["t1", "t2", "t4", "t5"]
    item = next(item for item in split.test if item.id == "d3")
    assert item.extra["contexts"] == ["d3 fact 0.", "d3 fact 1.\nd3 fact 2."]
    assert item.answers == ("D3", "alias d3")


def test_musique_two_senders_read_an_upstream_file_and_the_hf_id(tmp_path, monkeypatch):
    rows = rows_of("musique_dev_200.jsonl") + rows_of("musique_train_100.jsonl")
    rows = [dict(row, id=f"{row['id']}-{n}") for n, row in enumerate(rows * 2)]  # 600 rows, 2-4 facts each
    rows += [dict(musique_row(f"one{n}", 1)) for n in range(50)]  # dropped after shuffling
    path = tmp_path / "musique_ans_v1.0_dev.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    split = get_task("musique_2senders").load(path)
    kept = [row["id"] for row in hf_shuffled(rows) if len(supporting(row)) >= 2]
    assert (len(split.test), len(split.calibration)) == (500, 100)
    assert [item.id for item in split.test] == kept[:500]
    assert [item.id for item in split.calibration] == kept[500:600]
    assert not {item.id for item in split.test} & {item.id for item in split.calibration}  # rows repeat questions

    dev = rows_of("musique_dev_200.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, config=None, split=None, **kwargs:
        dev[:50] if split == "validation" else rows_of("musique_train_100.jsonl")))
    split = get_task("musique_2senders").load("hf:")
    assert [item.id for item in split.test] == [row["id"] for row in hf_shuffled(dev[:50])]
    assert [item.id for item in split.calibration] == [row["id"] for row in hf_shuffled(rows_of(
        "musique_train_100.jsonl"))]


# --- 2WikiMQA -------------------------------------------------------------------------------------------------------


def test_split_passages_keeps_the_header_in_both_halves():
    context = "Header line\nPassage 1:\nA\nalpha, see Passage 3: here\nPassage 2:\nB\nbeta\nPassage 3:\nC\ngamma"
    header, passages = split_passages(context)
    assert header == "Header line\n"
    assert passages == ["Passage 1:\nA\nalpha, see Passage 3: here", "Passage 2:\nB\nbeta", "Passage 3:\nC\ngamma"]
    assert header + "\n".join(passages) == context
    assert split_passage_context(context) == ("Header line\nPassage 1:\nA\nalpha, see Passage 3: here",
                                              "Header line\nPassage 2:\nB\nbeta\nPassage 3:\nC\ngamma")
    assert split_passages("no markers") == ("no markers", [])
    with pytest.raises(TaskError, match="at least 2"):
        split_passage_context("Passage 1:\nonly one")


def test_twowikimqa_two_senders_halve_the_passages():
    split = get_task("twowikimqa_2senders").load(DATA)
    single = get_task("twowikimqa").load(DATA)
    assert (len(split.test), len(split.calibration)) == (164, 20)
    assert [item.id for item in split.test] == [item.id for item in single.test]  # every item has >= 2 passages
    assert [item.id for item in split.calibration] == [item.id for item in single.calibration]
    assert_disjoint(split)
    sizes = set()
    for item, twin in zip(split.test + split.calibration, single.test + single.calibration):
        assert_same_item(item, twin)
        first, second = assert_two_parts(item)
        header, passages = split_passages(item.context)
        count, middle = len(passages), len(passages) // 2
        assert header == "" and "\n".join(passages) == item.context
        assert [int(p.split(":", 1)[0].removeprefix("Passage ")) for p in passages] == list(range(1, count + 1))
        assert first == "\n".join(passages[:middle]) and second == "\n".join(passages[middle:])
        assert first + "\n" + second == item.context  # halves concatenated = the passages, in order
        assert first.startswith("Passage 1:\n") and second.startswith(f"Passage {middle + 1}:\n")
        assert (first.count("\nPassage ") + 1, second.count("\nPassage ") + 1) == (middle, count - middle)
        sizes.add((item.extra["source"], count))
    assert {source for source, _ in sizes} == {"longbench", "2wikimultihopqa"}
    assert {count for _, count in sizes} >= {8, 9, 10}  # LongBench rows hold 8, 9 or 10 passages


def test_twowikimqa_two_senders_skip_items_with_one_passage(tmp_path):
    rows = [{"_id": f"r{n}", "input": f"Q{n}?", "answers": [f"a{n}"],
             "context": "\n".join(f"Passage {k}:\nT{k}\nText {n}.{k}" for k in range(1, 1 + n % 3))}
            for n in range(1, 13)]  # 1, 2, 0 (no marker), 1, 2, ... passages
    rows = [row if row["context"] else dict(row, context="plain text") for row in rows]
    path = write_jsonl(tmp_path / "2wikimqa.jsonl", rows)  # an upstream LongBench file: the last 4 are held out
    split = get_task("twowikimqa_2senders").load(path)
    assert [item.id for item in split.test] == ["r2", "r5", "r8"]
    assert [item.id for item in split.calibration] == ["r11"]
    assert split.test[0].extra["contexts"] == ["Passage 1:\nT1\nText 2.1", "Passage 2:\nT2\nText 2.2"]


# --- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, file_name, field", [
    ("musique_2senders", "musique_dev_200.jsonl", "paragraphs"),
    ("musique_2senders", "musique_dev_200.jsonl", "question"),
    ("twowikimqa_2senders", "longbench_2wikimqa_real.jsonl", "context"),
])
def test_malformed_files_name_the_file_and_fields(tmp_path, name, file_name, field):
    row = rows_of(file_name)[0]
    del row[field]
    path = write_jsonl(tmp_path / file_name, [row])
    with pytest.raises(TaskError) as error:
        get_task(name).load(tmp_path)
    assert str(path) in str(error.value) and field in str(error.value) and "expected fields" in str(error.value)
    path.write_text("{not json\n")
    with pytest.raises(TaskError, match="not valid JSON") as error:
        get_task(name).load(tmp_path)
    assert str(path) in str(error.value)


def test_musique_two_senders_errors_name_the_file(tmp_path):
    path = write_jsonl(tmp_path / "musique_dev_200.jsonl", [dict(musique_row("x", 2), paragraphs="not a list")])
    with pytest.raises(TaskError, match="paragraph_text") as error:
        get_task("musique_2senders").load(tmp_path)
    assert str(path) in str(error.value)
    write_jsonl(path, [musique_row("x", 2)])
    with pytest.raises(TaskError, match="musique_train_100.jsonl"):
        get_task("musique_2senders").load(tmp_path)
    write_jsonl(path, [musique_row("x", 1)])
    write_jsonl(tmp_path / "musique_train_100.jsonl", [musique_row("t", 2)])
    with pytest.raises(TaskError, match="2 or more supporting paragraphs") as error:
        get_task("musique_2senders").load(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(TaskError, match="musique_2senders.*--data-dir"):
        get_task("musique_2senders").load(None)


def test_twowikimqa_two_senders_without_passages_is_an_error(tmp_path):
    rows = [{"_id": f"r{n}", "input": "Q?", "answers": ["a"], "context": "one text, no markers"} for n in range(6)]
    path = write_jsonl(tmp_path / "2wikimqa.jsonl", rows)
    with pytest.raises(TaskError, match="Passage N:") as error:
        get_task("twowikimqa_2senders").load(path)
    assert str(path) in str(error.value)
