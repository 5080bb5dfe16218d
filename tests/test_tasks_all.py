"""The eight paper tasks: sizes, disjoint calibration, exact prompts, seed-42 sampling, other sources, errors and
truncation. Reads the real files of the shared data folder."""

from __future__ import annotations

import dataclasses

import json
import sys
import types
from pathlib import Path

import pytest

from kvcomm.errors import PromptError, TaskError
from kvcomm.prompts import MATH_INSTRUCTION, QA_INSTRUCTION
from kvcomm.tasks import TASKS, get_task
from kvcomm.tasks.base import Example
from kvcomm.tasks.longform import render_passages, split_scrolls_input
from kvcomm.tasks.sources import hf_shuffle_order, hf_shuffled
from kvcomm.tasks.truncate import prompt_tokens, truncate_example
from tests.conftest import byte_tokenizer, shared_data_dir

DATA = shared_data_dir()


def rows_of(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- registry and seed-42 order -------------------------------------------------------------------------------------


def test_registry_names_metrics_and_truncation():
    assert set(TASKS) == {"demo", "countries", "tipsheets", "hotpotqa", "qasper", "musique", "multifieldqa_en",
                          "twowikimqa", "tmath", "hotpotqa_2senders", "musique_2senders", "twowikimqa_2senders"}
    metrics = {name: task.metric for name, task in TASKS.items()}
    assert metrics.pop("demo") == "contains" and metrics.pop("tmath") == "rouge_l_recall"
    assert set(metrics.values()) == {"f1_match"}
    truncating = {name for name, task in TASKS.items() if task.truncate}
    assert truncating == {"hotpotqa", "qasper", "musique", "multifieldqa_en", "twowikimqa", "tmath",
                          "hotpotqa_2senders", "musique_2senders", "twowikimqa_2senders"}


def test_seed42_order_reproduces_the_hotpotqa_file():
    rows = rows_of("hotpotqa_dev_distractor_seed42_600.jsonl")
    order = hf_shuffle_order(7405)
    assert sorted(order) == list(range(7405))
    assert [row["seed42_perm_rank"] for row in rows] == list(range(600))
    assert [order[row["seed42_perm_rank"]] for row in rows] == [row["hf_validation_index"] for row in rows]
    assert hf_shuffled(list(range(7405)))[:600] == [row["hf_validation_index"] for row in rows]
    assert hf_shuffle_order(5) == hf_shuffle_order(5) and hf_shuffle_order(0) == []


@pytest.mark.parametrize("name, test_size, calibration_size, max_new_tokens", [
    ("qasper", 132, 20, 128), ("musique", 200, 100, 48), ("multifieldqa_en", 30, 4, 64),
    ("twowikimqa", 164, 20, 32), ("tmath", 300, 50, 256), ("hotpotqa", 500, 100, 48),
])
def test_tasks_load_with_sizes_and_disjoint_calibration(name, test_size, calibration_size, max_new_tokens):
    split = get_task(name).load(DATA)
    assert (len(split.test), len(split.calibration)) == (test_size, calibration_size)
    test_ids = [item.id for item in split.test]
    assert len(set(test_ids)) == len(test_ids)
    assert not set(test_ids) & {item.id for item in split.calibration}
    assert not {item.question for item in split.test} & {item.question for item in split.calibration}
    assert {item.max_new_tokens for item in split.test + split.calibration} == {max_new_tokens}
    assert all(item.answers and all(item.answers) for item in split.test)
    again = get_task(name).load(str(DATA))
    assert [item.id for item in again.test] == test_ids  # deterministic


# --- prompts and per-task content -----------------------------------------------------------------------------------


def qa_messages(context: str, question: str) -> dict[str, str]:
    return {"sender": f"Instruction: {QA_INSTRUCTION} Context: {context}",
            "receiver": f"Instruction: {QA_INSTRUCTION} Question: {question}",
            "skyline": f"Instruction: {QA_INSTRUCTION} Context: {context} Question: {question}",
            "baseline": f"Instruction: {QA_INSTRUCTION} Question: {question}"}


def test_qasper_items_papers_and_prompts():
    split = get_task("qasper").load(DATA)
    rows = rows_of("qasper_leval_23papers.jsonl")
    by_doc = {row["doc_index"]: row for row in rows}
    assert {item.extra["paper"] for item in split.calibration} == {18, 19}
    assert not {item.context for item in split.test} & {item.context for item in split.calibration}
    assert len(split.test) + len(split.calibration) == 152  # 184 questions, 32 asked again about the same paper
    first = by_doc[0]["qas"]
    merged = next(item for item in split.test if item.id == first[4]["id"])
    assert merged.question == "What features are extracted?" == first[5]["question"]
    assert merged.answers == (first[4]["answers"][0], first[5]["answers"][0])
    item = split.test[0]
    assert item.context == by_doc[item.extra["paper"]]["context"]
    assert item.messages == qa_messages(item.context, item.question)
    assert item.template == "qa" and item.instruction == QA_INSTRUCTION


def test_musique_supporting_paragraphs_and_answers():
    split = get_task("musique").load(DATA)
    dev = rows_of("musique_dev_200.jsonl")
    shuffled = hf_shuffled(dev)
    assert [item.id for item in split.test] == [row["id"] for row in shuffled]
    row, item = shuffled[0], split.test[0]
    supporting = [p["paragraph_text"].strip() for p in row["paragraphs"] if p["is_supporting"]]
    assert item.context == "\n".join(supporting) and len(supporting) >= 2
    assert item.answers == tuple([row["answer"]] + row["answer_aliases"])
    assert item.messages == qa_messages(item.context, row["question"])
    assert [c.id for c in split.calibration] == [r["id"] for r in rows_of("musique_train_100.jsonl")]


def test_multifieldqa_en_holds_out_the_last_rows():
    split = get_task("multifieldqa_en").load(DATA)
    rows = rows_of("longbench_multifieldqa_en_real.jsonl")
    assert [item.id for item in split.test] == [row["_id"] for row in rows[:-4]]
    assert [item.id for item in split.calibration] == [row["_id"] for row in rows[-4:]]
    item = split.test[0]
    assert item.question == rows[0]["input"] and item.answers == tuple(rows[0]["answers"])
    assert item.messages == qa_messages(rows[0]["context"], rows[0]["input"])


def test_twowikimqa_combines_longbench_and_the_rendered_substitute():
    split = get_task("twowikimqa").load(DATA)
    real = rows_of("longbench_2wikimqa_real.jsonl")
    substitute = hf_shuffled(rows_of("2wikimultihopqa_dev_164.jsonl"))
    assert [item.id for item in split.test[:20]] == [row["_id"] for row in real]
    assert {item.extra["source"] for item in split.test[:20]} == {"longbench"}
    assert [item.id for item in split.test[20:]] == [row["_id"] for row in substitute[:144]]
    assert [item.id for item in split.calibration] == [row["_id"] for row in substitute[144:]]
    rendered, row = split.test[20], substitute[0]
    title, sentences = row["context"][0]
    assert rendered.context.startswith(f"Passage 1:\n{title}\n{' '.join(sentences)}\nPassage 2:\n")
    assert rendered.answers == (row["answer"],) and rendered.messages == qa_messages(rendered.context, row["question"])


def test_render_passages_hand_example():
    context = [["Alpha", ["A one.", "A two."]], ["Beta", ["B one."]]]
    assert render_passages(context, "x") == "Passage 1:\nAlpha\nA one. A two.\nPassage 2:\nBeta\nB one."
    with pytest.raises(TaskError, match="title"):
        render_passages([["Alpha", "not a list"]], "x")


def test_tmath_sample_and_math_prompts():
    split = get_task("tmath").load(DATA)
    rows = rows_of("tmath.jsonl")
    assert len(rows) == 4043
    order = hf_shuffle_order(4043)
    assert [item.id for item in split.test] == [rows[i]["id"] for i in order[:300]]
    assert [item.id for item in split.calibration] == [rows[i]["id"] for i in order[300:350]]
    item, row = split.test[0], rows[order[0]]
    hint = row["socratic_questions"].strip()
    assert item.messages == {
        "sender": f"Instruction: {MATH_INSTRUCTION} Hint: {hint}",
        "receiver": f"Instruction: {MATH_INSTRUCTION} Question: {row['problem']}",
        "skyline": f"Instruction: {MATH_INSTRUCTION} Hint: {hint} Question: {row['problem']}",
        "baseline": f"Instruction: {MATH_INSTRUCTION} Question: {row['problem']}",
    }
    assert item.answers == (row["solution"],) and item.template == "math"
    assert MATH_INSTRUCTION == "Answer the math problem step by step."


# --- upstream originals and Hugging Face ids ------------------------------------------------------------------------


def test_qasper_reads_the_scrolls_schema(tmp_path):
    rows = [{"id": f"q{n % 7}", "pid": f"p{n}", "input": f"Question {n}?\n\nPaper {n % 7} text.\n\nMore.",
             "output": f"answer {n}"} for n in range(40)]
    split = get_task("qasper").load(write_jsonl(tmp_path / "qasper_validation.jsonl", rows))
    assert len(split.test) == 40 and split.calibration == []  # every paper is a test paper
    by_pid = {row["pid"]: row for row in rows}
    assert [item.id for item in split.test] == [rows[i]["pid"] for i in hf_shuffle_order(40)]
    item = split.test[0]
    assert (item.question, item.answers) == (by_pid[item.id]["input"].split("\n\n")[0], (by_pid[item.id]["output"],))
    assert item.context.endswith("text.\n\nMore.") and item.max_new_tokens == 128
    assert split_scrolls_input("Q?\n\nA\n\nB", "x") == ("Q?", "A\n\nB")
    with pytest.raises(TaskError, match="blank line"):
        split_scrolls_input("no separator", "x")


def test_musique_reads_an_upstream_json_array(tmp_path):
    rows = rows_of("musique_dev_200.jsonl") + rows_of("musique_train_100.jsonl")
    rows = [dict(row, id=f"{row['id']}-{n}") for n, row in enumerate(rows * 2)]  # 600 rows
    path = tmp_path / "musique_ans_v1.0_dev.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    split = get_task("musique").load(path)
    assert (len(split.test), len(split.calibration)) == (500, 100)
    assert [item.id for item in split.test] == [row["id"] for row in hf_shuffled(rows)[:500]]


def test_longbench_reupload_schema_and_original_2wiki(tmp_path):
    rows = [{"_id": f"r{n}", "question": f"Q{n}?", "context": f"Passage 1:\nT\nText {n}.", "answers": [f"a{n}"]}
            for n in range(10)]
    split = get_task("multifieldqa_en").load(write_jsonl(tmp_path / "multifieldqa_en.jsonl", rows))
    assert [item.id for item in split.test] == [f"r{n}" for n in range(6)]
    assert [item.id for item in split.calibration] == [f"r{n}" for n in range(6, 10)]
    assert split.test[0].question == "Q0?"
    wiki = rows_of("2wikimultihopqa_dev_164.jsonl")
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(wiki), encoding="utf-8")
    split = get_task("twowikimqa").load(path)
    assert (len(split.test), len(split.calibration)) == (164, 0)
    assert split.test[0].context.startswith("Passage 1:\n")


def test_tmath_reads_the_upstream_folder_in_numeric_order(tmp_path):
    for domain in ("geometry", "algebra"):
        for n in (10, 9, 100):
            folder = tmp_path / "TMATH" / domain
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"hint_{n}.json").write_text(json.dumps(
                {"problem": f"P {domain} {n}", "level": "Level 1", "type": domain, "solution": f"S {n}",
                 "socratic_questions": f"1. hint {n}?"}), encoding="utf-8")
    (tmp_path / "TMATH" / "README.md").write_text("not a record")
    split = get_task("tmath").load(tmp_path)
    files = ["algebra/hint_9", "algebra/hint_10", "algebra/hint_100", "geometry/hint_9", "geometry/hint_10",
             "geometry/hint_100"]
    assert [item.id for item in split.test] == [files[i] for i in hf_shuffle_order(6)]
    assert split.test[0].messages["sender"].endswith("Hint: 1. hint " + split.test[0].id.split("_")[-1] + "?")


def test_hotpotqa_reads_the_official_file_and_the_hf_id(tmp_path, monkeypatch):
    rows = rows_of("hotpotqa_dev_distractor_seed42_600.jsonl")
    official = [{"_id": row["id"], "question": row["question"], "answer": row["answer"],
                 "supporting_facts": [list(pair) for pair in zip(*row["supporting_facts"].values())],
                 "context": [list(pair) for pair in zip(row["context"]["title"], row["context"]["sentences"])]}
                for row in rows]
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps(official), encoding="utf-8")
    local = get_task("hotpotqa").load(DATA)
    upstream = get_task("hotpotqa").load(path)
    by_id = {item.id: item for item in local.test + local.calibration}
    assert [item.id for item in upstream.test] == [row["id"] for row in hf_shuffled(rows)[:500]]
    assert all(item.context == by_id[item.id].context for item in upstream.test + upstream.calibration)
    # the full validation split in HF order: shuffle(seed=42) must give the file's rows 0-499 as the test set
    validation = [dict(rows[0], id=f"other-{n}") for n in range(7405)]
    for row in rows:
        validation[row["hf_validation_index"]] = row
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: validation))
    split = get_task("hotpotqa").load("hf:")
    assert [item.id for item in split.test] == [item.id for item in local.test]
    assert [item.id for item in split.calibration] == [item.id for item in local.calibration]


def test_hf_ids_use_datasets_only_when_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(TaskError, match="datasets"):
        get_task("musique").load("hf:")
    calls = []
    musique = rows_of("musique_dev_200.jsonl")

    def load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        if name == "Xnhyacinth/LongBench":
            return [dict(row, question=row.pop("input")) for row in rows_of("longbench_2wikimqa_real.jsonl")]
        return musique[:50] if split == "validation" else rows_of("musique_train_100.jsonl")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    split = get_task("musique").load("hf:")
    assert calls == [("dgslibisey/MuSiQue", None, "validation"), ("dgslibisey/MuSiQue", None, "train")]
    assert [item.id for item in split.test] == [row["id"] for row in hf_shuffled(musique[:50])]
    calls.clear()
    split = get_task("twowikimqa").load("hf:Xnhyacinth/LongBench")
    assert calls == [("Xnhyacinth/LongBench", "2wikimqa", "test")]
    assert (len(split.test), len(split.calibration)) == (16, 4) and split.test[0].question.endswith("?")
    with pytest.raises(TaskError, match="Hugging Face"):
        get_task("tmath").load("hf:")


# --- malformed inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, file_name, field", [
    ("qasper", "qasper_leval_23papers.jsonl", "qas"), ("musique", "musique_dev_200.jsonl", "paragraphs"),
    ("multifieldqa_en", "longbench_multifieldqa_en_real.jsonl", "answers"),
    ("twowikimqa", "longbench_2wikimqa_real.jsonl", "context"), ("tmath", "tmath.jsonl", "socratic_questions"),
])
def test_malformed_files_name_the_file_and_fields(tmp_path, name, file_name, field):
    row = rows_of(file_name)[0]
    del row[field]
    path = write_jsonl(tmp_path / file_name, [row])
    with pytest.raises(TaskError) as error:
        get_task(name).load(tmp_path)
    assert str(path) in str(error.value) and field in str(error.value) and "expected fields" in str(error.value)
    path.write_text("{not json\n")
    with pytest.raises(TaskError, match="not valid JSON"):
        get_task(name).load(tmp_path)


def test_missing_data_names_the_file(tmp_path):
    with pytest.raises(TaskError, match="qasper_leval_23papers.jsonl"):
        get_task("qasper").load(tmp_path)
    with pytest.raises(TaskError, match="tmath.jsonl"):
        get_task("tmath").load(tmp_path)
    with pytest.raises(TaskError, match="does-not-exist"):
        get_task("musique").load(tmp_path / "does-not-exist.json")
    with pytest.raises(TaskError, match="--data-dir"):
        get_task("twowikimqa").load(None)
    (tmp_path / "musique_dev_200.jsonl").write_text((DATA / "musique_dev_200.jsonl").read_text(encoding="utf-8"))
    with pytest.raises(TaskError, match="musique_train_100.jsonl"):
        get_task("musique").load(tmp_path)
    bad = tmp_path / "scrolls.json"
    bad.write_text(json.dumps([{"id": "x", "input": "Q?\n\nP", "output": "a"}, ["not", "an", "object"]]))
    with pytest.raises(TaskError, match="record 2 is not a JSON object"):
        get_task("qasper").load(bad)


# --- truncation -----------------------------------------------------------------------------------------------------


def test_truncation_keeps_head_and_tail_and_fits():
    tokenizer = byte_tokenizer()  # one token per byte
    context = "HEAD-START " + "middle filler. " * 200 + " TAIL-END"
    example = Example.qa(context=context, question="What is at the end?", answers=["TAIL"], id="long",
                         answer_prefix="It is")
    before = prompt_tokens(example, tokenizer)
    assert before > 1000
    cut = truncate_example(example, tokenizer, 800)
    assert prompt_tokens(cut, tokenizer) <= 800
    assert cut.context.startswith("HEAD-START") and cut.context.endswith("TAIL-END")
    assert len(cut.context) < len(context) and cut.extra["truncated"] is True
    kept = cut.extra["context_tokens"][1]
    assert cut.context == context[:kept - kept // 2] + context[len(context) - kept // 2:]
    assert cut.messages == qa_messages(cut.context, example.question)
    assert (cut.answer_prefix, cut.answers, cut.id) == ("It is", ("TAIL",), "long")
    assert truncate_example(example, tokenizer, before) is example  # fits: unchanged
    assert "truncated" not in example.extra


def test_truncation_cuts_every_sender_part_to_the_same_fraction():
    tokenizer = byte_tokenizer()
    first, second = "A-START " + "alpha. " * 150 + " A-END", "B-START " + "beta gamma. " * 60 + " B-END"
    item = dataclasses.replace(Example.qa(context=first + "\n" + second, question="Which?", answers=["A"], id="two"),
                               extra={"contexts": [first, second]})
    cut = truncate_example(item, tokenizer, 600)
    kept, before = cut.extra["context_tokens"][1], cut.extra["context_tokens"][0]
    parts = cut.extra["contexts"]
    assert [len(part) for part in parts] == [len(first) * kept // before, len(second) * kept // before]
    assert parts[0].startswith("A-START") and parts[0].endswith("A-END")
    assert parts[1].startswith("B-START") and parts[1].endswith("B-END")
    assert sum(len(part) for part in parts) <= kept
    assert item.extra["contexts"] == [first, second]  # the original is untouched
    assert "contexts" not in truncate_example(dataclasses.replace(item, extra={}), tokenizer, 600).extra


def test_truncation_rebuilds_math_prompts_and_real_items():
    tokenizer = byte_tokenizer()
    item = get_task("tmath").load(DATA).test[0]
    limit = prompt_tokens(item, tokenizer) - 200
    cut = truncate_example(item, tokenizer, limit)
    assert prompt_tokens(cut, tokenizer) <= limit and cut.template == "math"
    assert cut.messages["sender"] == f"Instruction: {MATH_INSTRUCTION} Hint: {cut.context}"
    assert cut.context[:40] == item.context[:40] and cut.context[-40:] == item.context[-40:]
    paper = get_task("qasper").load(DATA).test[0]
    cut = truncate_example(paper, tokenizer, 4000)
    assert prompt_tokens(cut, tokenizer) <= 4000 and cut.context[-100:] == paper.context[-100:]
    with pytest.raises(PromptError, match="max_input_tokens"):
        truncate_example(paper, tokenizer, 100)
    with pytest.raises(PromptError):
        truncate_example(paper, tokenizer, 0)


def test_example_copies_keep_the_template():
    item = Example.math(hint="h", problem="p", answers=["s"])
    prefixed = item.with_answer_prefix("The answer is:")
    assert prefixed.template == "math" and prefixed.answer_prefix == "The answer is:"
    assert item.with_context("new hint").messages["skyline"] == f"Instruction: {MATH_INSTRUCTION} Hint: new hint " \
                                                                "Question: p"
