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
import math
from pathlib import Path

from kvcomm.experiment import QuantOptions, build_qkvcomm, load_pair
from kvcomm.message import encode_context
from kvcomm.metrics import paper_coherence
from kvcomm.prompts import chat_ids
from kvcomm.quant import QuantizedTensor
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
    # group 128: one (scale, zero) per channel over up to 128 tokens, halving the key overhead on short contexts
    "uniform-3-g128": QuantOptions(bits=3, group_size=128),
    "adaptive-3-g128": QuantOptions(bits=4, group_size=128, target_bits=3.0),
    "uniform-3-g128+facts": QuantOptions(bits=3, group_size=128, facts_budget=32),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output", type=Path, default=Path("runs/qkvcomm"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--calib-size", type=int, default=2)
    parser.add_argument("--no-references", action="store_true", help="skip the Baseline and Skyline cells")
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
        references = () if args.no_references else (("baseline", Baseline(receiver)), ("skyline", Skyline(receiver)))
        for name, method in references:
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
                                 "kv_bytes": costs["mean_kv_bytes"], "text_bytes": costs["mean_text_bytes"],
                                 "paper_coherence": mean_coherence(args.output / label / config_name),
                                 "paper_ratio_vs_fp32": paper_ratio(method, calibration[0])}
        fp16 = rows["fp16"]["bytes"]
        for row in rows.values():
            row["x_smaller_than_fp16"] = fp16 / row["bytes"] if row["bytes"] else None
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    (args.output / "summary.md").write_text(table)
    plot(results, args.output / "score_vs_bytes.png")
    print(table)
    return 0


def mean_coherence(cell: Path) -> float:
    """The Q-KVComm paper's coherence heuristic averaged over a cell's predictions (a labelled extra)."""
    answers = [json.loads(line)["answer"] for line in (cell / "predictions.jsonl").read_text().splitlines()]
    return sum(paper_coherence(answer) for answer in answers) / max(1, len(answers))


def paper_ratio(method, example) -> float:
    """The paper's compression figure: mean over layers of (K+V bytes in fp32) / (K+V bytes sent), one message."""
    context_ids = chat_ids(method.receiver.tokenizer, example.messages["sender"])
    message = method.compress(encode_context(method.sender, context_ids, method.layers, method.sink_tokens))
    ratios = []
    for layer in message.layers:
        parts = (message.keys[layer], message.values[layer])
        sent = sum(p.nbytes if isinstance(p, QuantizedTensor) else p.numel() * p.element_size() for p in parts)
        ratios.append(sum(p.numel() if not isinstance(p, QuantizedTensor) else math.prod(p.shape) for p in parts)
                      * 4 / sent)
    return sum(ratios) / len(ratios)


def receiver_settings():
    from kvcomm.generation import GenerationSettings

    return GenerationSettings()


def render(results: dict[str, dict[str, dict]]) -> str:
    labels = list(results)
    names = list(next(iter(results.values())))
    lines = ["| config | " + " | ".join(f"{t} score | {t} KiB | {t} x vs fp16" for t in labels)
             + " | paper ratio vs fp32 (mean of layers) | paper coherence (demo) |",
             "|---" * (3 + 3 * len(labels)) + "|"]
    for name in names:
        cells = []
        for label in labels:
            row = results[label].get(name)
            if row is None:
                cells += ["", "", ""]
                continue
            ratio = row.get("x_smaller_than_fp16")
            cells += [f"{row['score']:.3f}", f"{row['bytes'] / 1024:.1f}", "" if not ratio else f"{ratio:.2f}"]
        first = results[labels[0]].get(name, {})
        extra = [f"{first['paper_ratio_vs_fp32']:.2f}" if "paper_ratio_vs_fp32" in first else "",
                 f"{first['paper_coherence']:.3f}" if "paper_coherence" in first else ""]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
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
