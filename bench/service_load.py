"""Load test of the agent service: one sender and one receiver service, N concurrent clients.

Each request is one item of a task through :class:`kvcomm.service.RemoteKVComm` (the sender prefills and stores the
message, the receiver fetches it by URL and answers). Reports throughput, p50/p99 latency and bytes moved, and
checks that no answer was lost or mixed up: every HTTP answer must equal the in-process KVComm answer for its item.

    .venv/bin/python bench/service_load.py                       # smollm2-135m-instruct, demo task
    .venv/bin/python bench/service_load.py --tiny --requests 16  # a tiny random model: a quick dry run

Results: ``bench/results/service_load.json`` (``service_load_tiny.json`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("service_load")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(model: str, dtype: str, port: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "kvcomm.service", "serve", "--model", model, "--port", str(port), "--dtype", dtype,
               "--log-level", "warning"]
    return subprocess.Popen(command, env=env)


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 600.0) -> None:
    from kvcomm.service import AgentClient, ServiceError

    deadline = time.monotonic() + timeout_s
    with AgentClient(url, timeout=5) as client:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the service on {url} exited with code {process.returncode}")
            try:
                client.health()
                return
            except ServiceError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the service on {url} did not come up within {timeout_s:g} s")
                time.sleep(0.5)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a name for kvcomm.models.load_model")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model instead (quick dry run)")
    parser.add_argument("--dtype", default=None, help="bf16 (default), fp16 or fp32 (fp32 with --tiny)")
    parser.add_argument("--task", default="demo")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--items", type=int, default=8, help="distinct items cycled through")
    parser.add_argument("--requests", type=int, default=32, help="total requests")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--layers", default="all", help="'all' or a comma list such as 0,5,10")
    parser.add_argument("--bits", type=int, default=None, help="quantize messages (2/3/4/6/8)")
    parser.add_argument("--transport", default="url", choices=["url", "inline"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import torch

    from kvcomm.methods.kvcomm import KVComm
    from kvcomm.models import load_model
    from kvcomm.service import AgentClient, ChainKVComm, RemoteKVComm, ServiceError
    from kvcomm.service.method import with_parts
    from kvcomm.service.tiny import save_tiny_model
    from kvcomm.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    workdir = tempfile.TemporaryDirectory(prefix="kvcomm-load-")
    model_name = str(save_tiny_model(Path(workdir.name) / "tiny")) if args.tiny else args.model
    reference_model = load_model(model_name, dtype=dtype)  # also converts the packaged GGUF once, before the servers
    items = get_task(args.task).load(args.data_dir).test[: args.items]
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    chosen = layers if layers is not None else list(range(reference_model.num_layers))
    if args.bits is None:
        reference = KVComm(reference_model, reference_model, chosen)
    else:
        reference = ChainKVComm([reference_model], reference_model, chosen, bits=args.bits)
    logger.info("in-process reference answers for %d items", len(items))
    expected = {item.id: reference.answer(with_parts(item, 1)).answer for item in items}

    ports = [free_port(), free_port()]
    processes = [start_service(model_name, dtype, port, args.threads) for port in ports]
    sender_url, receiver_url = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for url, process in zip((sender_url, receiver_url), processes):
            wait_healthy(url, process)
        logger.info("services up: sender %s, receiver %s", sender_url, receiver_url)
        results: list[dict[str, Any]] = []
        lock = threading.Lock()
        next_request = [0]

        def client_loop() -> None:
            with AgentClient(sender_url) as sender, AgentClient(receiver_url) as receiver:
                method = RemoteKVComm(sender, receiver, layers, bits=args.bits, transport=args.transport)
                while True:
                    with lock:
                        index = next_request[0]
                        if index >= args.requests:
                            return
                        next_request[0] += 1
                    item = items[index % len(items)]
                    start = time.perf_counter()
                    row: dict[str, Any] = {"request": index, "id": item.id}
                    try:
                        output = method.answer(item)
                        row.update(answer=output.answer, kv_bytes=output.costs.kv_bytes,
                                   matches=output.answer == expected[item.id])
                    except ServiceError as error:
                        row["error"] = f"{error.status} {error.code}: {error.detail}"
                    row["seconds"] = time.perf_counter() - start
                    with lock:
                        results.append(row)

        wall = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - wall
        with AgentClient(sender_url) as sender, AgentClient(receiver_url) as receiver:
            metrics = {"sender": sender.metrics(), "receiver": receiver.metrics()}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        workdir.cleanup()

    done = [row for row in results if "answer" in row]
    latencies = [row["seconds"] for row in done]
    summary = {
        "model": "tiny-random" if args.tiny else args.model, "dtype": dtype, "task": args.task,
        "items": len(items), "requests": args.requests, "concurrency": args.concurrency, "layers": args.layers,
        "bits": args.bits, "transport": args.transport, "threads": args.threads,
        "completed": len(done), "lost": args.requests - len(done),
        "errors": [row["error"] for row in results if "error" in row][:10],
        "mismatched": sum(not row["matches"] for row in done),
        "wall_seconds": round(wall, 3), "throughput_rps": round(len(done) / wall, 3) if wall else None,
        "latency_p50_s": round(percentile(latencies, 0.5), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "kv_wire_bytes_per_request": done[0]["kv_bytes"] if done else None,
        "bytes": {role: {key: metrics[role][key] for key in ("bytes_in", "bytes_out", "bytes_fetched")}
                  for role in metrics},
        "bytes_moved_total": sum(metrics[role]["bytes_in"] + metrics[role]["bytes_out"] for role in metrics),
        "server_latency": {role: metrics[role]["latency"] for role in metrics},
        "server_errors": {role: metrics[role]["errors"] for role in metrics},
    }
    output = args.output or ROOT / "bench" / "results" / ("service_load_tiny.json" if args.tiny else "service_load.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("%d/%d answered, %d mismatched, %.2f req/s, p50 %.3f s, p99 %.3f s -> %s", len(done), args.requests,
                summary["mismatched"], summary["throughput_rps"] or 0, summary["latency_p50_s"],
                summary["latency_p99_s"], output)
    if summary["lost"] or summary["mismatched"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
