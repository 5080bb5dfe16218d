"""Results as tables (terminal, Markdown, CSV) and plots: single runs, layer scores, and evaluation grids."""

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


# ---------------------------------------------------------------------------------------------------------------
# Evaluation grids (kvcomm.evaluation): rebuild tables and plots from a run folder OUT/<task>/<label>/.

FAMILY_NAMES = {"baseline": "Baseline", "skyline": "Skyline", "nld": "NLD", "cipher": "CIPHER", "ac": "AC",
                "kvcomm": "KVComm", "random": "Random", "contiguous": "Contiguous", "kvcomm_s": "KVComm-S",
                "qkvcomm": "Q-KVComm", "kvcomm_multi": "KVComm (several senders)", "online": "KVComm (online)"}
FAMILY_ORDER = list(FAMILY_NAMES)
REFERENCE_FAMILIES = ("baseline", "skyline")
COST_COLUMNS = (  # (header, summary key in "costs", scale, format)
    ("bytes sent", "mean_bytes_sent", 1.0, ",.0f"),
    ("sender FLOPs", "mean_sender_flops", 1.0, ".3g"),
    ("receiver FLOPs", "mean_receiver_flops", 1.0, ".3g"),
    ("sender s", "mean_sender_seconds", 1.0, ".3f"),
    ("receiver s", "mean_receiver_seconds", 1.0, ".3f"),
    ("peak MiB", "mean_peak_memory_bytes", 1 / 2**20, ".1f"),
)
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
PLOTS_DIR = "plots"


def load_grid(run_dir: Path) -> list[dict[str, Any]]:
    """Every cell summary (``<task>/<label>/metrics.json``) of a grid run, with ``label``, ``family``, ``ratio`` and
    ``ac_combine`` added from its ``config.json``; sorted by task, then in the paper's row order."""
    import json

    cells = []
    for path in sorted(Path(run_dir).glob("*/*/metrics.json")):
        summary = json.loads(path.read_text())
        config_path = path.parent / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        params = config.get("params", {})
        summary.update(label=path.parent.name, task=summary.get("task", path.parent.parent.name),
                       family=config.get("family", summary["method"].split("-")[0]), ratio=params.get("ratio"),
                       ac_combine=params.get("ac_combine"))
        cells.append(summary)
    order = _configured_tasks(Path(run_dir))
    return sorted(cells, key=lambda cell: (order.get(cell["task"], len(order)), cell["task"], *row_key(cell)))


def _configured_tasks(run_dir: Path) -> dict[str, int]:
    """Task order of the run's ``eval_config.yaml`` (empty when absent or unreadable)."""
    path = run_dir / "eval_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        tasks = (yaml.safe_load(path.read_text()) or {}).get("tasks") or []
    except (yaml.YAMLError, AttributeError):
        return {}
    return {str(task): index for index, task in enumerate(tasks)}


def row_key(cell: dict[str, Any]) -> tuple[int, str, float]:
    """Sort key of a table row: family in paper order, then AC rule, then ratio."""
    family = cell.get("family", "")
    order = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return order, cell.get("ac_combine") or "", cell.get("ratio") or 0.0


def display_name(cell: dict[str, Any]) -> str:
    """Row name in the paper's style: ``Baseline``, ``AC (replace)``, ``KVComm (0.3)``, ``Random (0.5)``."""
    family = cell.get("family", cell.get("method", ""))
    name = FAMILY_NAMES.get(family, cell.get("label", family))
    if cell.get("ratio") is not None:
        return f"{name} ({cell['ratio']:g})"
    if cell.get("ac_combine"):
        return f"{name} ({cell['ac_combine']})"
    return name


def bytes_sent(cell: dict[str, Any]) -> float:
    """Mean bytes sent per item (KV plus text)."""
    costs = cell.get("costs", {})
    return float(costs.get("mean_kv_bytes", 0.0)) + float(costs.get("mean_text_bytes", 0.0))


def _cost(cell: dict[str, Any], key: str) -> float:
    if key == "mean_bytes_sent":
        return bytes_sent(cell)
    return float(cell.get("costs", {}).get(key, 0.0))


def _rows(cells: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row name, the row's cells) in paper order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for cell in sorted(cells, key=row_key):
        rows.setdefault(display_name(cell), []).append(cell)
    return list(rows.items())


def _tasks(cells: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(cell["task"] for cell in cells))


def grid_score_table(cells: Sequence[dict[str, Any]], digits: int = 3, title: str = "") -> Table:
    """Rich table in the paper's layout: methods as rows, tasks as columns (the task's primary metric)."""
    tasks = _tasks(cells)
    metrics = {cell["task"]: cell["metric"] for cell in cells}
    table = Table(title=title or "score")
    table.add_column("method")
    for task in tasks:
        table.add_column(f"{task}\n({metrics[task]})", justify="right")
    for name, row in _rows(cells):
        by_task = {cell["task"]: cell for cell in row}
        table.add_row(name, *[f"{by_task[t]['score']:.{digits}f}" if t in by_task else "" for t in tasks])
    return table


def cost_rows(cells: Sequence[dict[str, Any]]) -> list[tuple[str, list[float]]]:
    """Per method row: every :data:`COST_COLUMNS` value (per-item means, averaged over the row's tasks, scaled)."""
    rows = []
    for name, row in _rows(cells):
        rows.append((name, [sum(_cost(cell, key) for cell in row) / len(row) * scale
                            for _, key, scale, _ in COST_COLUMNS]))
    return rows


def grid_cost_table(cells: Sequence[dict[str, Any]], title: str = "") -> Table:
    """Rich table of per-item costs by method (means over items, averaged over tasks)."""
    table = Table(title=title or "cost per item (mean over tasks)")
    table.add_column("method")
    for header, *_ in COST_COLUMNS:
        table.add_column(header, justify="right")
    for name, values in cost_rows(cells):
        table.add_row(name, *[format(value, spec) for value, (_, _, _, spec) in zip(values, COST_COLUMNS)])
    return table


def grid_markdown(cells: Sequence[dict[str, Any]], digits: int = 3) -> str:
    """``results.md``: score table (paper layout), cost table, and one line per cell with all its numbers."""
    columns: dict[str, list[dict[str, Any]]] = {}
    token_f1: dict[str, list[dict[str, Any]]] = {}
    for task in _tasks(cells):
        in_order = [{**cell, "method": display_name(cell)}
                    for cell in sorted(cells, key=row_key) if cell["task"] == task]
        columns[f"{task} ({in_order[0]['metric']})"] = in_order
        token_f1[task] = [{**cell, "score": cell.get("metrics", {}).get("token_f1", 0.0)} for cell in in_order]
    lines = ["# Results", "", "## Score (methods × tasks)", "", paper_layout_table(columns, digits),
             "## Continuous token F1 (SQuAD/LongBench normalisation; secondary)", "",
             paper_layout_table(token_f1, digits),
             "## Cost per item (mean over items, averaged over tasks)", "",
             "| method | " + " | ".join(header for header, *_ in COST_COLUMNS) + " |",
             "|---" * (len(COST_COLUMNS) + 1) + "|"]
    for name, values in cost_rows(cells):
        lines.append(f"| {name} | " + " | ".join(format(v, spec) for v, (*_, spec) in zip(values, COST_COLUMNS)) + " |")
    lines += ["", "## Cells", "", "Score ± its standard error over items.", "",
              "| task | method | n | errors | score | bytes sent | sender FLOPs | receiver FLOPs | "
              "sender s | receiver s | peak MiB | layers |", "|---" * 12 + "|"]
    for cell in cells:
        layers = cell.get("layers") or []
        lines.append(f"| {cell['task']} | {display_name(cell)} | {cell['n']} | {cell.get('errors', 0)} | "
                     f"{_score_with_error(cell, digits)} | {bytes_sent(cell):,.0f} | "
                     f"{_cost(cell, 'mean_sender_flops'):.3g} | {_cost(cell, 'mean_receiver_flops'):.3g} | "
                     f"{_cost(cell, 'mean_sender_seconds'):.3f} | "
                     f"{_cost(cell, 'mean_receiver_seconds'):.3f} | "
                     f"{_cost(cell, 'mean_peak_memory_bytes') / 2**20:.1f} | {','.join(map(str, layers))} |")
    return "\n".join(lines) + "\n"


def _score_with_error(cell: dict[str, Any], digits: int) -> str:
    """``0.120 ± 0.046`` (score ± standard error over items), or the score alone for summaries without one."""
    if cell.get("score_stderr") is None:
        return f"{cell['score']:.{digits}f}"
    return f"{cell['score']:.{digits}f} ± {cell['score_stderr']:.{digits}f}"


def write_grid_csv(cells: Sequence[dict[str, Any]], path: Path) -> Path:
    """``results.csv``: one row per cell with its score, every metric, and every mean and total cost field."""
    import csv

    metric_keys = sorted({key for cell in cells for key in cell.get("metrics", {})})
    cost_keys = sorted({key for cell in cells for key in cell.get("costs", {})})
    total_keys = sorted({key for cell in cells for key in cell.get("totals", {})})
    header = ["task", "method", "label", "family", "ratio", "n", "errors", "metric", "score", "score_stderr",
              "mean_bytes_sent",
              "layers", *metric_keys, *cost_keys, *total_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for cell in cells:
            layers = cell.get("layers")
            writer.writerow([cell["task"], display_name(cell), cell.get("label", cell["method"]), cell.get("family"),
                             "" if cell.get("ratio") is None else cell["ratio"], cell["n"], cell.get("errors", 0),
                             cell["metric"], cell["score"], cell.get("score_stderr", ""), bytes_sent(cell),
                             "" if not layers else " ".join(map(str, layers)),
                             *[cell.get("metrics", {}).get(key, "") for key in metric_keys],
                             *[cell.get("costs", {}).get(key, "") for key in cost_keys],
                             *[cell.get("totals", {}).get(key, "") for key in total_keys]])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _task_axes(plt: Any, count: int) -> tuple[Any, list[Any]]:
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    flat = [axis for row in axes for axis in row]
    for axis in flat[count:]:
        axis.set_visible(False)
    return figure, flat[:count]


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _reference_lines(axis: Any, cells: Sequence[dict[str, Any]], value: str = "score") -> None:
    styles = {"baseline": ("tab:gray", "--"), "skyline": ("black", ":")}
    for cell in cells:
        if cell.get("family") in REFERENCE_FAMILIES:
            color, style = styles[cell["family"]]
            axis.axhline(cell[value], color=color, linestyle=style, label=display_name(cell))


def plot_score_vs_ratio(cells: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Score against selection ratio per task (one line per ratio method), Baseline and Skyline as horizontal lines.
    ``None`` (no file) when no cell has a ratio."""
    if not any(cell.get("ratio") is not None for cell in cells):
        return None
    plt = _pyplot()
    tasks = _tasks(cells)
    figure, axes = _task_axes(plt, len(tasks))
    for axis, task in zip(axes, tasks):
        mine = [cell for cell in cells if cell["task"] == task]
        families = dict.fromkeys(cell["family"] for cell in sorted(mine, key=row_key) if cell.get("ratio") is not None)
        for family in families:
            points = sorted((cell["ratio"], cell["score"]) for cell in mine if cell["family"] == family
                            and cell.get("ratio") is not None)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=FAMILY_NAMES.get(family, family))
        _reference_lines(axis, mine)
        axis.set_title(task)
        axis.set_xlabel("selection ratio (layers shared / L)")
        axis.set_ylabel(mine[0]["metric"])
        axis.legend(fontsize=7)
    return _save(plt, figure, path)


def _byte_label(value: float, _position: int) -> str:
    """``1.5 MB``, ``430 kB``, ``64 B`` (decimal units): tick labels of a bytes axis."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def plot_score_vs_bytes(cells: Sequence[dict[str, Any]], path: Path) -> Path:
    """Score against mean bytes sent per item per task (log x when the bytes span two decades or more); methods that
    send nothing (Baseline, Skyline) are horizontal lines."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    tasks = _tasks(cells)
    figure, axes = _task_axes(plt, len(tasks))
    for axis, task in zip(axes, tasks):
        mine = [cell for cell in cells if cell["task"] == task]
        senders = [cell for cell in mine if bytes_sent(cell) > 0]
        for family in dict.fromkeys(cell["family"] for cell in sorted(senders, key=row_key)):
            group = sorted((bytes_sent(cell), cell["score"], display_name(cell)) for cell in senders
                           if cell["family"] == family)
            axis.plot([g[0] for g in group], [g[1] for g in group], marker="o", label=FAMILY_NAMES.get(family, family))
        for cell in mine:
            if bytes_sent(cell) <= 0:
                axis.axhline(cell["score"], linestyle="--", linewidth=1, color="tab:gray" if cell["family"] ==
                             "baseline" else "black", label=f"{display_name(cell)} (0 B)")
        if senders:
            sent = [bytes_sent(cell) for cell in senders]
            if max(sent) >= 100 * min(sent):  # KV next to text or one vector: a log axis
                axis.set_xscale("log")
                axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap within one decade
            else:  # KV cells only: a linear axis with a few ticks
                axis.xaxis.set_major_locator(MaxNLocator(4))
            axis.xaxis.set_major_formatter(FuncFormatter(_byte_label))
        axis.set_title(task)
        axis.set_xlabel("bytes sent per item")
        axis.set_ylabel(mine[0]["metric"])
        axis.legend(fontsize=7)
    return _save(plt, figure, path)


def load_task_scores(run_dir: Path) -> dict[str, LayerScores]:
    """``<task>/layer_scores.json`` of a grid run, by task."""
    return {path.parent.name: LayerScores.load(path) for path in sorted(Path(run_dir).glob("*/layer_scores.json"))}


def plot_layer_heatmap(scores: dict[str, LayerScores], path: Path) -> Path | None:
    """Heatmap of the min–max normalised layer importance, layers × tasks. ``None`` when there are no scores."""
    if not scores:
        return None
    plt = _pyplot()
    tasks = list(scores)
    depth = max(s.num_layers for s in scores.values())
    matrix = [[scores[t].normalized[layer] if layer < scores[t].num_layers else float("nan") for t in tasks]
              for layer in range(depth)]  # [layers, tasks]
    figure, axis = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 1.5 + 0.22 * depth))
    image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    axis.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axis.set_ylabel("layer")
    axis.set_title("layer importance (normalised)")
    figure.colorbar(image, ax=axis)
    return _save(plt, figure, path)


def write_grid_report(run_dir: Path, cells: Sequence[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Rebuild ``results.md``, ``results.csv`` and ``plots/*.png`` of a grid run from its saved folders."""
    run_dir = Path(run_dir)
    cells = load_grid(run_dir) if cells is None else list(cells)
    written: dict[str, Path] = {}
    if not cells:
        return written
    (run_dir / RESULTS_MD).write_text(grid_markdown(cells), encoding="utf-8")
    written["markdown"] = run_dir / RESULTS_MD
    written["csv"] = write_grid_csv(cells, run_dir / RESULTS_CSV)
    plots = run_dir / PLOTS_DIR
    for name, made in (("score_vs_ratio", plot_score_vs_ratio(cells, plots / "score_vs_ratio.png")),
                       ("score_vs_bytes", plot_score_vs_bytes(cells, plots / "score_vs_bytes.png")),
                       ("layer_heatmap", plot_layer_heatmap(load_task_scores(run_dir), plots / "layer_heatmap.png"))):
        if made is not None:
            written[name] = made
    return written
