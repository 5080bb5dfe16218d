from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from kvcomm.costs import CostRecord
from kvcomm.errors import KVCommError, PromptError
from kvcomm.methods.base import MethodOutput
from kvcomm.runner import run_items
from kvcomm.tasks import get_task


@dataclass
class Echo:
    """Answers with the gold string except for ids in ``fail``; counts its calls."""

    fail: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    name: str = "echo"

    def answer(self, example):
        self.calls.append(example.id)
        if example.id in self.fail:
            raise PromptError("too long")
        return MethodOutput(answer=f"It is {example.answers[0]}.", costs=CostRecord(kv_bytes=100), layers=(0, 2))


def test_results_folder_and_resume(tmp_path):
    items = get_task("demo").load().test[:5]
    method = Echo()
    run_items(method, items[:3], tmp_path, "demo", "contains", {"a": 1}, progress=False)
    summary = run_items(method, items, tmp_path, "demo", "contains", {"a": 1}, progress=False)
    assert method.calls == [e.id for e in items]  # the first three were not recomputed
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in items]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"task", "method", "n", "score", "mean_kv_bytes"} <= set(metrics)
    assert metrics == summary and metrics["n"] == 5 and metrics["score"] == 1.0 and metrics["mean_kv_bytes"] == 100
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


def test_torn_line_is_recomputed(tmp_path):
    items = get_task("demo").load().test[:3]
    run_items(Echo(), items[:2], tmp_path, "demo", "contains", {}, progress=False)
    with (tmp_path / "predictions.jsonl").open("a") as handle:
        handle.write('{"id": "demo-0002", "answ')
    method = Echo()
    run_items(method, items, tmp_path, "demo", "contains", {}, progress=False)
    assert method.calls == ["demo-0002"]


def test_other_config_in_the_same_folder_is_refused(tmp_path):
    items = get_task("demo").load().test[:1]
    run_items(Echo(), items, tmp_path, "demo", "contains", {"ratio": 0.3}, progress=False)
    with pytest.raises(KVCommError, match="different config"):
        run_items(Echo(), items, tmp_path, "demo", "contains", {"ratio": 0.5}, progress=False)
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 1  # nothing lost


def test_failing_item_scores_zero_and_is_counted(tmp_path):
    items = get_task("demo").load().test[:4]
    summary = run_items(Echo(fail={items[1].id}), items, tmp_path, "demo", "contains", {}, progress=False)
    assert summary["n"] == 4 and summary["errors"] == 1 and summary["score"] == 0.75
    # per-item scores 1, 0, 1, 1: sample standard deviation 0.5, standard error 0.5 / sqrt(4)
    assert summary["score_stderr"] == pytest.approx(0.25)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert rows[1]["error"].startswith("PromptError") and rows[1]["scores"]["contains"] == 0.0
