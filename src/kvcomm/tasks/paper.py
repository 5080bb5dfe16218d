"""The paper's tasks that read local files: Countries, Tipsheets and HotpotQA (file names of ``shared/data``).

Splits: Countries evaluates all 200 rows and calibrates on new (person, landmark) pairs recombined from the file;
Tipsheets evaluates the first 450 rows and calibrates on the last 50; HotpotQA evaluates the paper's 500 items (rows
0–499 of the seed-42 order) and calibrates on rows 500 and later. Calibration items are therefore never test items.
"""

from __future__ import annotations

import random
from pathlib import Path

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl

COUNTRIES_FILE = "countries.jsonl"
TIPSHEETS_FILE = "tipsheets.jsonl"
HOTPOTQA_FILE = "hotpotqa_dev_distractor_seed42_600.jsonl"
COUNTRIES_SUFFIX = "You are required to extrapolate the country from the context."
TIPSHEETS_TEST_SIZE = 450
HOTPOTQA_TEST_SIZE = 500


def _data_file(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise TaskError(f"this task reads {name}; give its folder with --data-dir (for example ../shared/data)")
    return Path(data_dir) / name


def _countries_item(item_id: str, person: str, landmark: str, country: str) -> Example:
    return Example.qa(context=f"{person} is at the {landmark}.",
                      question=f"Which country is {person} located in?{COUNTRIES_SUFFIX}",
                      answers=[country], id=item_id, max_new_tokens=5)


def load_countries(data_dir: Path | None) -> TaskSplit:
    rows = read_jsonl(_data_file(data_dir, COUNTRIES_FILE), ("id", "person", "landmark", "country"))
    test = [_countries_item(str(r["id"]), r["person"], r["landmark"], r["country"]) for r in rows]
    used = {(r["person"], r["landmark"]) for r in rows}
    people = sorted({r["person"] for r in rows})
    places = sorted({(r["landmark"], r["country"]) for r in rows})
    rng = random.Random(42)
    calibration: list[Example] = []
    while len(calibration) < 20 and len(used) < len(people) * len(places):
        person, (landmark, country) = rng.choice(people), rng.choice(places)
        if (person, landmark) not in used:
            used.add((person, landmark))
            calibration.append(_countries_item(f"countries-calib-{len(calibration):04d}", person, landmark, country))
    return TaskSplit(test=test, calibration=calibration)


def load_tipsheets(data_dir: Path | None) -> TaskSplit:
    rows = read_jsonl(_data_file(data_dir, TIPSHEETS_FILE), ("prompt_A", "prompt_B", "label"))
    items = [Example.qa(context=r["prompt_A"], question=r["prompt_B"], answers=[r["label"]],
                        id=f"tipsheets-{index:04d}", max_new_tokens=10) for index, r in enumerate(rows)]
    return TaskSplit(test=items[:TIPSHEETS_TEST_SIZE], calibration=items[TIPSHEETS_TEST_SIZE:])


def supporting_sentences(row: dict) -> list[str]:
    """The gold supporting-fact sentences of a HotpotQA row (HF schema), in the order given."""
    titles = row["context"]["title"]
    sentences = row["context"]["sentences"]
    facts = row["supporting_facts"]
    found = []
    for title, sent_id in zip(facts["title"], facts["sent_id"]):
        if title in titles:
            paragraph = sentences[titles.index(title)]
            if 0 <= sent_id < len(paragraph):
                found.append(paragraph[sent_id].strip())
    return found


def load_hotpotqa(data_dir: Path | None) -> TaskSplit:
    path = _data_file(data_dir, HOTPOTQA_FILE)
    rows = read_jsonl(path, ("id", "question", "answer", "supporting_facts", "context"))
    items = []
    for row in rows:
        facts = supporting_sentences(row)
        if not facts:
            raise TaskError(f"{path}: item {row['id']} has no resolvable supporting sentence")
        items.append(Example.qa(context="\n".join(facts), question=row["question"], answers=[row["answer"]],
                                id=str(row["id"]), max_new_tokens=48))
    return TaskSplit(test=items[:HOTPOTQA_TEST_SIZE], calibration=items[HOTPOTQA_TEST_SIZE:])
