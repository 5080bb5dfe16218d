"""KVComm across agents (local, HTTP or Ray endpoints) with the in-process methods' ``answer(example)`` interface.

Kinds: ``gather`` — every sender prefills its part (one sender: the item's sender message, exactly KVComm; several:
:func:`kvcomm.multi.sender_prompts`, only the first keeps the sink, the receiver concatenates, exactly
:class:`~kvcomm.methods.multi_sender.MultiSenderKVComm`); ``chain`` — see :mod:`kvcomm.service.chain`;
``broadcast`` — one sender, its message answered by every receiver.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from kvcomm.errors import LayerSelectionError
from kvcomm.generation import GenerationSettings
from kvcomm.message import validate_layers
from kvcomm.methods.base import MethodOutput, max_new_tokens
from kvcomm.models import check_compatible
from kvcomm.multi import sender_prompts
from kvcomm.service.client import AgentClient
from kvcomm.service.endpoints import Endpoint, Handle, RemoteEndpoint
from kvcomm.service.schemas import AnswerRequest, PrefillRequest
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)

KINDS = ("gather", "chain", "broadcast")


def with_parts(example: Example, senders: int) -> Example:
    """``example`` with one context part per sender: its own ``extra["contexts"]`` when they match the count, else
    the whole context for every sender (each sender reads everything)."""
    parts = example.extra.get("contexts")
    if isinstance(parts, (list, tuple)) and len(parts) == senders:
        return example
    return dataclasses.replace(example, extra={**example.extra, "contexts": [example.context] * senders})


class AgentsKVComm:
    """KVComm between endpoints; ``answer`` gives the first receiver's output, ``answer_all`` every receiver's."""

    def __init__(self, senders: Sequence[Endpoint], receivers: Sequence[Endpoint], kind: str = "gather",
                 layers: Sequence[int] | None = None, sink_tokens: int = 1, bits: int | None = None,
                 group_size: int = 32, settings: GenerationSettings | None = None, name: str = "kvcomm_agents",
                 release: bool = True) -> None:
        if kind not in KINDS:
            raise LayerSelectionError(f"unknown topology kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.senders, self.receivers = list(senders), list(receivers)
        if not self.senders or not self.receivers:
            raise LayerSelectionError("KVComm between agents needs at least one sender and one receiver")
        if kind != "broadcast" and len(self.receivers) != 1:
            raise LayerSelectionError(f"a {kind} has exactly one receiver, got {len(self.receivers)}")
        if kind == "broadcast" and len(self.senders) != 1:
            raise LayerSelectionError(f"a broadcast has exactly one sender, got {len(self.senders)}")
        self.kind, self.sink_tokens, self.bits, self.group_size = kind, sink_tokens, bits, group_size
        self.settings = settings or GenerationSettings()
        self.name, self.release = name, release
        receiver_prints = [receiver.fingerprint() for receiver in self.receivers]
        for sender in self.senders:  # refuse before any compute, as the in-process methods do
            sender_print = sender.fingerprint()
            for receiver_print in receiver_prints:
                check_compatible(sender_print, receiver_print)
        num_layers = receiver_prints[0].num_layers
        self.layers = validate_layers(tuple(layers) if layers is not None else tuple(range(num_layers)), num_layers)

    def prompts(self, example: Example) -> list[str]:
        """The sender messages, one per sender."""
        if len(self.senders) == 1:
            return [example.messages["sender"]]
        return sender_prompts(with_parts(example, len(self.senders)))

    def _prefill(self, prompt: str, sink_tokens: int) -> PrefillRequest:
        return PrefillRequest(prompt, self.layers, sink_tokens, self.bits, self.group_size)

    def send(self, example: Example) -> tuple[list[Handle], list[Handle]]:
        """Run the senders; returns the handles the receivers attend to (in order) and every handle created."""
        prompts = self.prompts(example)
        if self.kind == "chain":
            handle = self.senders[0].prefill(self._prefill(prompts[0], self.sink_tokens))
            created = [handle]
            for sender, prompt in zip(self.senders[1:], prompts[1:]):
                handle = sender.prefill(self._prefill(prompt, self.sink_tokens), [handle])
                created.append(handle)
            return [handle], created
        handles = [sender.prefill(self._prefill(prompt, self.sink_tokens if index == 0 else 0))
                   for index, (sender, prompt) in enumerate(zip(self.senders, prompts))]
        return handles, list(handles)

    def answer_all(self, example: Example) -> dict[str, MethodOutput]:
        """Every receiver's output for ``example``, keyed by receiver name."""
        handles, created = self.send(example)
        try:
            sender_seconds = sum(float(handle.meta().get("seconds", 0.0)) for handle in created)
            request = AnswerRequest(example.messages["receiver"], example.answer_prefix,
                                    max_new_tokens(example, self.settings), (), self.settings, example.id)
            outputs = {}
            for receiver in self.receivers:
                result = receiver.answer(request, handles)
                costs = dataclasses.replace(result.costs, sender_seconds=sender_seconds, kv_bytes=result.kv_wire_bytes)
                outputs[receiver.name] = MethodOutput(result.answer, costs, result.layers)
            return outputs
        finally:
            if self.release:
                for handle in created:
                    if handle.owner is not None:
                        handle.owner.release(handle)

    def answer(self, example: Example) -> MethodOutput:
        return next(iter(self.answer_all(example).values()))


class RemoteKVComm(AgentsKVComm):
    """KVComm between agent services: ``answer(example)`` equals the in-process method's answer.

    One sender: :class:`~kvcomm.methods.kvcomm.KVComm`; several (``kind="gather"``): the multi-sender method;
    ``kind="chain"``: :class:`~kvcomm.service.chain.ChainKVComm`. ``transport="url"`` stores each message on its
    sender and lets the receiver download it (``GET /messages/{id}``); ``"inline"`` relays the bytes through here.
    ``sender_urls`` are the senders' addresses as the receiver sees them (default: their ``base_url``).
    """

    def __init__(self, senders: AgentClient | Sequence[AgentClient], receiver: AgentClient,
                 layers: Sequence[int] | None = None, sink_tokens: int = 1, bits: int | None = None,
                 group_size: int = 32, transport: str = "url", kind: str = "gather",
                 settings: GenerationSettings | None = None, sender_urls: Sequence[str] | None = None,
                 name: str = "kvcomm_remote") -> None:
        clients = [senders] if isinstance(senders, AgentClient) else list(senders)
        urls = list(sender_urls) if sender_urls is not None else [None] * len(clients)
        if len(urls) != len(clients):
            raise LayerSelectionError(f"{len(urls)} sender URLs for {len(clients)} senders")
        endpoints = [RemoteEndpoint(client, transport=transport, public_url=url) for client, url in zip(clients, urls)]
        super().__init__(endpoints, [RemoteEndpoint(receiver, transport=transport)], kind, layers, sink_tokens, bits,
                         group_size, settings, name)
