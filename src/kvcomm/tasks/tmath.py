"""TMATH (Qi et al., COLING 2025) as the paper uses it (``KVCOMM.md`` §7.1): the sender gets the Socratic hints
(``Instruction: Answer the math problem step by step. Hint: {hint}``), the receiver the problem, gold = the MATH
solution, 256 new tokens, scored by ROUGE-L recall.

Sources (``data_dir``):

* the folder of ``shared/data`` with ``tmath.jsonl`` (4,043 rows, ``id = "<domain>/hint_<n>"``, in sorted
  (domain, n) order);
* the upstream ``TMATH`` folder (or its parent) with ``<domain>/hint_<n>.json`` files, read in the same sorted order
  (domain name, then the number ``n`` compared as a number; the reference's unsorted ``glob`` order is not
  reproducible, spec §12.9), or a JSON/JSONL file of such records.

Sampling: rows in that order, Hugging Face ``shuffle(seed=42)``; test = rows 0–299 of the shuffled order, calibration
= the next :data:`TMATH_CALIBRATION` rows, so the two never overlap. The paper's 300 items are unknown (spec §12.9).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kvcomm.errors import TaskError
from kvcomm.tasks.base import Example, TaskSplit, read_jsonl
from kvcomm.tasks.sources import hf_shuffled, read_json_object, read_records, resolve_source

TMATH_FILE = "tmath.jsonl"
TMATH_TEST_SIZE = 300
TMATH_CALIBRATION = 50
TMATH_MAX_NEW_TOKENS = 256
TMATH_FIELDS = ("problem", "solution", "socratic_questions")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _hints(row: dict[str, Any], where: str) -> str:
    hints = row["socratic_questions"]
    if isinstance(hints, list):
        hints = "\n".join(str(hint).strip() for hint in hints)
    if not isinstance(hints, str):
        raise TaskError(f"{where}: 'socratic_questions' must be a string or a list of strings")
    return hints.strip()


def tmath_item(row: dict[str, Any], item_id: str, where: str) -> Example:
    """One TMATH item with the math templates (sender: hints, receiver: problem, gold: solution)."""
    item = Example.math(hint=_hints(row, where), problem=row["problem"], answers=[row["solution"]], id=item_id,
                        max_new_tokens=TMATH_MAX_NEW_TOKENS)
    item.extra.update(level=row.get("level"), type=row.get("type"))
    return item


def _file_order(path: Path) -> tuple[str, int, str]:
    """Sort key: domain folder, then the trailing number of the file name as a number, then the name."""
    match = _NUMBERED.match(path.stem)
    return (path.parent.name, int(match.group(2)) if match else -1, path.stem)


def tmath_files(folder: Path) -> list[Path]:
    """The ``<domain>/<name>.json`` files of an upstream TMATH folder (or of its ``TMATH`` subfolder), sorted."""
    root = folder / "TMATH" if (folder / "TMATH").is_dir() else folder
    files = sorted(root.glob("*/*.json"), key=_file_order)
    if not files:
        raise TaskError(f"no {TMATH_FILE} and no TMATH files <domain>/hint_<n>.json in {folder}; expected JSON objects "
                        f"with fields {list(TMATH_FIELDS)}")
    return files


def _split(items: list[Example]) -> TaskSplit:
    shuffled = hf_shuffled(items)
    end = TMATH_TEST_SIZE + TMATH_CALIBRATION
    return TaskSplit(test=shuffled[:TMATH_TEST_SIZE], calibration=shuffled[TMATH_TEST_SIZE:end])


def load_tmath(data_dir: Path | str | None) -> TaskSplit:
    """TMATH: see the module docstring."""
    source = resolve_source(data_dir, TMATH_FILE, "", "tmath")
    if source.kind == "hf":
        raise TaskError("TMATH has no Hugging Face dataset id in the spec; give the TMATH folder or tmath.jsonl")
    if source.kind == "folder":
        items = [tmath_item(read_json_object(path, TMATH_FIELDS), f"{path.parent.name}/{path.stem}", str(path))
                 for path in tmath_files(source.path)]
        return _split(items)
    path = source.path
    rows = read_jsonl(path, ("id",) + TMATH_FIELDS) if source.kind == "local" else read_records(path, TMATH_FIELDS)
    items = [tmath_item(row, str(row.get("id") or f"tmath-{index:04d}"), f"{path}: row {index + 1}")
             for index, row in enumerate(rows)]
    return _split(items)
