"""Table-1-style comparison on the packaged model as both agents: every method of the KVComm paper on a few tasks,
with a cost table beside the score table.

    .venv/bin/python scripts/table1.py --data-dir ../shared/data --output runs/table1
    .venv/bin/python scripts/table1.py --cells nld,cipher --threads 1     # a second process for the slow cells

Cells per task: Baseline, Skyline, NLD, CIPHER, AC (replace / sum / mean), KVComm, Random and the best contiguous
chunk at 0.3 / 0.5 / 0.7 of the layers, KVComm-S at the same ratios, and two senders on HotpotQA. The best chunk of
each size is chosen on calibration items by the receiver's log-likelihood of the gold answers (never test
items; the paper picks it on the test set). Every cell is a
resumable results folder ``OUTPUT/TASK/CELL``; rows that failed are retried on the next start. The script ends with
``OUTPUT/table1.md`` (scores in the paper's layout, then costs) and ``OUTPUT/table1.json``; ``--render`` only
rebuilds them from the saved folders (answers are re-scored with the current metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from kvcomm.experiment import build_method, calibrate_on_split, load_pair, SelectionOptions
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.methods import KVComm
from kvcomm.methods.base import Method
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.metrics import score_all
from kvcomm.models import LoadedModel
from kvcomm.multi import calibrate_multi
from kvcomm.prompts import chat_ids
from kvcomm.runner import PREDICTIONS, run_items
from kvcomm.selection import layer_count, random_layers
from kvcomm.tasks import Example, get_task
from kvcomm.tasks.multi import load_hotpotqa_two_senders

logger = logging.getLogger("table1")

TASKS = {  # label: (task, test items, answer prefix)
    "demo": ("demo", 30, ""),
    "countries": ("countries", 50, ""),
    "tipsheets": ("tipsheets", 50, ""),
    "hotpotqa": ("hotpotqa", 50, "The answer is:"),
}
# CPU budget: HotpotQA answers capped at 16 new tokens (the task's 48 mostly add rambling after the answer)
MAX_NEW_TOKENS = {"hotpotqa": 16}
RATIOS = (0.3, 0.5, 0.7)
CHUNK_CALIBRATION_ITEMS = 8
MESSAGE_TOKENS = [256]  # NLD / CIPHER phase-1 length (paper value; --message-tokens)
ROW_ORDER = ["baseline", "skyline", "nld", "cipher", "ac-replace", "ac-sum", "ac-mean",
             *[f"{kind}@{r:g}" for kind in ("kvcomm", "random", "contiguous", "kvcomm_s", "two_senders")
               for r in RATIOS]]


def drop_failed_rows(cell: Path) -> None:
    """Remove rows that recorded an error so that a restart answers those items again."""
    path = cell / PREDICTIONS
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if _is_ok(line)]
    if len(kept) != len(rows):
        logger.warning("%s: retrying %d failed item(s)", cell, len(rows) - len(kept))
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _is_ok(line: str) -> bool:
    try:
        return not json.loads(line).get("error")
    except json.JSONDecodeError:
        return False


def restrict(message: KVMessage, layers: tuple[int, ...]) -> KVMessage:
    """``message`` (every layer sent) cut down to ``layers``: the others keep only their first (sink) token."""
    chosen = set(layers)
    return dataclasses.replace(
        message, layers=tuple(layers),
        keys={l: message.keys[l] for l in layers}, values={l: message.values[l] for l in layers},
        sink_keys={l: message.keys[l][..., :1, :] for l in message.keys if l not in chosen},
        sink_values={l: message.values[l][..., :1, :] for l in message.values if l not in chosen}, sink_tokens=1)


@torch.no_grad()
def gold_log_likelihood(receiver: LoadedModel, message: KVMessage, example: Example) -> float:
    """Mean log-probability per token of the first gold answer after the receiver prompt, attending to ``message``."""
    query = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
    gold = receiver.tokenizer(" " + example.answers[0], add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([query, gold], dim=-1)
    mask = torch.ones(1, message.context_length + ids.shape[-1], dtype=torch.long)
    logits = receiver.model(input_ids=ids, attention_mask=mask, cache=receiver_cache(message, receiver)).logits
    log_probs = logits[0, query.shape[-1] - 1: -1].float().log_softmax(-1)
    return float(log_probs.gather(-1, gold[0].unsqueeze(-1)).mean())


def best_chunk(sender: LoadedModel, receiver: LoadedModel, items: list[Example], size: int
               ) -> tuple[tuple[int, ...], dict[int, float]]:
    """The contiguous chunk of ``size`` layers under which the receiver gives the gold answers of ``items`` the
    highest mean log-likelihood (one teacher-forced forward per chunk and item; lowest start on ties)."""
    messages = [encode_context(sender, chat_ids(receiver.tokenizer, e.messages["sender"]),
                               tuple(range(sender.num_layers)), 1) for e in items]
    scores: dict[int, float] = {}
    for start in range(receiver.num_layers - size + 1):
        chunk = tuple(range(start, start + size))
        scores[start] = statistics.fmean(gold_log_likelihood(receiver, restrict(m, chunk), e)
                                         for m, e in zip(messages, items))
    start = max(scores, key=lambda s: (scores[s], -s))
    return tuple(range(start, start + size)), scores


def cells_for(label: str, sender: LoadedModel, receiver: LoadedModel, data_dir: str, output: Path
              ) -> dict[str, Callable[[], tuple[Method, list[Example], dict]]]:
    """Factories (so that nothing is calibrated for cells that are not run) of every cell of one task."""
    task_name, limit, prefix = TASKS[label]
    task = get_task(task_name)
    split = task.load(data_dir)
    items = [e.with_answer_prefix(prefix) if prefix else e for e in split.test[:limit]]
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS.get(label))
    num_layers = receiver.num_layers
    cache: dict[str, object] = {}

    def scores():
        if "scores" not in cache:
            cache["scores"] = calibrate_on_split(sender, receiver, split, SelectionOptions(calib_size=1))
            cache["scores"].save(output / label / "layer_scores.json")
        return cache["scores"]

    def simple(name: str, **kwargs) -> Callable:
        return lambda: (build_method(name, sender, receiver, (), 1, settings, **kwargs), items, {})

    cells: dict[str, Callable] = {
        "baseline": simple("baseline"),
        "skyline": simple("skyline"),
        "nld": simple("nld", message_tokens=MESSAGE_TOKENS[0]),
        "cipher": simple("cipher", message_tokens=MESSAGE_TOKENS[0]),
        **{f"ac-{combine}": simple("ac", ac_combine=combine) for combine in ("replace", "sum", "mean")},
    }
    for ratio in RATIOS:
        count = layer_count(ratio, num_layers)

        def kvcomm(ratio=ratio):
            layers = scores().select(ratio)
            return KVComm(sender, receiver, layers, 1, settings, name=f"kvcomm@{ratio:g}"), items, {"layers": layers}

        def random_cell(ratio=ratio, count=count):
            layers = random_layers(num_layers, count, 42)
            return KVComm(sender, receiver, layers, 1, settings, name=f"random@{ratio:g}"), items, {"layers": layers}

        def contiguous(ratio=ratio, count=count):
            calibration = [e.with_answer_prefix(prefix) if prefix else e
                           for e in split.calibration[:CHUNK_CALIBRATION_ITEMS]]
            layers, chunk_scores = best_chunk(sender, receiver, calibration, count)
            info = {"layers": layers, "chunk_scores_on_calibration": chunk_scores,
                    "calibration_items": [e.id for e in calibration]}
            return KVComm(sender, receiver, layers, 1, settings, name=f"contiguous@{ratio:g}"), items, info

        def shifted(ratio=ratio):
            layers = scores().select(ratio)
            method = build_method("kvcomm_s", sender, receiver, layers, 1, settings, label=f"kvcomm_s@{ratio:g}")
            return method, items, {"layers": layers}

        cells[f"kvcomm@{ratio:g}"] = kvcomm
        cells[f"random@{ratio:g}"] = random_cell
        cells[f"contiguous@{ratio:g}"] = contiguous
        cells[f"kvcomm_s@{ratio:g}"] = shifted
        if task_name == "hotpotqa":
            def two_senders(ratio=ratio):
                halves = load_hotpotqa_two_senders(data_dir)
                test = [e.with_answer_prefix(prefix) for e in halves.test[:limit]]
                multi_scores = calibrate_multi([sender, sender], receiver, halves.calibration[:1])
                layers = multi_scores.select(ratio)
                method = MultiSenderKVComm([sender, sender], receiver, layers, 1, settings,
                                           name=f"two_senders@{ratio:g}")
                return method, test, {"layers": layers}

            cells[f"two_senders@{ratio:g}"] = two_senders
    return cells


def run_cells(args: argparse.Namespace) -> None:
    sender, receiver = load_pair("smollm2-135m-instruct", "smollm2-135m-instruct", "bf16", "cpu")
    wanted = set(args.cells.split(",")) if args.cells else None
    for label in args.tasks.split(","):
        cells = cells_for(label, sender, receiver, args.data_dir, args.output)
        for name in ROW_ORDER:
            if name not in cells or (wanted is not None and name not in wanted and name.split("@")[0] not in wanted):
                continue
            cell = args.output / label / name.replace("@", "-")
            if (cell / "metrics.json").is_file() and not args.force:
                done = json.loads((cell / "metrics.json").read_text())
                if done.get("n") == TASKS[label][1] and not done.get("errors"):
                    continue
            drop_failed_rows(cell)
            method, items, info = cells[name]()
            config = {"cell": name, "task": label, "message_tokens": MESSAGE_TOKENS[0],
                      "max_new_tokens": MAX_NEW_TOKENS.get(label), "limit": TASKS[label][1], "answer_prefix": TASKS[label][2],
                      "layers": list(info.get("layers", ())),
                      **{k: v for k, v in info.items() if k != "layers"}}
            run_items(method, items, cell, get_task(TASKS[label][0]).name, get_task(TASKS[label][0]).metric,
                      json.loads(json.dumps(config)), progress=not args.quiet)


def cell_summary(cell: Path, metric: str) -> dict | None:
    """Scores re-computed from the saved answers with the current metrics, and mean costs."""
    path = cell / PREDICTIONS
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    scores = [score_all(r["answer"], r["gold"]) if not r.get("error") else None for r in rows]
    metrics = {name: statistics.fmean(s[name] if s else 0.0 for s in scores) for name in next(s for s in scores
                                                                                             if s)}
    cost_keys = sorted({key for r in rows for key in r["costs"]})
    costs = {key: statistics.fmean(float(r["costs"].get(key, 0.0)) for r in rows) for key in cost_keys}
    return {"n": len(rows), "errors": sum(1 for r in rows if r.get("error")), "score": metrics[metric],
            "metrics": metrics, "costs": costs}


def render(output: Path) -> str:
    results: dict[str, dict[str, dict]] = {}
    for label, (task_name, _, _) in TASKS.items():
        metric = get_task(task_name).metric
        for name in ROW_ORDER:
            summary = cell_summary(output / label / name.replace("@", "-"), metric)
            if summary is not None:
                results.setdefault(name, {})[label] = {**summary, "metric": metric}
    (output / "table1.json").write_text(json.dumps(results, indent=2))
    labels = list(TASKS)
    lines = ["## Scores (" + ", ".join(f"{label}: {get_task(TASKS[label][0]).metric}, n={TASKS[label][1]}"
                                        for label in labels) + ")", "",
             "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[label]['score']:.3f}" if label in row else ""
                                                 for label in labels) + " |")
    lines += ["", "## Costs per item (mean over the four tasks' items; bytes sent = KV bytes + text bytes)", "",
              "| method | bytes sent | sender GFLOPs | receiver GFLOPs | sender s | receiver s | total s |",
              "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        def mean(key: str) -> float:
            return statistics.fmean(cell["costs"].get(key, 0.0) for cell in row.values())

        sent = mean("kv_bytes") + mean("text_bytes")
        lines.append(f"| {name} | {sent:,.0f} | {mean('sender_flops') / 1e9:.2f} | {mean('receiver_flops') / 1e9:.2f}"
                     f" | {mean('sender_seconds'):.3f} | {mean('receiver_seconds'):.3f}"
                     f" | {mean('sender_seconds') + mean('receiver_seconds'):.3f} |")
    table = "\n".join(lines) + "\n"
    (output / "table1.md").write_text(table)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output", type=Path, default=Path("runs/table1"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--cells", default="", help="comma-separated cell names or kinds (e.g. nld,kvcomm)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--force", action="store_true", help="rerun finished cells")
    parser.add_argument("--message-tokens", type=int, default=256, help="NLD / CIPHER phase-1 length")
    parser.add_argument("--render", action="store_true", help="only rebuild the tables from saved folders")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    MESSAGE_TOKENS[0] = args.message_tokens
    if not args.render:
        run_cells(args)
    print(render(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
