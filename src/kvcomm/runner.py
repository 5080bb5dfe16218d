"""Run one method over task items into a results folder (predictions, metrics, config) that resumes."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import torch

from kvcomm.costs import CostRecord, peak_memory
from kvcomm.errors import KVCommError
from kvcomm.methods.base import Method
from kvcomm.metrics import METRICS, score_all
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a ``predictions.jsonl`` by item id (a torn last line is dropped); empty when the file is missing."""
    return _read_done(Path(path))


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Rows already written (a torn last line from an interrupted run is dropped and recomputed)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("ignoring a torn line in %s", path)
            continue
        done[row["id"]] = row
    return done


def _check_config(output_dir: Path, config: dict[str, Any]) -> None:
    path = output_dir / CONFIG_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {key for key in set(previous) | set(config) if previous.get(key) != config.get(key)}
        if changed:
            raise KVCommError(
                f"{output_dir} holds a run with a different config ({', '.join(sorted(changed))}); "
                "choose another --output folder or delete this one"
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def method_device(method: Method) -> torch.device:
    """The device whose memory :func:`predict_one` measures: the method's receiver's (CPU when it has none)."""
    receiver = getattr(method, "receiver", None)
    try:
        return receiver.device if receiver is not None else torch.device("cpu")
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def predict_one(method: Method, example: Example) -> dict[str, Any]:
    """One predictions row; a failing item scores 0 with its error recorded (never dropped).

    The row's ``costs.peak_memory_bytes`` is measured around the whole item (:func:`kvcomm.costs.peak_memory`).
    """
    row: dict[str, Any] = {"id": example.id, "question": example.question, "context": example.context,
                           "gold": list(example.answers), "answer_prefix": example.answer_prefix}
    try:
        with peak_memory(method_device(method)) as peak:
            output = method.answer(example)
        output.costs.peak_memory_bytes = peak.bytes
    except (KVCommError, RuntimeError, ValueError) as error:
        logger.warning("item %s failed: %s", example.id, error)
        row.update(answer="", scores={name: 0.0 for name in METRICS}, costs=CostRecord().to_dict(),
                   layers=None, error=f"{type(error).__name__}: {error}")
        return row
    row.update(answer=output.answer, scores=score_all(output.answer, example.answers),
               costs=output.costs.to_dict(), layers=list(output.layers) if output.layers is not None else None,
               error=None)
    if output.messages is not None:
        row["messages"] = output.messages
    return row


def summarize(rows: Sequence[dict[str, Any]], task: str, method: str, metric: str) -> dict[str, Any]:
    """Aggregate predictions rows into the metrics record: mean scores, ``score_stderr`` (the standard error of the
    primary score's mean over items), ``costs`` (``mean_<field>`` of every
    :class:`CostRecord` field) and ``totals`` (``total_<field>``); a field missing from older rows counts 0."""
    n = len(rows)

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    def scores(row: dict[str, Any]) -> dict[str, float]:
        # rows written before a metric was added are rescored from their answer and gold (failed items stay 0)
        if all(name in row["scores"] for name in METRICS) or row.get("error"):
            return row["scores"]
        return score_all(row["answer"], row["gold"])

    metrics = {name: mean([scores(row).get(name, 0.0) for row in rows]) for name in METRICS}
    primary = [scores(row).get(metric, 0.0) for row in rows]
    stderr = statistics.stdev(primary) / n ** 0.5 if n > 1 else 0.0  # standard error of the mean over items
    cost_keys = CostRecord().to_dict().keys()
    costs = {f"mean_{key}": mean([row["costs"].get(key, 0) for row in rows]) for key in cost_keys}
    totals = {f"total_{key}": sum(row["costs"].get(key, 0) for row in rows) for key in cost_keys}
    return {"task": task, "method": method, "n": n, "metric": metric, "score": metrics[metric], "score_stderr": stderr,
            "mean_kv_bytes": costs["mean_kv_bytes"], "metrics": metrics, "costs": costs, "totals": totals,
            "errors": sum(1 for row in rows if row.get("error")),
            "layers": next((row["layers"] for row in rows if row.get("layers") is not None), None)}


def run_items(method: Method, examples: Sequence[Example], output_dir: Path, task: str, metric: str,
              config: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Answer every example (skipping those already in ``output_dir``), then write ``metrics.json``."""
    output_dir = Path(output_dir)
    _check_config(output_dir, config)
    predictions_path = output_dir / PREDICTIONS
    done = _read_done(predictions_path)
    if done:
        # rewrite without torn lines so that appends stay valid JSON lines
        predictions_path.write_text("".join(json.dumps(row) + "\n" for row in done.values()), encoding="utf-8")
    todo = [example for example in examples if example.id not in done]
    if done:
        logger.info("resuming %s: %d of %d items already done", output_dir, len(examples) - len(todo), len(examples))
    with predictions_path.open("a", encoding="utf-8") as handle, \
            tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"{task}/{method.name}",
                 disable=not progress, unit="item") as bar:
        for example in todo:
            row = predict_one(method, example)
            done[example.id] = row
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            bar.update(1)
    rows = [done[example.id] for example in examples]
    summary = summarize(rows, task, method.name, metric)
    (output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    return summary
