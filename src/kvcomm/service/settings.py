"""Settings of one agent service (limits, authentication, timeouts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcomm.errors import KVCommError
from kvcomm.generation import GenerationSettings

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """How an agent service behaves.

    Attributes
    ----------
    token : str or None
        Bearer token every request but ``GET /health`` must present (``None``: no authentication).
    max_message_bytes : int
        Largest KV message accepted, uploaded or fetched from another agent (413 beyond).
    max_messages : int
        Most KV messages one request may use.
    max_json_bytes : int
        Largest JSON request body.
    store_ttl_s : float
        Seconds a stored message lives.
    store_max_bytes : int
        Memory cap of the message store; the oldest messages are evicted to make room.
    request_timeout_s : float
        Wall-clock limit of one request, including waiting for the model (504 beyond).
    fetch_timeout_s : float
        Limit for downloading one message from another agent.
    peer_token : str or None
        Bearer token presented when fetching messages from other agents.
    allowed_peers : tuple[str, ...] or None
        URL prefixes messages may be fetched from (``None``: any http(s) URL).
    generation : GenerationSettings
        Default decoding options (requests may override them).
    """

    token: str | None = None
    max_message_bytes: int = 256 * MIB
    max_messages: int = 8
    max_json_bytes: int = 1 * MIB
    store_ttl_s: float = 600.0
    store_max_bytes: int = 1024 * MIB
    request_timeout_s: float = 300.0
    fetch_timeout_s: float = 60.0
    peer_token: str | None = None
    allowed_peers: tuple[str, ...] | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_messages", "max_json_bytes", "store_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVCommError(f"{name} must be a positive int, got {value!r}")
        for name in ("store_ttl_s", "request_timeout_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise KVCommError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.token is not None and not self.token:
            raise KVCommError("token must be a non-empty string or None")
