"""Long-context QA tasks of the paper (``KVCOMM.md`` §7.1): Qasper, MuSiQue, MultiFieldQA-en and 2WikiMQA.

All four use the QA templates (:func:`kvcomm.prompts.role_messages`): the sender gets the context, the receiver the
question. ``data_dir`` may name the folder of ``shared/data`` (local files below), an upstream file in the original
schema, or ``hf:[id]`` (see :mod:`kvcomm.tasks.sources`). "seed-42 order" is Hugging Face ``shuffle(seed=42)``.
The two-sender splits of MuSiQue and 2WikiMQA (:mod:`kvcomm.tasks.multi`) reuse these sources and splits.

Qasper (128 new tokens; gold = the answers)
    * local ``qasper_leval_23papers.jsonl`` (L-Eval's 23 Qasper papers, three of them listed twice; 184 questions):
      one item per distinct (paper text, question), 152 in all; a question listed again (another annotator's answer,
      or a repeated paper) adds its answers to the gold list (max over answers when scoring). Calibration
      = every question of the last :data:`QASPER_CALIBRATION_PAPERS` distinct papers (file order); test = the
      questions of the other papers in seed-42 order, at most 500. Calibration and test never share a paper.
    * upstream SCROLLS ``qasper`` (``id``, ``input``, ``output``; ``hf:`` = ``tau/scrolls``, validation): question =
      ``input`` before the first blank line, paper = the rest, gold = ``[output]``; test = rows 0–499 of the seed-42
      order; calibration = the next rows whose paper is not a test paper (at most :data:`CALIBRATION_SIZE`).
MuSiQue (48 new tokens; sender = supporting paragraphs joined by "\\n"; gold = ``[answer] + answer_aliases``)
    * local: test = ``musique_dev_200.jsonl`` in seed-42 order (the 200 rows; not the paper's sample); calibration =
      ``musique_train_100.jsonl`` (train questions, never test).
    * upstream MuSiQue-Ans file: test = rows 0–499 of the seed-42 order, calibration = the next 100 rows;
      ``hf:`` = ``dgslibisey/MuSiQue``: test from validation, calibration from the first 100 train rows (seed-42).
    Rows without a supporting paragraph are skipped (logged) after shuffling.
MultiFieldQA-en (64 new tokens; LongBench schema, question = ``input``, or ``question`` in the re-upload)
    * local ``longbench_multifieldqa_en_real.jsonl`` or an upstream LongBench file (``hf:`` = ``Xnhyacinth/LongBench``,
      config ``multifieldqa_en``, test): LongBench has no other split, so the last :data:`LONGBENCH_HOLDOUT` rows (file
      order) are held out for calibration and the rest are evaluated in file order (30 of 34 local, 146 of 150).
2WikiMQA (32 new tokens)
    * local: test = all rows of ``longbench_2wikimqa_real.jsonl`` (20 real LongBench rows) followed by the substitute
      ``2wikimultihopqa_dev_164.jsonl`` rendered LongBench-style (``Passage {i}:\\n{title}\\n{sentences}`` joined by
      "\\n") in seed-42 order, up to 200 items; the last :data:`TWOWIKI_CALIBRATION` substitute rows of that order are
      the calibration set (test = 20 + 144 = 164). ``extra["source"]`` says which file an item came from.
    * an upstream LongBench ``2wikimqa`` file or ``hf:`` (``Xnhyacinth/LongBench``, ``2wikimqa``): as MultiFieldQA-en;
      an upstream 2WikiMultihopQA file (``_id``, ``question``, ``context`` list, ``answer``): rendered, test = rows
      0–199 of the seed-42 order, calibration = the next 20.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl
from kvcomm.tasks.sources import Source, hf_shuffled, load_hf_rows, read_records, resolve_source, upstream_file

logger = logging.getLogger(__name__)

CALIBRATION_SIZE = 100

QASPER_FILE = "qasper_leval_23papers.jsonl"
QASPER_HF = "tau/scrolls"
QASPER_TEST_SIZE = 500
QASPER_MAX_NEW_TOKENS = 128
QASPER_CALIBRATION_PAPERS = 2
QASPER_LOCAL_FIELDS = ("doc_index", "context", "qas")
QASPER_SCROLLS_FIELDS = ("id", "input", "output")

MUSIQUE_FILE = "musique_dev_200.jsonl"
MUSIQUE_TRAIN_FILE = "musique_train_100.jsonl"
MUSIQUE_HF = "dgslibisey/MuSiQue"
MUSIQUE_TEST_SIZE = 500
MUSIQUE_MAX_NEW_TOKENS = 48
MUSIQUE_FIELDS = ("id", "paragraphs", "question", "answer")
MusiqueItems = Callable[[Sequence[dict[str, Any]], str], list[Example]]  # (rows, where) -> items

LONGBENCH_HF = "Xnhyacinth/LongBench"
LONGBENCH_FIELDS = ("context", "answers")
LONGBENCH_HOLDOUT = 4

MULTIFIELDQA_FILE = "longbench_multifieldqa_en_real.jsonl"
MULTIFIELDQA_TEST_SIZE = 150
MULTIFIELDQA_MAX_NEW_TOKENS = 64

TWOWIKI_FILE = "longbench_2wikimqa_real.jsonl"
TWOWIKI_SUBSTITUTE_FILE = "2wikimultihopqa_dev_164.jsonl"
TWOWIKI_TEST_SIZE = 200
TWOWIKI_CALIBRATION = 20
TWOWIKI_MAX_NEW_TOKENS = 32
TWOWIKI_ORIGINAL_FIELDS = ("_id", "question", "context", "answer")


# --- Qasper ---------------------------------------------------------------------------------------------------------


def _qa_answers(qa: dict[str, Any]) -> list[str]:
    return [qa["answers"]] if isinstance(qa["answers"], str) else [str(answer) for answer in qa["answers"]]


def _qasper_papers(rows: list[dict[str, Any]], path: Path) -> list[tuple[int, str, list[dict[str, Any]]]]:
    """(doc_index, paper text, questions) per distinct paper text, in order of first appearance. A question asked
    again about the same paper (another annotator, or a repeated paper) is merged into the first: its answers join
    the gold list and the first id is kept."""
    papers: dict[str, tuple[int, str, list[dict[str, Any]]]] = {}
    questions: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        paper = papers.setdefault(row["context"], (row["doc_index"], row["context"], []))
        for qa in row["qas"]:
            if not isinstance(qa, dict) or not {"id", "question", "answers"} <= qa.keys():
                raise TaskError(f"{path}: doc_index {row['doc_index']}: each of 'qas' needs fields "
                                "['id', 'question', 'answers']")
            key = (row["context"], qa["question"].strip())
            if key not in questions:
                questions[key] = {"id": qa["id"], "question": qa["question"], "answers": []}
                paper[2].append(questions[key])
            merged = questions[key]["answers"]
            merged.extend(answer for answer in _qa_answers(qa) if answer not in merged)
    return list(papers.values())


def _qasper_item(paper: tuple[int, str, list[dict[str, Any]]], qa: dict[str, Any]) -> Example:
    item = Example.qa(context=paper[1], question=qa["question"], answers=qa["answers"], id=str(qa["id"]),
                      max_new_tokens=QASPER_MAX_NEW_TOKENS)
    item.extra["paper"] = paper[0]
    return item


def _qasper_local(path: Path) -> TaskSplit:
    papers = _qasper_papers(read_jsonl(path, QASPER_LOCAL_FIELDS), path)
    if len(papers) <= QASPER_CALIBRATION_PAPERS:
        raise TaskError(f"{path}: needs more than {QASPER_CALIBRATION_PAPERS} distinct papers")
    test_papers, calibration_papers = papers[:-QASPER_CALIBRATION_PAPERS], papers[-QASPER_CALIBRATION_PAPERS:]
    test = [_qasper_item(paper, qa) for paper in test_papers for qa in paper[2]]
    calibration = [_qasper_item(paper, qa) for paper in calibration_papers for qa in paper[2]]
    return TaskSplit(test=hf_shuffled(test)[:QASPER_TEST_SIZE], calibration=calibration)


def split_scrolls_input(text: str, where: str) -> tuple[str, str]:
    """SCROLLS ``input`` → (question, document): the question precedes the first blank line."""
    question, separator, document = text.partition("\n\n")
    if not separator or not question.strip() or not document.strip():
        raise TaskError(f"{where}: 'input' must be the question, a blank line, then the paper")
    return question.strip(), document


def _scrolls_item(row: dict[str, Any], index: int, where: str) -> Example:
    question, paper = split_scrolls_input(row["input"], f"{where}: row {index}")
    item_id = str(row.get("pid") or f"{row['id']}#{index}")
    return Example.qa(context=paper, question=question, answers=[row["output"]], id=item_id,
                      max_new_tokens=QASPER_MAX_NEW_TOKENS)


def _qasper_scrolls(rows: list[dict[str, Any]], where: str) -> TaskSplit:
    items = hf_shuffled([_scrolls_item(row, index, where) for index, row in enumerate(rows)])
    test = items[:QASPER_TEST_SIZE]
    test_papers = {item.context for item in test}
    calibration = [item for item in items[QASPER_TEST_SIZE:] if item.context not in test_papers]
    return TaskSplit(test=test, calibration=calibration[:CALIBRATION_SIZE])


def load_qasper(data_dir: Path | str | None) -> TaskSplit:
    """Qasper: see the module docstring."""
    source = resolve_source(data_dir, QASPER_FILE, QASPER_HF, "qasper")
    if source.kind == "local":
        return _qasper_local(source.path)
    if source.kind == "hf":
        rows = load_hf_rows(source.dataset, "qasper", "validation", QASPER_SCROLLS_FIELDS, trust_remote_code=True)
        return _qasper_scrolls(rows, f"hf:{source.dataset}")
    return _qasper_scrolls(read_records(upstream_file(source, QASPER_FILE), QASPER_SCROLLS_FIELDS), str(source.path))


# --- MuSiQue --------------------------------------------------------------------------------------------------------


def musique_supporting(row: dict[str, Any], where: str) -> list[str]:
    """The supporting paragraph texts (``is_supporting``) of a MuSiQue row, stripped, in paragraph order."""
    paragraphs = row["paragraphs"]
    if not isinstance(paragraphs, list) or not all(isinstance(p, dict) and "paragraph_text" in p for p in paragraphs):
        raise TaskError(f"{where}: item {row.get('id')}: 'paragraphs' must be a list of objects with "
                        "'paragraph_text' and 'is_supporting'")
    return [p["paragraph_text"].strip() for p in paragraphs if p.get("is_supporting")]


def musique_answers(row: dict[str, Any]) -> list[str]:
    """The gold answers of a MuSiQue row: ``[answer] + answer_aliases`` (empty aliases dropped)."""
    return [row["answer"]] + [alias for alias in row.get("answer_aliases") or [] if alias]


def musique_item(row: dict[str, Any], where: str) -> Example | None:
    """A MuSiQue item (sender = supporting paragraphs joined by newlines), or None without a supporting paragraph."""
    supporting = musique_supporting(row, where)
    if not supporting:
        return None
    return Example.qa(context="\n".join(supporting), question=row["question"], answers=musique_answers(row),
                      id=str(row["id"]), max_new_tokens=MUSIQUE_MAX_NEW_TOKENS)


def _musique_items(rows: Sequence[dict[str, Any]], where: str) -> list[Example]:
    items = [musique_item(row, where) for row in rows]
    kept = [item for item in items if item is not None]
    if len(kept) < len(items):
        logger.warning("%s: skipped %d item(s) without a supporting paragraph", where, len(items) - len(kept))
    return kept


def musique_split(data_dir: Path | str | None, items_of: MusiqueItems = _musique_items,
                  task: str = "musique") -> TaskSplit:
    """The MuSiQue test and calibration items of the module docstring, built by ``items_of(rows, where)`` from the
    rows in the order given there (e.g. seed-42 order); ``items_of`` may skip rows, the sizes are cut afterwards.
    ``task`` names the task in the error for a missing ``data_dir``."""
    source = resolve_source(data_dir, MUSIQUE_FILE, MUSIQUE_HF, task)
    if source.kind == "local":
        test = items_of(hf_shuffled(read_jsonl(source.path, MUSIQUE_FIELDS)), str(source.path))
        train_path = source.path.parent / MUSIQUE_TRAIN_FILE
        calibration = items_of(read_jsonl(train_path, MUSIQUE_FIELDS), str(train_path))
        return TaskSplit(test=test[:MUSIQUE_TEST_SIZE], calibration=calibration[:CALIBRATION_SIZE])
    if source.kind == "hf":
        where = f"hf:{source.dataset}"
        test = items_of(hf_shuffled(load_hf_rows(source.dataset, None, "validation", MUSIQUE_FIELDS)), where)
        train = items_of(hf_shuffled(load_hf_rows(source.dataset, None, "train", MUSIQUE_FIELDS)), where)
        return TaskSplit(test=test[:MUSIQUE_TEST_SIZE], calibration=train[:CALIBRATION_SIZE])
    path = upstream_file(source, MUSIQUE_FILE)
    items = items_of(hf_shuffled(read_records(path, MUSIQUE_FIELDS)), str(path))
    end = MUSIQUE_TEST_SIZE + CALIBRATION_SIZE
    return TaskSplit(test=items[:MUSIQUE_TEST_SIZE], calibration=items[MUSIQUE_TEST_SIZE:end])


def load_musique(data_dir: Path | str | None) -> TaskSplit:
    """MuSiQue: see the module docstring."""
    return musique_split(data_dir)


# --- LongBench (MultiFieldQA-en, 2WikiMQA) ----------------------------------------------------------------------------


def longbench_question(row: dict[str, Any], where: str) -> str:
    """The question of a LongBench row: ``input`` (THUDM release) or ``question`` (the ``Xnhyacinth`` re-upload)."""
    question = row.get("input") or row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: row {row.get('_id')} has no question; expected fields ['input' or 'question', "
                        "'context', 'answers']")
    return question


def longbench_item(row: dict[str, Any], index: int, where: str, max_new_tokens: int, prefix: str) -> Example:
    """A LongBench row as a QA item (sender = ``context``, receiver = question, gold = ``answers``)."""
    answers = [row["answers"]] if isinstance(row["answers"], str) else list(row["answers"])
    item = Example.qa(context=row["context"], question=longbench_question(row, where), answers=answers,
                      id=str(row.get("_id") or f"{prefix}-{index:04d}"), max_new_tokens=max_new_tokens)
    item.extra["source"] = "longbench"
    return item


def _longbench_rows(source: Source, config: str, local_name: str) -> tuple[list[dict[str, Any]], str]:
    if source.kind == "hf":
        return load_hf_rows(source.dataset, config, "test", LONGBENCH_FIELDS), f"hf:{source.dataset}/{config}"
    path = upstream_file(source, local_name)
    reader = read_jsonl if source.kind == "local" else read_records
    return reader(path, LONGBENCH_FIELDS), str(path)


def _holdout_split(items: list[Example], test_size: int, where: str) -> TaskSplit:
    """Test = all but the last :data:`LONGBENCH_HOLDOUT` items (cut at ``test_size``), calibration = those last."""
    if len(items) <= LONGBENCH_HOLDOUT:
        raise TaskError(f"{where}: needs more than {LONGBENCH_HOLDOUT} rows (the last {LONGBENCH_HOLDOUT} are "
                        "held out for calibration)")
    return TaskSplit(test=items[:-LONGBENCH_HOLDOUT][:test_size], calibration=items[-LONGBENCH_HOLDOUT:])


def load_multifieldqa_en(data_dir: Path | str | None) -> TaskSplit:
    """MultiFieldQA-en: see the module docstring."""
    source = resolve_source(data_dir, MULTIFIELDQA_FILE, LONGBENCH_HF, "multifieldqa_en")
    rows, where = _longbench_rows(source, "multifieldqa_en", MULTIFIELDQA_FILE)
    items = [longbench_item(row, index, where, MULTIFIELDQA_MAX_NEW_TOKENS, "multifieldqa_en")
             for index, row in enumerate(rows)]
    return _holdout_split(items, MULTIFIELDQA_TEST_SIZE, where)


def render_passages(context: Sequence[Any], where: str) -> str:
    """A 2WikiMultihopQA context ``[[title, [sentences]], …]`` rendered as LongBench does: ``Passage {i}:`` (from 1),
    the title and the sentences joined by spaces, each on its own line, passages joined by newlines."""
    passages = []
    for number, entry in enumerate(context, start=1):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], list)):
            raise TaskError(f"{where}: 'context' must be a list of [title, [sentences]] pairs")
        title, sentences = entry
        passages.append(f"Passage {number}:\n{title}\n{' '.join(s.strip() for s in sentences)}")
    return "\n".join(passages)


def twowiki_item(row: dict[str, Any], where: str) -> Example:
    """An original-schema 2WikiMultihopQA row as a LongBench-like item (gold = ``[answer]``)."""
    item = Example.qa(context=render_passages(row["context"], f"{where}: item {row['_id']}"),
                      question=row["question"], answers=[row["answer"]], id=str(row["_id"]),
                      max_new_tokens=TWOWIKI_MAX_NEW_TOKENS)
    item.extra["source"] = "2wikimultihopqa"
    return item


def _twowiki_local(source: Source) -> TaskSplit:
    rows, where = _longbench_rows(source, "2wikimqa", TWOWIKI_FILE)
    real = [longbench_item(row, index, where, TWOWIKI_MAX_NEW_TOKENS, "2wikimqa") for index, row in enumerate(rows)]
    substitute_path = source.path.parent / TWOWIKI_SUBSTITUTE_FILE
    if not substitute_path.is_file():
        logger.info("%s not found: 2wikimqa uses the LongBench rows only", substitute_path)
        return _holdout_split(real, TWOWIKI_TEST_SIZE, where)
    known = {item.question.strip() for item in real}
    rows = read_jsonl(substitute_path, TWOWIKI_ORIGINAL_FIELDS)
    rendered = [twowiki_item(row, str(substitute_path)) for row in hf_shuffled(rows)
                if row["question"].strip() not in known]
    calibration, extra = rendered[-TWOWIKI_CALIBRATION:], rendered[:-TWOWIKI_CALIBRATION]
    return TaskSplit(test=(real + extra)[:TWOWIKI_TEST_SIZE], calibration=calibration)


def _is_original_twowiki(path: Path) -> bool:
    """Whether an upstream file holds 2WikiMultihopQA rows (a ``context`` list) rather than LongBench rows."""
    first = read_records(path, ("context",))[0]
    return isinstance(first["context"], list)


def load_twowikimqa(data_dir: Path | str | None) -> TaskSplit:
    """2WikiMQA: see the module docstring."""
    source = resolve_source(data_dir, TWOWIKI_FILE, LONGBENCH_HF, "twowikimqa")
    if source.kind == "local":
        return _twowiki_local(source)
    if source.kind == "file" and _is_original_twowiki(source.path):
        items = [twowiki_item(row, str(source.path))
                 for row in hf_shuffled(read_records(source.path, TWOWIKI_ORIGINAL_FIELDS))]
        end = TWOWIKI_TEST_SIZE + TWOWIKI_CALIBRATION
        return TaskSplit(test=items[:TWOWIKI_TEST_SIZE], calibration=items[TWOWIKI_TEST_SIZE:end])
    rows, where = _longbench_rows(source, "2wikimqa", TWOWIKI_FILE)
    items = [longbench_item(row, index, where, TWOWIKI_MAX_NEW_TOKENS, "2wikimqa") for index, row in enumerate(rows)]
    return _holdout_split(items, TWOWIKI_TEST_SIZE, where)
