"""Where a task's records come from: the local files of ``shared/data``, an upstream file or folder in the original
schema, or a Hugging Face dataset id (``hf:<id>``, through an optional ``datasets`` import), and the seed-42 order.

``data_dir`` (the ``--data-dir`` argument) may be

* a folder holding the task's local file (the file names of ``shared/data/README.md``),
* an upstream JSON file (an array, an object with a ``data`` list, or JSON lines) in the original schema,
* a folder of upstream JSON files (TMATH),
* ``hf:`` or ``hf:<dataset id>``: the Hugging Face dataset the spec names (or another id with the same schema); this
  needs ``pip install datasets`` and network access or a filled local cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvcomm.errors import TaskError
from kvcomm.tasks.base import read_jsonl

logger = logging.getLogger(__name__)

SEED = 42
HF_PREFIX = "hf:"
T = TypeVar("T")


def hf_shuffle_order(count: int, seed: int = SEED) -> list[int]:
    """Row indices in the order of Hugging Face ``Dataset.shuffle(seed=seed)`` over ``count`` rows.

    ``datasets`` draws ``numpy.random.default_rng(seed).permutation(count)`` and row ``k`` of the shuffled set is row
    ``order[k]`` of the original, so ``shuffle(seed=42).select(range(n))`` is ``[rows[i] for i in order[:n]]``
    (checked against the HotpotQA file, whose rows carry both indices)."""
    import numpy as np  # a dependency of transformers

    if count < 0:
        raise TaskError(f"cannot shuffle {count} rows")
    return [int(index) for index in np.random.default_rng(seed).permutation(count)]


def hf_shuffled(rows: Sequence[T], seed: int = SEED) -> list[T]:
    """``rows`` in the order of ``Dataset.shuffle(seed=seed)``."""
    return [rows[index] for index in hf_shuffle_order(len(rows), seed)]


@dataclass(frozen=True)
class Source:
    """A resolved data source: ``kind`` is ``"local"`` (the local file ``path``), ``"file"`` (an upstream file),
    ``"folder"`` (a folder without the local file) or ``"hf"`` (``dataset`` is a Hugging Face id)."""

    kind: str
    path: Path | None = None
    dataset: str = ""


def resolve_source(data_dir: Path | str | None, local_name: str, hf_default: str, task: str) -> Source:
    """Decide what ``data_dir`` names for a task whose local file is ``local_name`` (see the module docstring)."""
    hf_hint = f", or hf:{hf_default}" if hf_default else ""
    if data_dir is None:
        raise TaskError(f"task {task!r} reads {local_name}; give its folder with --data-dir (for example "
                        f"../shared/data) or an upstream file{hf_hint}")
    text = str(data_dir)
    if text.startswith(HF_PREFIX):
        return Source("hf", dataset=text[len(HF_PREFIX):].strip() or hf_default)
    path = Path(data_dir)
    if path.is_dir():
        local = path / local_name
        return Source("local", local) if local.is_file() else Source("folder", path)
    if path.is_file():
        return Source("file", path)
    raise TaskError(f"data not found: {path} (expected a folder holding {local_name} or an upstream JSON/JSONL "
                    f"file{hf_hint})")


def upstream_file(source: Source, local_name: str) -> Path:
    """The file of a ``local`` or ``file`` source; a folder without the local file is an error naming that file."""
    if source.kind == "folder":
        raise TaskError(f"data file not found: {source.path / local_name}; give the folder that holds {local_name} "
                        "or an upstream file")
    if source.path is None:
        raise TaskError(f"no file for a source of kind {source.kind!r}")
    return source.path


def check_fields(rows: Sequence[Any], path: Path | str, required: Sequence[str]) -> list[dict[str, Any]]:
    """``rows`` when every one is an object with the ``required`` fields; else a TaskError naming file and fields."""
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TaskError(f"{path}: record {number} is not a JSON object; expected fields {list(required)}")
        missing = [name for name in required if name not in row]
        if missing:
            raise TaskError(f"{path}: record {number} misses field(s) {missing}; expected fields {list(required)}")
    if not rows:
        raise TaskError(f"{path} holds no records; expected records with fields {list(required)}")
    return list(rows)


def read_records(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Records of an upstream file: a JSON array, a JSON object with a ``data`` list, or JSON lines."""
    if not path.is_file():
        raise TaskError(f"data file not found: {path} (expected JSON or JSON lines with fields {', '.join(required)})")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path}: not valid JSON ({error.msg}); expected an array of records with fields "
                            f"{list(required)}") from error
        return check_fields(rows, path, required)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path, tuple(required))
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        return check_fields(whole["data"], path, required)
    return check_fields([whole], path, required)


def read_json_object(path: Path, required: Sequence[str]) -> dict[str, Any]:
    """One JSON object (e.g. one TMATH file) with the ``required`` fields."""
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TaskError(f"{path}: not a readable JSON file ({error}); expected an object with fields "
                        f"{list(required)}") from error
    return check_fields([row], path, required)[0]


def load_hf_rows(dataset: str, config: str | None, split: str, required: Sequence[str],
                 trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset split, in the dataset's order (needs the optional ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise TaskError(f"reading hf:{dataset} needs the Hugging Face 'datasets' package (pip install datasets); "
                        "or give a local file with --data-dir") from None
    logger.info("loading %s (%s, %s) with datasets", dataset, config, split)
    kwargs: dict[str, Any] = {"split": split}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        table = datasets.load_dataset(dataset, config, **kwargs) if config else datasets.load_dataset(dataset, **kwargs)
    except Exception as error:  # noqa: BLE001 - network, cache and schema errors all mean "cannot read this id"
        raise TaskError(f"cannot load hf:{dataset} (config {config}, split {split}): {error}") from error
    return check_fields([dict(row) for row in table], f"hf:{dataset}/{config or ''}/{split}", required)
