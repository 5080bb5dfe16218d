"""Two-sender items (paper App. J, ``KVCOMM.md`` §5.4 and §7.4): HotpotQA, MuSiQue and 2WikiMQA.

Each item keeps the full context of its single-sender twin (for Baseline/Skyline and single-sender KVComm) and carries
the two parts in ``extra["contexts"]``. A list of ``n`` facts or passages is split with :func:`split_halves`: sender 1
gets the first ``n // 2``, sender 2 the remaining ones (with an odd count the second sender gets one more; the
reference split is not specified further). Items with fewer than 2 facts/passages are skipped.

``hotpotqa_2senders``
    the supporting sentences of the local HotpotQA file joined by newlines. As in :mod:`kvcomm.tasks.paper`, test
    items come from rows 0–499 of the seed-42 order and calibration items from rows 500 and later, so the two never
    overlap.
``musique_2senders``
    the supporting paragraphs (``is_supporting``) joined by newlines, gold = ``[answer] + answer_aliases``, 48 new
    tokens. Sources and splits are those of the single-sender ``musique`` task (:func:`kvcomm.tasks.longform.
    musique_split`): the rows are put in seed-42 order, rows with fewer than 2 supporting paragraphs are dropped, then
    the first 500 are the test items; calibration items come from the train file (local: ``musique_train_100.jsonl``,
    ``hf:``: the train split) or, for one upstream file, from the rows after the test rows — never test items.
``twowikimqa_2senders``
    the items of the single-sender ``twowikimqa`` task (same sources, same test/calibration split, same ids), whose
    LongBench context is split at its line-initial ``Passage N:`` markers: :func:`split_passages` gives the header
    (the text before the first marker) and the passages, each from its marker to the newline before the next one.
    Both senders get the header followed by their half of the passages joined by newlines (with the empty header of
    LongBench, ``first + "\\n" + second`` is the full context). The LongBench ``context`` field has no tail after its
    last passage; the instruction and question around it are added to every sender's prompt by the QA templates.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl
from kvcomm.tasks.longform import (
    MUSIQUE_MAX_NEW_TOKENS,
    load_twowikimqa,
    musique_answers,
    musique_split,
    musique_supporting,
)
from kvcomm.tasks.paper import HOTPOTQA_FILE, HOTPOTQA_TEST_SIZE, _data_file, supporting_sentences

logger = logging.getLogger(__name__)

MIN_FACTS = 2
PASSAGE_MARKER = re.compile(r"^Passage \d+:", re.MULTILINE)


def split_halves(facts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``facts[:n//2]`` and ``facts[n//2:]``; needs at least two facts."""
    if len(facts) < MIN_FACTS:
        raise TaskError(f"splitting needs at least {MIN_FACTS} facts, got {len(facts)}")
    middle = len(facts) // 2
    return list(facts[:middle]), list(facts[middle:])


def with_contexts(item: Example, contexts: Sequence[str]) -> Example:
    """A copy of ``item`` (same context, messages, id, gold) whose ``extra["contexts"]`` holds one part per sender."""
    return dataclasses.replace(item, extra={**item.extra, "contexts": list(contexts)})


def two_sender_item(item_id: str, facts: Sequence[str], question: str, answers: Sequence[str],
                    max_new_tokens: int = 48) -> Example:
    """A QA item over all ``facts`` whose ``extra["contexts"]`` holds the two halves (joined by newlines)."""
    first, second = split_halves(facts)
    item = Example.qa(context="\n".join(facts), question=question, answers=list(answers), id=item_id,
                      max_new_tokens=max_new_tokens)
    return with_contexts(item, ["\n".join(first), "\n".join(second)])


# --- HotpotQA -------------------------------------------------------------------------------------------------------


def _items(rows: list[dict]) -> list[Example]:
    items = []
    for row in rows:
        facts = supporting_sentences(row)
        if len(facts) >= MIN_FACTS:
            items.append(two_sender_item(str(row["id"]), facts, row["question"], [row["answer"]]))
    return items


def load_hotpotqa_two_senders(data_dir: Path | None) -> TaskSplit:
    """HotpotQA split between two senders: test from rows 0–499, calibration from rows 500+ (≥ 2 facts each)."""
    path = _data_file(data_dir, HOTPOTQA_FILE)
    rows = read_jsonl(path, ("id", "question", "answer", "supporting_facts", "context"))
    test, calibration = _items(rows[:HOTPOTQA_TEST_SIZE]), _items(rows[HOTPOTQA_TEST_SIZE:])
    if not test:
        raise TaskError(f"{path}: no item has {MIN_FACTS} or more supporting sentences")
    return TaskSplit(test=test, calibration=calibration)


# --- MuSiQue --------------------------------------------------------------------------------------------------------


def musique_two_sender_items(rows: Sequence[dict[str, Any]], where: str) -> list[Example]:
    """Two-sender items of the MuSiQue ``rows`` (in the order given) with at least 2 supporting paragraphs."""
    items = []
    for row in rows:
        facts = musique_supporting(row, where)
        if len(facts) >= MIN_FACTS:
            items.append(two_sender_item(str(row["id"]), facts, row["question"], musique_answers(row),
                                         max_new_tokens=MUSIQUE_MAX_NEW_TOKENS))
    if len(items) < len(rows):
        logger.warning("%s: skipped %d item(s) with fewer than %d supporting paragraphs", where,
                       len(rows) - len(items), MIN_FACTS)
    return items


def load_musique_two_senders(data_dir: Path | str | None) -> TaskSplit:
    """MuSiQue split between two senders: see the module docstring."""
    split = musique_split(data_dir, musique_two_sender_items, task="musique_2senders")
    if not split.test:
        raise TaskError(f"{data_dir}: no MuSiQue test item has {MIN_FACTS} or more supporting paragraphs "
                        "('paragraphs' entries with 'is_supporting': true)")
    return split


# --- 2WikiMQA -------------------------------------------------------------------------------------------------------


def split_passages(context: str) -> tuple[str, list[str]]:
    """``(header, passages)`` of a LongBench context: the text before the first line-initial ``Passage N:`` marker,
    and each passage from its marker up to (not including) the newline before the next marker, the last one to the
    end; ``header + "\\n".join(passages) == context``. No marker: ``(context, [])``."""
    starts = [match.start() for match in PASSAGE_MARKER.finditer(context)]
    if not starts:
        return context, []
    ends = [start - 1 for start in starts[1:]] + [len(context)]  # a line-initial marker after 0 follows a newline
    return context[:starts[0]], [context[start:end] for start, end in zip(starts, ends)]


def split_passage_context(context: str) -> tuple[str, str]:
    """The two senders' parts of a LongBench context: the header followed by each half of the passages."""
    header, passages = split_passages(context)
    first, second = split_halves(passages)
    return header + "\n".join(first), header + "\n".join(second)


def passage_two_sender_items(items: Sequence[Example], where: str) -> list[Example]:
    """``items`` with at least 2 ``Passage N:`` passages, each carrying its two halves in ``extra["contexts"]``."""
    kept = [with_contexts(item, split_passage_context(item.context)) for item in items
            if len(split_passages(item.context)[1]) >= MIN_FACTS]
    if len(kept) < len(items):
        logger.warning("%s: skipped %d item(s) with fewer than %d 'Passage N:' passages", where,
                       len(items) - len(kept), MIN_FACTS)
    return kept


def load_twowikimqa_two_senders(data_dir: Path | str | None) -> TaskSplit:
    """2WikiMQA split between two senders: see the module docstring."""
    split = load_twowikimqa(data_dir)
    test = passage_two_sender_items(split.test, f"{data_dir} (2wikimqa test)")
    calibration = passage_two_sender_items(split.calibration, f"{data_dir} (2wikimqa calibration)")
    if not test:
        raise TaskError(f"{data_dir}: no 2WikiMQA test item has {MIN_FACTS} or more passages marked 'Passage N:' "
                        "at the start of a line in its 'context'")
    return TaskSplit(test=test, calibration=calibration)
