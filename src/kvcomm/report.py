"""Results as tables (terminal and Markdown) and plots of layer scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from kvcomm.selection import LayerScores


def summary_table(summaries: Sequence[dict[str, Any]], title: str = "") -> Table:
    """A rich table: one row per method with score, KV bytes and seconds per side."""
    table = Table(title=title)
    for column in ("method", "n", "metric", "score", "KV KiB", "sender s", "receiver s", "layers", "errors"):
        table.add_column(column, justify="left" if column in ("method", "metric", "layers") else "right")
    for summary in summaries:
        layers = summary.get("layers")
        table.add_row(summary["method"], str(summary["n"]), summary["metric"], f"{summary['score']:.3f}",
                      f"{summary['mean_kv_bytes'] / 1024:.1f}", f"{summary['costs']['mean_sender_seconds']:.3f}",
                      f"{summary['costs']['mean_receiver_seconds']:.3f}",
                      "" if not layers else f"{len(layers)}: {','.join(map(str, layers))}", str(summary["errors"]))
    return table


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | n | metric | score | KV KiB | sender s | receiver s | layers |", "|---|---|---|---|---|---|---|---|"]
    for summary in summaries:
        layers = summary.get("layers") or []
        lines.append(f"| {summary['method']} | {summary['n']} | {summary['metric']} | {summary['score']:.3f} | "
                     f"{summary['mean_kv_bytes'] / 1024:.1f} | {summary['costs']['mean_sender_seconds']:.3f} | "
                     f"{summary['costs']['mean_receiver_seconds']:.3f} | {len(layers)} |")
    return "\n".join(lines) + "\n"


def scores_table(scores: LayerScores, ratios: Sequence[float] = (0.3, 0.5, 0.7)) -> Table:
    chosen = {ratio: set(scores.select(ratio)) for ratio in ratios}
    table = Table(title="KVComm layer scores")
    for column in ("layer", "importance", "normalized", "prior", "score", *[f"top {r:g}" for r in ratios]):
        table.add_column(column, justify="right")
    for layer in range(scores.num_layers):
        table.add_row(str(layer), f"{scores.importance[layer]:.4f}", f"{scores.normalized[layer]:.3f}",
                      f"{scores.prior[layer]:.3f}", f"{scores.combined[layer]:.3f}",
                      *["x" if layer in chosen[r] else "" for r in ratios])
    return table


def plot_scores(scores: LayerScores, path: Path) -> Path:
    """Bar plot of the per-layer scores (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.2))
    layers = list(range(scores.num_layers))
    axis.bar(layers, scores.normalized, color="tab:blue", label="attention importance (normalised)")
    axis.plot(layers, scores.prior, color="tab:orange", label=f"Gaussian prior (mu={scores.mu}, sigma={scores.sigma})")
    axis.plot(layers, scores.combined, "k.", label=f"score (alpha={scores.alpha})")
    axis.set_xlabel("layer")
    axis.set_ylabel("score")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def load_summaries(root: Path) -> list[dict[str, Any]]:
    """Every ``metrics.json`` directly under ``root``'s method folders, in baseline/skyline/kvcomm order."""
    import json

    summaries = [json.loads(path.read_text()) for path in sorted(Path(root).glob("*/metrics.json"))]
    order = {"baseline": 0, "skyline": 1}
    return sorted(summaries, key=lambda s: (order.get(s["method"], 2), s["method"]))


def paper_layout_table(columns: dict[str, Sequence[dict[str, Any]]], digits: int = 3) -> str:
    """Markdown table in the paper's layout: methods as rows, one column per task (``columns``: label → summaries)."""
    methods: list[str] = []
    for summaries in columns.values():
        for summary in summaries:
            if summary["method"] not in methods:
                methods.append(summary["method"])
    header = "| method | " + " | ".join(columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        cells = []
        for summaries in columns.values():
            found = next((s for s in summaries if s["method"] == method), None)
            cells.append("" if found is None else f"{found['score']:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
