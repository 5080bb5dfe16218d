"""Seconds per item of every method of the KVComm paper on the packaged model, sender and receiver apart, as ratios
to Skyline in the same run.

    .venv/bin/python bench/methods.py --lengths 256,2048 --repeats 3 --output bench/results/methods.json

Whole method calls (prompt building, tokenisation, every model call), medians over interleaved repeats after one
warm-up, every answer exactly ``--new-tokens`` tokens; NLD and CIPHER phase-1 messages exactly ``--message-tokens``
long (EOS ignored) so that both do the same amount of decoding. The two-sender row splits the same context in two
halves; its receiver is compared with one KVComm call on the whole context. Targets (issue): AC ≤ 1.1× Skyline end
to end; CIPHER ≤ 1.5× NLD at every length; two senders' receiver ≤ one KVComm receiver on the concatenated context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import make_example  # noqa: E402  (same folder: the context builder of the latency benchmark)

from kvcomm import GenerationSettings, load_model  # noqa: E402
from kvcomm.experiment import environment  # noqa: E402
from kvcomm.methods import AC, CIPHER, NLD, Baseline, KVComm, KVCommS, Skyline  # noqa: E402
from kvcomm.methods.multi_sender import MultiSenderKVComm  # noqa: E402
from kvcomm.selection import calibrate  # noqa: E402
from kvcomm.tasks import get_task  # noqa: E402
from kvcomm.tasks.multi import two_sender_item  # noqa: E402


def build(model, args) -> dict[str, object]:
    settings = GenerationSettings(max_new_tokens=args.new_tokens, ignore_eos=True)
    layers = calibrate(model, model, get_task("demo").load().calibration[:1]).select(args.ratio)
    every = tuple(range(model.num_layers))
    return {
        "baseline": Baseline(model, settings),
        "skyline": Skyline(model, settings),
        "kvcomm_all": KVComm(model, model, every, settings=settings),
        f"kvcomm_{args.ratio:g}": KVComm(model, model, layers, settings=settings),
        f"kvcomm_s_{args.ratio:g}": KVCommS(model, model, layers, settings=settings, shift_back=True),
        "ac_replace": AC(model, model, combine="replace", settings=settings),
        "ac_sum": AC(model, model, combine="sum", settings=settings),
        "ac_mean": AC(model, model, combine="mean", settings=settings),
        "nld": NLD(model, model, args.message_tokens, settings=settings, full_messages=True),
        "cipher": CIPHER(model, model, args.message_tokens, settings=settings, full_messages=True),
        "two_senders_all": MultiSenderKVComm([model, model], model, every, settings=settings),
    }


def two_sender_example(model, length: int, new_tokens: int):
    """The latency benchmark's facts context, as two halves for two senders (the whole context for the others)."""
    base = make_example(model, length, new_tokens)
    facts = [fact if fact.endswith(".") else fact + "." for fact in base.context.split(". ")]
    item = two_sender_item("bench", facts, base.question, base.answers, max_new_tokens=new_tokens)
    return item.with_answer_prefix(base.answer_prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", default="256,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--message-tokens", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/methods.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    methods = build(model, args)
    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}
    results: dict[str, dict] = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        example = two_sender_example(model, length, args.new_tokens)
        times: dict[str, dict[str, list[float]]] = {name: {"total": [], "sender": [], "receiver": []}
                                                   for name in methods}
        for method in methods.values():  # warm-up
            method.answer(example)
        for repeat in range(args.repeats):
            for name, method in methods.items():
                costs = method.answer(example).costs
                times[name]["sender"].append(costs.sender_seconds)
                times[name]["receiver"].append(costs.receiver_seconds)
                times[name]["total"].append(costs.sender_seconds + costs.receiver_seconds)
            print(f"length {length}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        medians = {name: {part: statistics.median(values) for part, values in parts.items()}
                   for name, parts in times.items()}
        sky = medians.get("skyline", {}).get("total")
        for row in medians.values():
            row["x_skyline"] = row["total"] / sky if sky else None
        results[str(length)] = {"context_tokens": length, "seconds": medians}
    checks = {}
    for length, entry in results.items():
        rows = entry["seconds"]
        if "skyline" in rows:
            for name in ("ac_replace", "ac_sum", "ac_mean"):
                if name in rows:
                    checks[f"{name} / skyline @ {length}"] = rows[name]["total"] / rows["skyline"]["total"]
        if "nld" in rows and "cipher" in rows:
            checks[f"cipher / nld @ {length}"] = rows["cipher"]["total"] / rows["nld"]["total"]
        if "two_senders_all" in rows and "kvcomm_all" in rows:
            checks[f"two senders receiver / kvcomm receiver @ {length}"] = (
                rows["two_senders_all"]["receiver"] / rows["kvcomm_all"]["receiver"])
    report = {"args": vars(args) | {"output": str(args.output)}, "environment": environment(),
              "results": results, "checks": checks}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    lines = ["| method | " + " | ".join(f"{n} total s | {n} sender s | {n} receiver s | {n} x Skyline"
                                        for n in results) + " |", "|---" * (1 + 4 * len(results)) + "|"]
    for name in methods:
        cells = []
        for entry in results.values():
            row = entry["seconds"][name]
            cells += [f"{row['total']:.3f}", f"{row['sender']:.3f}", f"{row['receiver']:.3f}",
                      f"{row['x_skyline']:.2f}" if row["x_skyline"] else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- {key}: {value:.2f}" for key, value in checks.items())]
    table = "\n".join(lines)
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
