"""Agents as Ray actors: KV messages travel as Ray object references to numpy ``uint8`` arrays of wire-format-v1
bytes (zero-copy in the object store; checksummed and decoded by the receiving actor; never torch objects).

``ray`` is imported lazily: everything here raises :class:`~kvcomm.service.errors.MissingDependencyError` with the
install command when it is missing. The same code runs on a multi-host cluster after ``ray.init(address=...)``
(see ``docs/service.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy

from kvcomm.generation import GenerationSettings
from kvcomm.models import Fingerprint, LoadedModel, load_model
from kvcomm.service.agent import Agent
from kvcomm.service.endpoints import Handle
from kvcomm.service.errors import MissingDependencyError
from kvcomm.service.method import AgentsKVComm
from kvcomm.service.schemas import AnswerRequest, AnswerResult, PrefillRequest

logger = logging.getLogger(__name__)

RAY_REQUIREMENT = "ray==2.60.0"
ModelSpec = Union[str, Callable[[], LoadedModel]]


def require_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise MissingDependencyError(f"Ray agents need the 'ray' package: pip install {RAY_REQUIREMENT}") from error
    return ray


class AgentActor:
    """The body of a Ray agent actor: loads its model once (a name for :func:`kvcomm.models.load_model`, or a
    zero-argument factory), then prefills and answers with JSON requests and uint8 payload arrays."""

    def __init__(self, model: ModelSpec, dtype: str = "bf16", device: str = "cpu",
                 generation: dict[str, Any] | None = None) -> None:
        loaded = model() if callable(model) else load_model(model, dtype=dtype, device=device)
        self.agent = Agent(loaded, GenerationSettings(**(generation or {})))

    def fingerprint(self) -> dict[str, Any]:
        return self.agent.model.fingerprint.to_dict()

    def prefill(self, request: dict[str, Any], *incoming: numpy.ndarray) -> tuple[numpy.ndarray, dict[str, Any]]:
        result = self.agent.prefill(PrefillRequest.from_json(request), list(incoming))
        return numpy.frombuffer(result.payload, dtype=numpy.uint8), result.meta()

    def answer(self, request: dict[str, Any], *incoming: numpy.ndarray) -> dict[str, Any]:
        return self.agent.answer(AnswerRequest.from_json(request), list(incoming)).to_json()


def spawn_agent(model: ModelSpec, dtype: str = "bf16", device: str = "cpu", num_cpus: float = 1,
                num_gpus: float = 0, generation: GenerationSettings | None = None, name: str | None = None) -> Any:
    """Start an agent actor (on any node of the connected cluster that has the resources) and return its handle."""
    ray = require_ray()
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if name:
        options["name"] = name
    settings = None if generation is None else {key: value for key, value in vars(generation).items()}
    return ray.remote(AgentActor).options(**options).remote(model, dtype, device, settings)


class RayEndpoint:
    """An agent actor as an :class:`~kvcomm.service.endpoints.Endpoint`: prefills return object references that
    are handed to the receiving actor unchanged (Ray moves the bytes between nodes)."""

    def __init__(self, actor: Any, name: str = "ray-agent") -> None:
        self.ray = require_ray()
        self.actor, self.name = actor, name
        self._fingerprint: Fingerprint | None = None

    def fingerprint(self) -> Fingerprint:
        if self._fingerprint is None:
            self._fingerprint = Fingerprint.from_dict(self.ray.get(self.actor.fingerprint.remote()))
        return self._fingerprint

    def _refs(self, incoming: Sequence[Handle]) -> list[Any]:
        return [handle.object_ref if handle.object_ref is not None
                else self.ray.put(numpy.frombuffer(handle.data(), dtype=numpy.uint8)) for handle in incoming]

    def prefill(self, request: PrefillRequest, incoming: Sequence[Handle] = ()) -> Handle:
        payload_ref, meta_ref = self.actor.prefill.options(num_returns=2).remote(request.to_json(),
                                                                                 *self._refs(incoming))
        ray = self.ray
        return Handle(object_ref=payload_ref, loader=lambda: ray.get(payload_ref).tobytes(),
                      meta_loader=lambda: ray.get(meta_ref), owner=self)

    def answer(self, request: AnswerRequest, incoming: Sequence[Handle]) -> AnswerResult:
        return AnswerResult.from_json(self.ray.get(self.actor.answer.remote(request.to_json(), *self._refs(incoming))))

    def release(self, handle: Handle) -> None:
        return None  # object references are freed by Ray's reference counting


class RayKVComm(AgentsKVComm):
    """KVComm between Ray agent actors (same kinds and answers as :class:`~kvcomm.service.method.RemoteKVComm`)."""

    def __init__(self, senders: Any | Sequence[Any], receiver: Any, layers: Sequence[int] | None = None,
                 sink_tokens: int = 1, bits: int | None = None, group_size: int = 32, kind: str = "gather",
                 settings: GenerationSettings | None = None, name: str = "kvcomm_ray") -> None:
        actors = list(senders) if isinstance(senders, (list, tuple)) else [senders]
        endpoints = [RayEndpoint(actor, f"sender{index}") for index, actor in enumerate(actors)]
        super().__init__(endpoints, [RayEndpoint(receiver, "receiver")], kind, layers, sink_tokens, bits, group_size,
                         settings, name)
