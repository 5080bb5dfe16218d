"""Latency benchmark: Baseline, Skyline and KVComm on the packaged model at several context lengths.

Whole method calls (prompt building, tokenisation, sender prefill, receiver prefill + generation), medians over
repeats, every method generating exactly ``--new-tokens`` tokens, ratios against Skyline in the same run. Also times
the bare transformers calls KVComm(all layers) makes (sender prefill → DynamicCache → receiver generate on that
cache) to measure the library's own overhead. Peak memory: the process's resident-set growth during a call (CPU) or
``torch.cuda.max_memory_allocated`` (GPU).

    .venv/bin/python bench/latency.py --lengths 256,1024,4096 --repeats 7 --output bench/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import DynamicCache

from kvcomm import Example, GenerationSettings, KVComm, Skyline, Baseline, load_model
from kvcomm.experiment import environment
from kvcomm.prompts import chat_ids
from kvcomm.selection import calibrate
from kvcomm.tasks import get_task
from kvcomm.tasks.demo import NAMES, TOWNS


def make_example(model, target_tokens: int, new_tokens: int) -> Example:
    """A context of roughly ``target_tokens`` sender-prompt tokens made of 'X lives in Y.' facts."""
    facts, index = [], 0
    while True:
        name, town = NAMES[index % len(NAMES)] + str(index), TOWNS[(index * 7) % len(TOWNS)]
        facts.append(f"{name} lives in {town}.")
        index += 1
        probe = Example.qa(context=" ".join(facts), question="Where does Alice0 live?", answers=[TOWNS[0]])
        if chat_ids(model.tokenizer, probe.messages["sender"]).shape[-1] >= target_tokens:
            return Example.qa(context=" ".join(facts), question="Where does Alice0 live?", answers=[TOWNS[0]],
                              max_new_tokens=new_tokens, answer_prefix="Alice0 lives in")


class PeakMemory:
    """Peak resident-set growth (CPU, sampled every 0.5 ms; glibc's mmap threshold fixed so freed tensors leave the resident set) or peak CUDA allocation during a block."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.process, self.running = psutil.Process(), True
        self.start = self.process.memory_info().rss
        self.peak_rss = self.start
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = self.peak_rss - self.start


@torch.no_grad()
def bare_transformers(model, example: Example, new_tokens: int) -> tuple[float, float]:
    """The calls KVComm(all layers) makes, written directly against transformers: (sender s, receiver s)."""
    context = chat_ids(model.tokenizer, example.messages["sender"]).to(model.device)
    query = chat_ids(model.tokenizer, example.messages["receiver"], example.answer_prefix).to(model.device)
    start = time.perf_counter()
    cache = model.model(input_ids=context, use_cache=True, logits_to_keep=1).cache
    middle = time.perf_counter()
    assert isinstance(cache, DynamicCache)
    mask = torch.ones(1, context.shape[-1] + query.shape[-1], dtype=torch.long, device=model.device)
    model.model.generate(input_ids=query, attention_mask=mask, cache=cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=model.tokenizer.pad_token_id)
    end = time.perf_counter()
    return middle - start, end - middle


def build(args):
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, ignore_eos=True)
    demo = get_task("demo").load()
    layers_ratio = calibrate(model, model, demo.calibration[:1]).select(args.ratio)
    methods = {
        "baseline": Baseline(model, settings),
        "skyline": Skyline(model, settings),
        "kvcomm_all": KVComm(model, model, range(model.num_layers), settings=settings),
        f"kvcomm_{args.ratio:g}": KVComm(model, model, layers_ratio, settings=settings),
    }
    return model, methods, layers_ratio


def memory_probe(args) -> int:
    """Child process: peak resident-set growth of one call per (length, method), printed as JSON."""
    model, methods, _ = build(args)
    peaks: dict[str, dict[str, float]] = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        example = make_example(model, length, args.new_tokens)
        peaks[str(length)] = {}
        for name, method in methods.items():
            method.answer(example)
            values = []
            for _ in range(3):
                with PeakMemory(model.device) as memory:
                    method.answer(example)
                values.append(memory.peak)
            peaks[str(length)][name] = statistics.median(values) / 2**20
    print("MEMORY " + json.dumps(peaks))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("bench/results/latency.json"))
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args)

    memory: dict[str, dict[str, float]] = {}
    if not args.no_memory and args.device == "cpu":
        # separate process: a fixed glibc mmap threshold returns every large tensor to the OS when freed, so the
        # resident set follows live memory; it also slows allocation, so timings are taken without it
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run([sys.executable, __file__, "--memory-probe", *sys.argv[1:]], env=env,
                               capture_output=True, text=True, check=True)
        memory = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("MEMORY "))[7:])

    model, methods, layers_ratio = build(args)
    results = {"environment": {**environment(), "model": args.model, "dtype": args.dtype, "device": args.device,
                               "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                               "repeats": args.repeats, f"layers_{args.ratio:g}": list(layers_ratio)},
               "lengths": {}}
    for length in [int(x) for x in args.lengths.split(",")]:
        example = make_example(model, length, args.new_tokens)
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in [*methods, "bare_transformers_all"]}
        costs = {}
        for name, method in methods.items():
            costs[name] = method.answer(example).costs  # warm-up
        bare_transformers(model, example, args.new_tokens)
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every method alike
            for name, method in methods.items():
                start = time.perf_counter()
                output = method.answer(example)
                samples[name].append((time.perf_counter() - start, output.costs.sender_seconds,
                                      output.costs.receiver_seconds))
            start = time.perf_counter()
            sender_s, receiver_s = bare_transformers(model, example, args.new_tokens)
            samples["bare_transformers_all"].append((time.perf_counter() - start, sender_s, receiver_s))
        rows: dict[str, dict[str, float]] = {}
        for name, values in samples.items():
            rows[name] = {"total_s": statistics.median(v[0] for v in values),
                          "sender_s": statistics.median(v[1] for v in values),
                          "receiver_s": statistics.median(v[2] for v in values),
                          "peak_memory_mb": memory.get(str(length), {}).get(name, float("nan"))}
            if name in costs:
                rows[name].update(sender_tokens=costs[name].sender_prefill_tokens,
                                  receiver_tokens=costs[name].receiver_prefill_tokens, kv_bytes=costs[name].kv_bytes)
        sky = rows["skyline"]
        for row in rows.values():
            row["total_vs_skyline"] = row["total_s"] / sky["total_s"]
            row["receiver_vs_skyline"] = row["receiver_s"] / sky["receiver_s"]
        rows["kvcomm_all"]["overhead_vs_bare"] = rows["kvcomm_all"]["total_s"] / rows["bare_transformers_all"]["total_s"] - 1
        results["lengths"][str(length)] = rows
        print(f"\n== context ≈{length} tokens (sender prompt {rows['kvcomm_all']['sender_tokens']} tokens) ==")
        print(f"{'method':<24}{'total s':>9}{'sender s':>10}{'recv s':>9}{'tot/sky':>9}{'recv/sky':>9}{'peak MB':>9}")
        for name, row in rows.items():
            print(f"{name:<24}{row['total_s']:>9.3f}{row['sender_s']:>10.3f}{row['receiver_s']:>9.3f}"
                  f"{row['total_vs_skyline']:>9.2f}{row['receiver_vs_skyline']:>9.2f}{row['peak_memory_mb']:>9.1f}")
        print(f"library overhead over bare transformers (kvcomm, all layers): "
              f"{100 * rows['kvcomm_all']['overhead_vs_bare']:+.1f}%")
        sys.stdout.flush()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"\nsaved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
