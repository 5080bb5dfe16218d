"""Throughput of transmission quantization and of the wire format, on one CPU thread.

A synthetic fp16 message shaped like a small model's full KV (default 30 layers × 3 KV heads × 2048 tokens × 64 head
dim, keys and values: 47 MB) is
* quantized + bit-packed (``quantize_message``) and unpacked + dequantized (``dequantize_message``) at every width,
  with the KIVI layout (keys per channel, values per token, G = 32, sink token kept) and with the paper's per-tensor
  layout; throughput = fp16 input bytes / seconds;
* encoded to and decoded from wire-format bytes, unquantized (GB/s of fp16 tensor bytes) and quantized.

Medians over repeats after one warm-up run (the fastest run is recorded too); ``torch.set_num_threads(1)``. Machine
load is recorded because other processes may share the CPU.

    .venv/bin/python bench/quant_throughput.py --repeats 9 --output bench/results/quant_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcomm import wire
from kvcomm.message import KVMessage
from kvcomm.models import Fingerprint
from kvcomm.quant import ALLOWED_BITS, KVQuantConfig, dequantize_message, quantize_message


def synthetic_message(layers: int, heads: int, tokens: int, head_dim: int, seed: int = 0) -> KVMessage:
    """Random fp16 KV for every layer, with a few outlier channels in the keys as real keys have."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = {}, {}
    for layer in range(layers):
        key = torch.randn(1, heads, tokens, head_dim, generator=generator)
        key[..., :4] *= 8  # outlier channels
        keys[layer] = key.half()
        values[layer] = torch.randn(1, heads, tokens, head_dim, generator=generator).half()
    fingerprint = Fingerprint("synthetic", "LlamaForCausalLM", layers, heads, head_dim, heads * 3, heads * 3 * head_dim,
                              "{}", 49152, "0" * 64)
    return KVMessage(tuple(range(layers)), keys, values, {}, {}, tokens, 0, fingerprint)


def median_seconds(function: Callable[[], Any], repeats: int, best: dict[str, float] | None = None,
                   key: str = "") -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after a warm-up; the fastest call goes into ``best[key]``."""
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    if best is not None:
        best[key] = min(times)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--output", type=Path, default=Path("bench/results/quant_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    message = synthetic_message(args.layers, args.heads, args.tokens, args.head_dim)
    size = message.nbytes
    load_before = os.getloadavg()

    rows = []
    layouts = {"kivi": dict(key_axis="channel", value_axis="token", keep_sink=1),
               "tensor": dict(key_axis="tensor", value_axis="tensor", keep_sink=0)}
    for layout, axes in layouts.items():
        for bits in ALLOWED_BITS:
            config = KVQuantConfig(key_bits=bits, value_bits=bits, group_size=args.group_size, **axes)
            best: dict[str, float] = {}
            quantize_s, quantized = median_seconds(lambda: quantize_message(message, config), args.repeats, best, "q")
            dequantize_s, _ = median_seconds(lambda: dequantize_message(quantized), args.repeats, best, "d")
            rows.append({"layout": layout, "bits": bits, "quantize_pack_MBps": size / quantize_s / 1e6,
                         "unpack_dequantize_MBps": size / dequantize_s / 1e6,
                         "best_quantize_pack_MBps": size / best["q"] / 1e6,
                         "best_unpack_dequantize_MBps": size / best["d"] / 1e6, "quantized_bytes": quantized.nbytes,
                         "ratio_vs_fp16": size / quantized.nbytes})

    best: dict[str, float] = {}
    encode_s, payload = median_seconds(lambda: wire.encode(message), args.repeats, best, "encode")
    decode_s, _ = median_seconds(lambda: wire.decode(payload), args.repeats, best, "decode")
    quantized = quantize_message(message, KVQuantConfig(key_bits=4, value_bits=4, group_size=args.group_size))
    q_encode_s, q_payload = median_seconds(lambda: wire.encode(quantized), args.repeats)
    q_decode_s, _ = median_seconds(lambda: wire.decode(q_payload), args.repeats)
    wire_result = {
        "fp16": {"tensor_bytes": size, "payload_bytes": len(payload), "encode_GBps": size / encode_s / 1e9,
                 "decode_GBps": size / decode_s / 1e9, "encode_ms": encode_s * 1e3, "decode_ms": decode_s * 1e3,
                 "best_encode_GBps": size / best["encode"] / 1e9, "best_decode_GBps": size / best["decode"] / 1e9},
        "kivi_4bit": {"payload_bytes": len(q_payload), "ratio_vs_fp16_payload": len(payload) / len(q_payload),
                      "encode_ms": q_encode_s * 1e3, "decode_ms": q_decode_s * 1e3},
    }

    shape = f"{args.layers} layers × {args.heads} kv heads × {args.tokens} tokens × {args.head_dim} head dim, K+V, fp16"
    print(f"message: {shape} = {size / 1e6:.1f} MB; one thread; medians of {args.repeats}")
    print(f"{'layout':<8}{'bits':>5}{'quantize+pack MB/s':>20}{'unpack+dequant MB/s':>21}{'bytes':>12}{'× vs fp16':>11}")
    for row in rows:
        print(f"{row['layout']:<8}{row['bits']:>5}{row['quantize_pack_MBps']:>20.0f}{row['unpack_dequantize_MBps']:>21.0f}"
              f"{row['quantized_bytes']:>12}{row['ratio_vs_fp16']:>11.2f}")
    fp16 = wire_result["fp16"]
    print(f"wire fp16: encode {fp16['encode_GBps']:.2f} GB/s ({fp16['encode_ms']:.1f} ms), "
          f"decode {fp16['decode_GBps']:.2f} GB/s ({fp16['decode_ms']:.1f} ms), payload {fp16['payload_bytes']} bytes")
    q4 = wire_result["kivi_4bit"]
    print(f"wire KIVI 4-bit: encode {q4['encode_ms']:.1f} ms, decode {q4['decode_ms']:.1f} ms, payload "
          f"{q4['payload_bytes']} bytes ({q4['ratio_vs_fp16_payload']:.2f}× smaller than the fp16 payload)")

    result = {"message": shape, "message_bytes": size, "repeats": args.repeats, "threads": 1,
              "group_size": args.group_size, "quantization": rows, "wire": wire_result,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                              "load_average_before": load_before, "load_average_after": os.getloadavg()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
