"""The paper's tasks that read local files: Countries, Tipsheets and HotpotQA (file names of ``shared/data``).

Splits: Countries evaluates all 200 rows and calibrates on new (person, landmark) pairs recombined from the file;
Tipsheets evaluates the first 450 rows and calibrates on the last 50; HotpotQA evaluates the paper's 500 items (rows
0–499 of the seed-42 order) and calibrates on rows 500 and later. Calibration items are therefore never test items.

HotpotQA also reads the public originals: an upstream file in the HF ``hotpot_qa`` schema or in the schema of the
official ``hotpot_dev_distractor_v1.json`` (``_id``, ``context`` as ``[title, sentences]`` pairs, ``supporting_facts``
as ``[title, sent_id]`` pairs), or ``hf:`` (``hotpotqa/hotpot_qa``, config ``distractor``, validation): the rows are put
in seed-42 order (Hugging Face ``shuffle(seed=42)``), rows 0–499 are the test set and rows 500–599 calibration.
"""

from __future__ import annotations

import random
from pathlib import Path

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl
from kvcomm.tasks.sources import hf_shuffled, load_hf_rows, read_records, resolve_source, upstream_file

COUNTRIES_FILE = "countries.jsonl"
TIPSHEETS_FILE = "tipsheets.jsonl"
HOTPOTQA_FILE = "hotpotqa_dev_distractor_seed42_600.jsonl"
COUNTRIES_SUFFIX = "You are required to extrapolate the country from the context."
TIPSHEETS_TEST_SIZE = 450
HOTPOTQA_TEST_SIZE = 500
HOTPOTQA_CALIBRATION = 100
HOTPOTQA_HF = "hotpotqa/hotpot_qa"
HOTPOTQA_FIELDS = ("question", "answer", "supporting_facts", "context")


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


def as_hf_hotpot(row: dict) -> dict:
    """A HotpotQA row in the HF schema; rows of the official JSON (``_id``, pair lists) are converted."""
    if not isinstance(row["context"], list):
        return row
    try:
        titles, sentences = zip(*row["context"]) if row["context"] else ((), ())
        fact_titles, sent_ids = zip(*row["supporting_facts"]) if row["supporting_facts"] else ((), ())
    except (TypeError, ValueError) as error:
        raise TaskError(f"HotpotQA item {row.get('_id')}: 'context' must hold [title, sentences] pairs and "
                        "'supporting_facts' [title, sent_id] pairs") from error
    return {"id": row.get("id", row.get("_id")), "question": row["question"], "answer": row["answer"],
            "context": {"title": list(titles), "sentences": list(sentences)},
            "supporting_facts": {"title": list(fact_titles), "sent_id": list(sent_ids)}}


def _hotpot_items(rows: list[dict], where: str) -> list[Example]:
    items = []
    for index, row in enumerate(rows):
        item_id = str(row.get("id") or row.get("_id") or f"hotpotqa-{index:05d}")
        facts = supporting_sentences(row)
        if not facts:
            raise TaskError(f"{where}: item {item_id} has no resolvable supporting sentence")
        items.append(Example.qa(context="\n".join(facts), question=row["question"], answers=[row["answer"]],
                                id=item_id, max_new_tokens=48))
    return items


def load_hotpotqa(data_dir: Path | str | None) -> TaskSplit:
    source = resolve_source(data_dir, HOTPOTQA_FILE, HOTPOTQA_HF, "hotpotqa")
    if source.kind == "local":  # rows already in seed-42 order
        items = _hotpot_items(read_jsonl(source.path, ("id",) + HOTPOTQA_FIELDS), str(source.path))
        return TaskSplit(test=items[:HOTPOTQA_TEST_SIZE], calibration=items[HOTPOTQA_TEST_SIZE:])
    if source.kind == "hf":
        rows, where = load_hf_rows(source.dataset, "distractor", "validation", HOTPOTQA_FIELDS), f"hf:{source.dataset}"
    else:
        path = upstream_file(source, HOTPOTQA_FILE)
        rows, where = read_records(path, HOTPOTQA_FIELDS), str(path)
    items = _hotpot_items(hf_shuffled([as_hf_hotpot(row) for row in rows]), where)
    end = HOTPOTQA_TEST_SIZE + HOTPOTQA_CALIBRATION
    return TaskSplit(test=items[:HOTPOTQA_TEST_SIZE], calibration=items[HOTPOTQA_TEST_SIZE:end])
