"""``AgentClient``: a blocking Python client of one agent service (httpx), one method per endpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Union

import httpx

from kvcomm.generation import GenerationSettings
from kvcomm.models import Fingerprint
from kvcomm.service.errors import ServiceError
from kvcomm.service.schemas import MESSAGE_MEDIA_TYPE, AnswerRequest, AnswerResult, PrefillRequest, Source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MessageRef:
    """A message stored on an agent: ``id`` there, ``url`` the agent's base URL (``None``: the agent being asked);
    or, with ``id=None``, the full URL of a message."""

    id: str | None
    url: str | None = None

    def source(self) -> Source:
        return Source(id=self.id, url=self.url)


MessageInput = Union[bytes, bytearray, memoryview, MessageRef]


@dataclass(frozen=True)
class Prefilled:
    """What ``prefill`` returned: the bytes (inline) or a reference (stored), and the message's shape and cost."""

    payload: bytes | None
    ref: MessageRef | None
    nbytes: int
    context_length: int
    layers: tuple[int, ...]
    sink_tokens: int
    prompt_tokens: int
    seconds: float

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: bytes | None, ref: MessageRef | None) -> "Prefilled":
        return cls(payload, ref, int(meta["bytes"]), int(meta["context_length"]), tuple(meta["layers"]),
                   int(meta["sink_tokens"]), int(meta["prompt_tokens"]), float(meta["seconds"]))


class AgentClient:
    """Talks to one agent service at ``base_url``; ``token`` is its bearer token.

    Every method raises :class:`~kvcomm.service.errors.ServiceError` with the service's status and error code, or
    status 0 and code ``"unreachable"`` when no answer came back. ``client`` may be a ready ``httpx.Client`` (for
    example Starlette's ``TestClient``), then ``base_url`` is only used to name the agent.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0,
                 client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if client is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        else:
            self._http = client
            client.headers.update(headers)
        self._owned = client is None

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise ServiceError(0, "timeout", f"{method} {self.base_url}{path} timed out: {error}") from error
        except httpx.HTTPError as error:
            raise ServiceError(0, "unreachable", f"{method} {self.base_url}{path} failed: "
                               f"{type(error).__name__}: {error}") from error
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise ServiceError.from_json(response.status_code, body, f"{method} {path}: HTTP {response.status_code}: "
                                         f"{response.text[:500]}")
        return response

    @staticmethod
    def _sources(messages: Sequence[MessageInput]) -> tuple[list[Source], dict[str, bytes]]:
        sources, files = [], {}
        for index, message in enumerate(messages):
            if isinstance(message, MessageRef):
                sources.append(message.source())
            elif isinstance(message, (bytes, bytearray, memoryview)):
                name = f"m{index}"
                files[name] = bytes(message)
                sources.append(Source(part=name))
            else:
                raise TypeError(f"messages are bytes or MessageRef, got {type(message).__name__}")
        return sources, files

    def _post(self, path: str, request: dict[str, Any], files: dict[str, bytes]) -> httpx.Response:
        if not files:
            return self._call("POST", path, json=request)
        form = [(name, (f"{name}.kv", data, MESSAGE_MEDIA_TYPE)) for name, data in files.items()]
        return self._call("POST", path, data={"request": json.dumps(request)}, files=form)

    # --- endpoints ----------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return self._call("GET", "/health").json()

    def info(self) -> dict[str, Any]:
        """``GET /fingerprint`` as JSON (model name, fingerprint, layer count, dtype)."""
        return self._call("GET", "/fingerprint").json()

    def fingerprint(self) -> Fingerprint:
        """The agent's model fingerprint."""
        return Fingerprint.from_dict(self.info()["fingerprint"])

    def metrics(self) -> dict[str, Any]:
        """``GET /metrics``."""
        return self._call("GET", "/metrics").json()

    def prefill(self, message: str, layers: Sequence[int] | None = None, sink_tokens: int = 1, bits: int | None = None,
                group_size: int = 32, store: bool = False, extends: Sequence[MessageInput] = ()) -> Prefilled:
        """``POST /prefill``: the agent prefills ``message`` (its chat-wrapped user turn).

        ``store=False`` returns the message bytes, ``store=True`` a :class:`MessageRef` to it on the agent.
        ``extends`` (a chain hop): messages the agent attends to while prefilling.
        """
        sources, files = self._sources(extends)
        request = PrefillRequest(message, None if layers is None else tuple(layers), sink_tokens, bits, group_size,
                                 store, tuple(sources))
        response = self._post("/prefill", request.to_json(), files)
        if store:
            meta = response.json()
            return Prefilled.from_meta(meta, None, MessageRef(meta["id"], self.base_url))
        return Prefilled.from_meta(json.loads(response.headers["x-kvcomm-meta"]), response.content, None)

    def answer(self, message: str, messages: Sequence[MessageInput], answer_prefix: str = "",
               max_new_tokens: int = 48, generation: GenerationSettings | None = None,
               item_id: str | None = None) -> AnswerResult:
        """``POST /answer``: answer ``message`` attending to ``messages`` (bytes sent inline, refs fetched by the agent)."""
        sources, files = self._sources(messages)
        request = AnswerRequest(message, answer_prefix, max_new_tokens, tuple(sources), generation, item_id)
        return AnswerResult.from_json(self._post("/answer", request.to_json(), files).json())

    def upload(self, payload: bytes) -> MessageRef:
        """``POST /messages``: store a message on the agent (validated there); returns its reference."""
        response = self._call("POST", "/messages", content=bytes(payload),
                              headers={"content-type": MESSAGE_MEDIA_TYPE})
        return MessageRef(response.json()["id"], self.base_url)

    def download(self, message_id: str) -> bytes:
        """``GET /messages/{id}``."""
        return self._call("GET", f"/messages/{message_id}").content

    def delete(self, message_id: str) -> None:
        """``DELETE /messages/{id}``."""
        self._call("DELETE", f"/messages/{message_id}")

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
                 ) -> None:
        self.close()
