"""Cost record of one answered item, and small timing and peak-memory helpers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class CostRecord:
    """What answering one item cost.

    ``kv_bytes`` counts the KV sent (tensors at their dtype, sink tokens included; for a serialised message, its
    encoded length with header); ``*_seconds`` are wall time of
    each side (sender: context prefill; receiver: prefill and generation).

    ``text_tokens``: tokens (or CIPHER vectors) of the text message sent; ``sender_flops`` / ``receiver_flops``:
    analytic forward FLOPs of each side (:mod:`kvcomm.flops`); ``attended_context_keys``: sender keys the receiver
    attends to, summed over its layers (KVComm: ``|C|·M + sink·(L - M)``); ``peak_memory_bytes``: filled by the
    runner (:func:`peak_memory`): on CUDA ``torch.cuda.max_memory_allocated`` of the item (weights included), on CPU
    the growth of the process's resident-set high-water mark over its size before the item.
    """

    sender_prefill_tokens: int = 0
    receiver_prefill_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes: int = 0
    text_bytes: int = 0  # UTF-8 bytes of text sent beside (or instead of) the KV, e.g. Q-KVComm's key facts
    sender_seconds: float = 0.0
    receiver_seconds: float = 0.0
    text_tokens: int = 0
    sender_flops: int = 0
    receiver_flops: int = 0
    attended_context_keys: int = 0
    peak_memory_bytes: int = 0

    @property
    def total_flops(self) -> int:
        return self.sender_flops + self.receiver_flops

    @property
    def bytes_sent(self) -> int:
        """KV bytes plus text bytes."""
        return self.kv_bytes + self.text_bytes

    @property
    def total_seconds(self) -> float:
        return self.sender_seconds + self.receiver_seconds

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds after the block (device synchronised)."""
    elapsed = [0.0]
    synchronize(device)
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        synchronize(device)
        elapsed[0] = time.perf_counter() - start


@dataclass
class MemoryPeak:
    """Result of :func:`peak_memory`: ``bytes`` (set when the block ends) and how it was measured (``method``)."""

    bytes: int = 0
    method: str = ""


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write ``5`` to ``/proc/self/clear_refs``)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class _RssSampler(threading.Thread):
    """Fallback where ``clear_refs`` is unavailable: samples the RSS (psutil) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextmanager
def peak_memory(device: torch.device | str | None = None) -> Iterator[MemoryPeak]:
    """Peak memory of the block.

    CUDA ``device``: the peak counter is reset before the block and ``torch.cuda.max_memory_allocated`` read after it
    (everything allocated on that device: weights, cache, activations). CPU: the growth of the process's resident
    set during the block over its size before it — read exactly from the kernel's high-water mark (``VmHWM`` after
    resetting it through ``/proc/self/clear_refs``) on Linux, else from a psutil thread sampling every 5 ms (may miss
    short spikes). Memory freed before the block and reused inside it does not count (the allocator keeps it).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    result = MemoryPeak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.bytes, result.method = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
        return
    baseline = _status_kib("VmRSS")
    if baseline is not None and _reset_high_water_mark():
        try:
            yield result
        finally:
            peak = _status_kib("VmHWM") or baseline
            result.bytes, result.method = max(0, peak - baseline) * 1024, "rss_hwm"
        return
    sampler = _RssSampler()
    start = sampler.peak
    sampler.start()
    try:
        yield result
    finally:
        result.bytes, result.method = max(0, sampler.stop() - start), "rss_sampled"
