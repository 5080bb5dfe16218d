"""Endpoints: one interface over an agent in this process, behind HTTP, or in a Ray actor.

A :class:`Handle` is a KV message somewhere: inline bytes, a message stored on an HTTP agent (receivers fetch it
themselves from the sender's URL), or a Ray object reference. Each endpoint takes handles of any kind and turns them
into what it can use, so topologies may mix local, remote and Ray agents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvcomm.models import Fingerprint
from kvcomm.service.agent import Agent
from kvcomm.service.client import AgentClient, MessageInput, MessageRef, Prefilled
from kvcomm.service.errors import ServiceError
from kvcomm.service.schemas import AnswerRequest, AnswerResult, PrefillRequest

logger = logging.getLogger(__name__)

TRANSPORTS = ("url", "inline")


@dataclass
class Handle:
    """One KV message: ``payload`` bytes, or a ``ref`` stored on an HTTP agent, or a Ray ``object_ref``.

    ``loader`` produces the bytes when a consumer needs them; ``meta_loader`` the prefill metadata (``bytes``,
    ``context_length``, ``layers``, ``seconds``, …).
    """

    payload: bytes | None = None
    ref: MessageRef | None = None
    object_ref: Any = None
    loader: Callable[[], bytes] | None = None
    meta_loader: Callable[[], dict[str, Any]] | None = None
    owner: "Endpoint | None" = None
    _meta: dict[str, Any] | None = field(default=None, repr=False)

    def data(self) -> bytes:
        """The encoded message bytes (downloaded or fetched from Ray when not inline)."""
        if self.payload is None:
            if self.loader is None:
                raise ServiceError(0, "no_payload", "this message handle has no bytes and no way to load them")
            self.payload = self.loader()
        return self.payload

    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = self.meta_loader() if self.meta_loader is not None else {}
        return self._meta


class Endpoint(Protocol):
    """What the topology runner and :class:`~kvcomm.service.method.AgentsKVComm` need from an agent."""

    name: str

    def fingerprint(self) -> Fingerprint: ...

    def prefill(self, request: PrefillRequest, incoming: Sequence[Handle] = ()) -> Handle: ...

    def answer(self, request: AnswerRequest, incoming: Sequence[Handle]) -> AnswerResult: ...

    def release(self, handle: Handle) -> None: ...


class LocalEndpoint:
    """An :class:`~kvcomm.service.agent.Agent` in this process (messages travel as bytes)."""

    def __init__(self, agent: Agent, name: str | None = None) -> None:
        self.agent = agent
        self.name = name or agent.model.name

    def fingerprint(self) -> Fingerprint:
        return self.agent.model.fingerprint

    def prefill(self, request: PrefillRequest, incoming: Sequence[Handle] = ()) -> Handle:
        result = self.agent.prefill(request, [handle.data() for handle in incoming])
        meta = result.meta()
        return Handle(payload=result.payload, meta_loader=lambda: meta, owner=self)

    def answer(self, request: AnswerRequest, incoming: Sequence[Handle]) -> AnswerResult:
        return self.agent.answer(request, [handle.data() for handle in incoming])

    def release(self, handle: Handle) -> None:
        return None


class RemoteEndpoint:
    """An agent service. ``transport="url"``: prefilled messages stay on the sender and receivers fetch them by URL
    (``public_url``: the sender's address as other agents see it); ``"inline"``: this process relays the bytes."""

    def __init__(self, client: AgentClient, name: str | None = None, transport: str = "url",
                 public_url: str | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ServiceError(0, "bad_transport", f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.client, self.transport = client, transport
        self.name = name or client.base_url
        self.public_url = (public_url or client.base_url).rstrip("/")

    def fingerprint(self) -> Fingerprint:
        return self.client.fingerprint()

    def _inputs(self, incoming: Sequence[Handle]) -> list[MessageInput]:
        """Refs stay refs (the agent fetches them; its own by id), anything else goes inline."""
        inputs: list[MessageInput] = []
        for handle in incoming:
            if handle.ref is None or not handle.ref.url:
                inputs.append(handle.data())
            elif handle.ref.url.rstrip("/") == self.public_url:
                inputs.append(MessageRef(handle.ref.id))
            else:
                inputs.append(handle.ref)
        return inputs

    def prefill(self, request: PrefillRequest, incoming: Sequence[Handle] = ()) -> Handle:
        store = self.transport == "url"
        done: Prefilled = self.client.prefill(request.message, request.layers, request.sink_tokens, request.bits,
                                              request.group_size, store, self._inputs(incoming))
        meta = {"bytes": done.nbytes, "context_length": done.context_length, "layers": list(done.layers),
                "sink_tokens": done.sink_tokens, "prompt_tokens": done.prompt_tokens, "seconds": done.seconds}
        if done.ref is None:
            return Handle(payload=done.payload, meta_loader=lambda: meta, owner=self)
        ref = MessageRef(done.ref.id, self.public_url)
        return Handle(ref=ref, loader=lambda: self.client.download(ref.id), meta_loader=lambda: meta, owner=self)

    def answer(self, request: AnswerRequest, incoming: Sequence[Handle]) -> AnswerResult:
        return self.client.answer(request.message, self._inputs(incoming), request.answer_prefix,
                                  request.max_new_tokens, request.generation, request.item_id)

    def release(self, handle: Handle) -> None:
        """Delete a message this endpoint stored (best effort: it expires anyway)."""
        if handle.ref is not None and handle.owner is self:
            try:
                self.client.delete(handle.ref.id)
            except ServiceError as error:
                logger.info("could not delete message %s on %s: %s", handle.ref.id, self.name, error)
