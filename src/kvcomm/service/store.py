"""A bounded in-memory store of encoded KV messages: a time to live and a byte cap, evicting the oldest first."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcomm.service.errors import ServiceError

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    payload: bytes
    expires: float


class MessageStore:
    """Encoded messages by id. ``put`` evicts expired messages, then the oldest ones until the new one fits.

    Thread-safe. ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_bytes, self.clock = ttl_s, max_bytes, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted_ttl = 0
        self.evicted_cap = 0

    def put(self, payload: bytes, message_id: str | None = None) -> str:
        """Store ``payload``; returns its id (a fresh random one unless given). 413 when it exceeds the cap alone."""
        size = len(payload)
        if size > self.max_bytes:
            raise ServiceError(413, "payload_too_large",
                               f"a {size}-byte message exceeds the store's {self.max_bytes}-byte cap (--store-mb)")
        message_id = message_id or uuid.uuid4().hex
        with self._lock:
            self._drop(message_id)
            self._expire()
            while self._bytes + size > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.evicted_cap += 1
                logger.info("store full: evicted message %s", oldest)
            self._entries[message_id] = _Entry(bytes(payload), self.clock() + self.ttl_s)
            self._bytes += size
        return message_id

    def get(self, message_id: str) -> bytes | None:
        """The payload, or ``None`` when unknown, evicted or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.get(message_id)
            return None if entry is None else entry.payload

    def expires_in(self, message_id: str) -> float | None:
        with self._lock:
            entry = self._entries.get(message_id)
            return None if entry is None else max(entry.expires - self.clock(), 0.0)

    def delete(self, message_id: str) -> bool:
        with self._lock:
            return self._drop(message_id)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire()
            return {"messages": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s, "evicted_ttl": self.evicted_ttl, "evicted_cap": self.evicted_cap}

    def _drop(self, message_id: str) -> bool:
        entry = self._entries.pop(message_id, None)
        if entry is None:
            return False
        self._bytes -= len(entry.payload)
        return True

    def _expire(self) -> None:
        now = self.clock()
        # entries are in insertion order and share one TTL, so expired ones are at the front
        while self._entries:
            message_id, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            self._drop(message_id)
            self.evicted_ttl += 1
