"""JSON requests and results of the agent endpoints, validated by hand (JSON in, JSON out; nothing unpickled).

A *source* names one KV message a request uses: ``{"part": NAME}`` (a file part of the same multipart request),
``{"id": ID}`` (the answering agent's own store), ``{"url": BASE, "id": ID}`` (``GET BASE/messages/ID`` on another
agent) or ``{"url": FULL_URL}``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import quote

from kvcomm.costs import CostRecord
from kvcomm.generation import GenerationSettings
from kvcomm.quant import ALLOWED_BITS
from kvcomm.service.errors import ServiceError

MESSAGE_MEDIA_TYPE = "application/vnd.kvcomm.kv-message"
REQUEST_HEADER = "x-kvcomm-request"  # JSON request of a raw-body /answer or /prefill call
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def invalid(detail: str) -> ServiceError:
    return ServiceError(422, "invalid_request", detail)


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise invalid(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _unknown(data: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise invalid(f"{what}: unknown field(s) {extra}; allowed: {sorted(allowed)}")


def _int(data: dict[str, Any], name: str, default: int | None, low: int = 0) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise invalid(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _text(data: dict[str, Any], name: str, required: bool = True, default: str = "") -> str:
    value = data.get(name, None if required else default)
    if not isinstance(value, str) or (required and not value.strip()):
        raise invalid(f"{name} must be a {'non-empty ' if required else ''}string, got {value!r}")
    return value


def check_id(message_id: str) -> str:
    if not isinstance(message_id, str) or not ID_PATTERN.match(message_id):
        raise invalid(f"message ids are 1-128 characters of A-Z a-z 0-9 _ . -, got {message_id!r}")
    return message_id


@dataclass(frozen=True)
class Source:
    """Where one KV message of a request comes from (exactly one of ``part``, ``id`` or ``url`` kinds)."""

    part: str | None = None
    id: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if (self.part is None) == (self.id is None and self.url is None) or (self.part is not None and self.url):
            raise invalid(f"a message source is {{'part'}}, {{'id'}}, {{'url', 'id'}} or {{'url'}}, got {self.to_json()}")
        if self.id is not None:
            check_id(self.id)
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise invalid(f"message URLs must be http(s), got {self.url!r}")

    @property
    def location(self) -> str | None:
        """The full URL to download the message from (``None`` for a part or a local id)."""
        if self.url is None:
            return None
        return f"{self.url.rstrip('/')}/messages/{quote(self.id)}" if self.id is not None else self.url

    def to_json(self) -> dict[str, str]:
        return {key: value for key, value in (("part", self.part), ("id", self.id), ("url", self.url)) if value}

    @classmethod
    def from_json(cls, data: Any) -> "Source":
        data = _object(data, "a message source")
        _unknown(data, {"part", "id", "url"}, "message source")
        if not all(isinstance(value, str) for value in data.values()):
            raise invalid(f"message source fields must be strings, got {data}")
        return cls(data.get("part"), data.get("id"), data.get("url"))


def _sources(data: dict[str, Any], name: str) -> tuple[Source, ...]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise invalid(f"{name} must be a list of message sources")
    return tuple(Source.from_json(item) for item in value)


def _bits(value: Any) -> int | None:
    if value is None or value == 16:
        return None
    if isinstance(value, bool) or value not in ALLOWED_BITS:
        raise invalid(f"bits must be one of {list(ALLOWED_BITS)}, 16 or null (no quantization), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PrefillRequest:
    """``POST /prefill``: the sender's user message (chat-wrapped by the agent), layers and packaging options.

    ``extends`` (chain topologies): messages the agent attends to while prefilling; the result then holds their KV
    followed by the agent's own (see :func:`kvcomm.service.chain.extend_message`).
    """

    message: str
    layers: tuple[int, ...] | None = None
    sink_tokens: int = 1
    bits: int | None = None
    group_size: int = 32
    store: bool = False
    extends: tuple[Source, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "layers": None if self.layers is None else list(self.layers),
                "sink_tokens": self.sink_tokens, "bits": self.bits, "group_size": self.group_size,
                "store": self.store, "extends": [source.to_json() for source in self.extends]}

    @classmethod
    def from_json(cls, data: Any) -> "PrefillRequest":
        data = _object(data, "a prefill request")
        _unknown(data, {"message", "layers", "sink_tokens", "bits", "group_size", "store", "extends"}, "prefill")
        layers = data.get("layers")
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise invalid(f"layers must be a non-empty list of ints or null (all layers), got {layers!r}")
        store = data.get("store", False)
        if not isinstance(store, bool):
            raise invalid(f"store must be true or false, got {store!r}")
        return cls(_text(data, "message"), None if layers is None else tuple(layers),
                   _int(data, "sink_tokens", 1), _bits(data.get("bits")), _int(data, "group_size", 32, low=1),
                   store, _sources(data, "extends"))


def generation_from_json(data: Any) -> GenerationSettings | None:
    """Decoding overrides of an answer request (``None``: the agent's defaults)."""
    if data is None:
        return None
    data = _object(data, "generation")
    allowed = {f.name for f in fields(GenerationSettings)} - {"max_new_tokens"}
    _unknown(data, allowed, "generation")
    try:
        return GenerationSettings(**data)
    except (TypeError, ValueError) as error:
        raise invalid(f"generation: {error}") from error


@dataclass(frozen=True)
class AnswerRequest:
    """``POST /answer``: the receiver's user message, answered while attending to ``messages`` (in order; several
    messages are concatenated as in the multi-sender method)."""

    message: str
    answer_prefix: str = ""
    max_new_tokens: int = 48
    messages: tuple[Source, ...] = ()
    generation: GenerationSettings | None = None
    item_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        generation = None
        if self.generation is not None:
            generation = {k: v for k, v in asdict(self.generation).items() if k != "max_new_tokens"}
        return {"message": self.message, "answer_prefix": self.answer_prefix, "max_new_tokens": self.max_new_tokens,
                "messages": [source.to_json() for source in self.messages], "generation": generation,
                "item_id": self.item_id}

    @classmethod
    def from_json(cls, data: Any) -> "AnswerRequest":
        data = _object(data, "an answer request")
        _unknown(data, {"message", "answer_prefix", "max_new_tokens", "messages", "generation", "item_id"}, "answer")
        item_id = data.get("item_id")
        if item_id is not None and not isinstance(item_id, str):
            raise invalid(f"item_id must be a string, got {item_id!r}")
        return cls(_text(data, "message"), _text(data, "answer_prefix", required=False),
                   _int(data, "max_new_tokens", 48, low=1), _sources(data, "messages"),
                   generation_from_json(data.get("generation")), item_id)


@dataclass
class PrefillResult:
    """One encoded message (wire format v1) and what it took."""

    payload: bytes
    context_length: int
    layers: tuple[int, ...]
    sink_tokens: int
    prompt_tokens: int
    seconds: float

    def meta(self) -> dict[str, Any]:
        """Everything but the payload, as JSON."""
        return {"bytes": len(self.payload), "context_length": self.context_length, "layers": list(self.layers),
                "sink_tokens": self.sink_tokens, "prompt_tokens": self.prompt_tokens, "seconds": self.seconds}


@dataclass
class AnswerResult:
    """The receiver's answer; ``costs`` are those of the in-process method, ``kv_wire_bytes`` the encoded bytes used."""

    answer: str
    costs: CostRecord
    layers: tuple[int, ...]
    context_length: int
    kv_wire_bytes: int
    item_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "costs": self.costs.to_dict(), "layers": list(self.layers),
                "context_length": self.context_length, "kv_wire_bytes": self.kv_wire_bytes, "item_id": self.item_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AnswerResult":
        costs = CostRecord(**{f.name: data["costs"][f.name] for f in fields(CostRecord) if f.name in data["costs"]})
        return cls(data["answer"], costs, tuple(data["layers"]), int(data["context_length"]),
                   int(data["kv_wire_bytes"]), data.get("item_id"))
