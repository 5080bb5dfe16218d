"""Two-sender items (paper App. J, ``KVCOMM.md`` §7.4) built from the local HotpotQA file.

Each item keeps the full supporting-fact context (for Baseline/Skyline and single-sender KVComm) and carries the two
parts in ``extra["contexts"]``: sender 1 gets the first ``n // 2`` supporting sentences, sender 2 the remaining ones
(with an odd count the second sender gets one more; the reference split is not specified further). Only rows with at
least 2 resolvable supporting sentences are kept. As in :mod:`kvcomm.tasks.paper`, test items come from rows 0–499 of
the seed-42 order and calibration items from rows 500 and later, so the two never overlap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl
from kvcomm.tasks.paper import HOTPOTQA_FILE, HOTPOTQA_TEST_SIZE, _data_file, supporting_sentences

MIN_FACTS = 2


def split_halves(facts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``facts[:n//2]`` and ``facts[n//2:]``; needs at least two facts."""
    if len(facts) < MIN_FACTS:
        raise TaskError(f"splitting needs at least {MIN_FACTS} facts, got {len(facts)}")
    middle = len(facts) // 2
    return list(facts[:middle]), list(facts[middle:])


def two_sender_item(item_id: str, facts: Sequence[str], question: str, answers: Sequence[str],
                    max_new_tokens: int = 48) -> Example:
    """A QA item over all ``facts`` whose ``extra["contexts"]`` holds the two halves (joined by newlines)."""
    first, second = split_halves(facts)
    item = Example.qa(context="\n".join(facts), question=question, answers=list(answers), id=item_id,
                      max_new_tokens=max_new_tokens)
    return dataclasses.replace(item, extra={"contexts": ["\n".join(first), "\n".join(second)]})


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
