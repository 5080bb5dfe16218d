"""Cost record of one answered item, and small timing helpers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch


@dataclass
class CostRecord:
    """What answering one item cost.

    ``kv_bytes`` counts the KV sent (tensors at their dtype, sink tokens included; for a serialised message, its
    encoded length with header); ``*_seconds`` are wall time of
    each side (sender: context prefill; receiver: prefill and generation).
    """

    sender_prefill_tokens: int = 0
    receiver_prefill_tokens: int = 0
    generated_tokens: int = 0
    kv_bytes: int = 0
    text_bytes: int = 0  # UTF-8 bytes of text sent beside (or instead of) the KV, e.g. Q-KVComm's key facts
    sender_seconds: float = 0.0
    receiver_seconds: float = 0.0

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
