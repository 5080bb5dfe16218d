"""Q-KVComm sweep on the packaged model: score against bytes on the wire, uniform vs adaptive bits, with and
without key facts, against fp16 KVComm (all layers) and the text-only Skyline.

    .venv/bin/python scripts/qkvcomm_sweep.py --data-dir ../shared/data --output runs/qkvcomm

Every cell is a resumable results folder (``OUTPUT/TASK/CONFIG``); the script ends with a Markdown table
(``OUTPUT/summary.md``), a JSON dump and a plot (``OUTPUT/score_vs_bytes.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kvcomm.experiment import QuantOptions, build_qkvcomm, load_pair
from kvcomm.methods import Baseline, Skyline
from kvcomm.runner import run_items
from kvcomm.tasks import get_task

TASKS = {  # label: (task, items, answer prefix)
    "demo": ("demo", 100, ""),
    "hotpotqa": ("hotpotqa", 100, "The answer is:"),
    "countries": ("countries", 50, ""),
    "tipsheets": ("tipsheets", 50, ""),
}
CONFIGS = {  # label: QuantOptions
    "fp16": QuantOptions(bits=16),
    "uniform-8": QuantOptions(bits=8, group_size=64),
    "uniform-6": QuantOptions(bits=6, group_size=64),
    "uniform-4": QuantOptions(bits=4, group_size=64),
    "uniform-3": QuantOptions(bits=3, group_size=64),
    "uniform-2": QuantOptions(bits=2, group_size=64),
    "adaptive-4": QuantOptions(bits=4, group_size=64, target_bits=4.0),
    "adaptive-3": QuantOptions(bits=4, group_size=64, target_bits=3.0),
    "adaptive-2.5": QuantOptions(bits=4, group_size=64, target_bits=2.5),
    "uniform-3+facts": QuantOptions(bits=3, group_size=64, facts_budget=32),
    "adaptive-3+facts": QuantOptions(bits=4, group_size=64, target_bits=3.0, facts_budget=32),
    "fp16+facts": QuantOptions(bits=16, facts_budget=32),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output", type=Path, default=Path("runs/qkvcomm"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--calib-size", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sender, receiver = load_pair("smollm2-135m-instruct", "smollm2-135m-instruct", "bf16", "cpu")
    layers = tuple(range(receiver.num_layers))
    results: dict[str, dict[str, dict]] = {}
    for label in args.tasks.split(","):
        task_name, limit, prefix = TASKS[label]
        task = get_task(task_name)
        split = task.load(args.data_dir)
        items = [e.with_answer_prefix(prefix) if prefix else e for e in split.test[:limit]]
        calibration = split.calibration[: args.calib_size]
        rows = results.setdefault(label, {})
        text_bytes = sum(len(e.context.encode()) for e in items) / len(items)
        for name, method in (("baseline", Baseline(receiver)), ("skyline", Skyline(receiver))):
            summary = run_items(method, items, args.output / label / name, task.name, task.metric,
                                {"method": name, "limit": limit, "answer_prefix": prefix})
            rows[name] = {"score": summary["score"], "bytes": text_bytes if name == "skyline" else 0.0}
        for config_name in args.configs.split(","):
            options = CONFIGS[config_name]
            method = build_qkvcomm(sender, receiver, layers, 1, receiver_settings(), options, calibration,
                                   label=config_name)
            config = {"method": config_name, "quant": options.__dict__, "layers": list(layers), "limit": limit,
                      "answer_prefix": prefix, "calibration": [e.id for e in calibration]}
            summary = run_items(method, items, args.output / label / config_name, task.name, task.metric, config)
            costs = summary["costs"]
            rows[config_name] = {"score": summary["score"], "bytes": costs["mean_kv_bytes"] + costs["mean_text_bytes"],
                                 "kv_bytes": costs["mean_kv_bytes"], "text_bytes": costs["mean_text_bytes"]}
        fp16 = rows["fp16"]["bytes"]
        for row in rows.values():
            row["x_smaller_than_fp16"] = fp16 / row["bytes"] if row["bytes"] else None
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    (args.output / "summary.md").write_text(table)
    plot(results, args.output / "score_vs_bytes.png")
    print(table)
    return 0


def receiver_settings():
    from kvcomm.generation import GenerationSettings

    return GenerationSettings()


def render(results: dict[str, dict[str, dict]]) -> str:
    labels = list(results)
    names = list(next(iter(results.values())))
    lines = ["| config | " + " | ".join(f"{t} score | {t} KiB | {t} x vs fp16" for t in labels) + " |",
             "|---" * (1 + 3 * len(labels)) + "|"]
    for name in names:
        cells = []
        for label in labels:
            row = results[label].get(name)
            if row is None:
                cells += ["", "", ""]
                continue
            ratio = row.get("x_smaller_than_fp16")
            cells += [f"{row['score']:.3f}", f"{row['bytes'] / 1024:.1f}", "" if not ratio else f"{ratio:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for axis, (label, rows) in zip(axes[0], results.items()):
        for name, row in rows.items():
            if name == "baseline":
                axis.axhline(row["score"], color="gray", linestyle=":", label="baseline")
                continue
            marker = "s" if name == "skyline" else ("^" if "adaptive" in name else "o")
            color = "tab:green" if "facts" in name else ("black" if name == "skyline" else "tab:blue")
            axis.scatter(row["bytes"] / 1024, row["score"], marker=marker, color=color)
            axis.annotate("skyline (text)" if name == "skyline" else name, (row["bytes"] / 1024, row["score"]),
                          fontsize=6)
        axis.set_xscale("log")
        axis.set_title(label)
        axis.set_xlabel("KiB sent per item (log)")
        axis.set_ylabel("score")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
