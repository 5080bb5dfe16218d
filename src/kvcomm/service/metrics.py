"""Request counters of one service: requests and statuses per route, bytes in and out, latencies, errors."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

ROUTES = ("/health", "/fingerprint", "/metrics", "/prefill", "/answer", "/messages", "/messages/{id}")
WINDOW = 2048  # latencies kept per route for percentiles


def route_of(path: str) -> str:
    """The route template of ``path`` (ids folded), so counters stay bounded."""
    if path in ROUTES:
        return path
    if path.startswith("/messages/"):
        return "/messages/{id}"
    return "other"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)] if ordered else 0.0


class Metrics:
    """Thread-safe counters; :meth:`snapshot` is what ``GET /metrics`` returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_fetched = 0
        self.in_flight = 0
        self.model_seconds: Counter[str] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self._latency_sum: Counter[str] = Counter()
        self._latency_max: dict[str, float] = {}

    def started(self, route: str) -> None:
        with self._lock:
            self.requests[route] += 1
            self.in_flight += 1

    def finished(self, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.statuses[str(status)] += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            self._latency.setdefault(route, deque(maxlen=WINDOW)).append(seconds)
            self._latency_sum[route] += seconds
            self._latency_max[route] = max(self._latency_max.get(route, 0.0), seconds)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def fetched(self, count: int) -> None:
        with self._lock:
            self.bytes_fetched += count

    def model_time(self, what: str, seconds: float) -> None:
        with self._lock:
            self.model_seconds[what] += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = {}
            for route, window in self._latency.items():
                values = list(window)
                latency[route] = {"count": self.requests[route], "sum_s": self._latency_sum[route],
                                  "max_s": self._latency_max[route], "p50_s": _percentile(values, 0.5),
                                  "p99_s": _percentile(values, 0.99)}
            return {"requests": dict(self.requests), "requests_total": sum(self.requests.values()),
                    "statuses": dict(self.statuses), "errors": dict(self.errors), "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out, "bytes_fetched": self.bytes_fetched, "in_flight": self.in_flight,
                    "latency": latency, "model_seconds": dict(self.model_seconds)}
