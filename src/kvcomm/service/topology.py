"""Topologies of agents from a small YAML file, run in-process, against agent services, or on Ray actors.

Example (``docs/service.md`` has more)::

    kind: gather               # broadcast (1 sender -> n receivers) | gather (n senders -> 1) | chain (a -> b -> c)
    layers: all                # or a list such as [0, 2, 5]
    sink_tokens: 1
    bits: null                 # 2/3/4/6/8 to quantize every message
    transport: url             # HTTP agents: receivers fetch GET /messages/{id} from senders (or: inline)
    agents:
      a: {model: smollm2-135m-instruct, dtype: bf16}     # in this process
      b: {url: http://127.0.0.1:8001, token_env: B_TOKEN} # an agent service
      c: {model: smollm2-135m-instruct, ray: true}        # a Ray actor
    edges: ["a -> c", "b -> c"]

Gather: senders in edge order, each reading its part of ``extra["contexts"]`` (or the whole context when the item has
no matching parts); chain: see :mod:`kvcomm.service.chain`; broadcast: every receiver answers from one message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvcomm.errors import KVCommError
from kvcomm.generation import GenerationSettings
from kvcomm.methods.base import Method
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.models import LoadedModel, load_model
from kvcomm.service.agent import Agent
from kvcomm.service.chain import ChainKVComm
from kvcomm.service.client import AgentClient
from kvcomm.service.endpoints import TRANSPORTS, Endpoint, LocalEndpoint, RemoteEndpoint
from kvcomm.service.method import KINDS, AgentsKVComm, with_parts
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)


class TopologyError(KVCommError):
    """A topology file that is malformed or inconsistent (unknown agents, edges that do not fit the kind)."""


@dataclass(frozen=True)
class AgentSpec:
    """One agent: a ``model`` loaded here (or in a Ray actor when ``ray``), or the ``url`` of an agent service."""

    name: str
    model: str | None = None
    url: str | None = None
    dtype: str = "bf16"
    device: str = "cpu"
    token: str | None = None
    ray: bool = False
    num_cpus: float = 1
    num_gpus: float = 0

    @classmethod
    def from_yaml(cls, name: str, data: Any) -> "AgentSpec":
        if not isinstance(data, dict):
            raise TopologyError(f"agent {name!r} must be a mapping with 'model' or 'url'")
        allowed = {"model", "url", "dtype", "device", "token", "token_env", "ray", "num_cpus", "num_gpus"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise TopologyError(f"agent {name!r}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        if ("model" in data) == ("url" in data):
            raise TopologyError(f"agent {name!r} needs exactly one of 'model' (run here) or 'url' (an agent service)")
        token = data.get("token")
        if data.get("token_env"):
            token = os.environ.get(str(data["token_env"]))
            if token is None:
                raise TopologyError(f"agent {name!r}: environment variable {data['token_env']} is not set")
        if data.get("ray") and "url" in data:
            raise TopologyError(f"agent {name!r}: 'ray' applies to model agents, not URLs")
        return cls(name, data.get("model"), data.get("url"), str(data.get("dtype", "bf16")),
                   str(data.get("device", "cpu")), token, bool(data.get("ray", False)),
                   float(data.get("num_cpus", 1)), float(data.get("num_gpus", 0)))


def _edge(item: Any) -> tuple[str, str]:
    if isinstance(item, str) and "->" in item:
        source, target = (part.strip() for part in item.split("->", 1))
        return source, target
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    raise TopologyError(f"an edge is 'a -> b' or [a, b], got {item!r}")


@dataclass(frozen=True)
class Topology:
    """A parsed topology file (see the module docstring)."""

    kind: str
    agents: dict[str, AgentSpec]
    edges: tuple[tuple[str, str], ...]
    layers: tuple[int, ...] | None = None
    sink_tokens: int = 1
    bits: int | None = None
    group_size: int = 32
    transport: str = "url"
    max_new_tokens: int | None = None
    name: str = "topology"
    senders: tuple[str, ...] = field(init=False)
    receivers: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TopologyError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.transport not in TRANSPORTS:
            raise TopologyError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if not self.edges:
            raise TopologyError("a topology needs at least one edge")
        unknown = sorted({name for edge in self.edges for name in edge} - set(self.agents))
        if unknown:
            raise TopologyError(f"edges name unknown agents {unknown}; agents are {sorted(self.agents)}")
        if len(set(self.edges)) != len(self.edges) or any(a == b for a, b in self.edges):
            raise TopologyError("edges must be distinct and join two different agents")
        senders, receivers = self._roles()
        object.__setattr__(self, "senders", senders)
        object.__setattr__(self, "receivers", receivers)

    def _roles(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        sources = [a for a, _ in self.edges]
        targets = [b for _, b in self.edges]
        if self.kind == "broadcast":
            if len(set(sources)) != 1:
                raise TopologyError(f"a broadcast has one sender; edges leave {sorted(set(sources))}")
            return (sources[0],), tuple(targets)
        if self.kind == "gather":
            if len(set(targets)) != 1:
                raise TopologyError(f"a gather has one receiver; edges reach {sorted(set(targets))}")
            return tuple(sources), (targets[0],)
        # chain: the edges must form one path
        following = dict(self.edges)
        if len(following) != len(self.edges) or len(set(targets)) != len(targets):
            raise TopologyError("a chain's agents each have at most one outgoing and one incoming edge")
        start = [a for a in sources if a not in targets]
        if len(start) != 1:
            raise TopologyError("a chain's edges must form one path a -> b -> ... (no cycle, no branch)")
        path = [start[0]]
        while path[-1] in following:
            path.append(following[path[-1]])
        if len(path) != len(self.edges) + 1:
            raise TopologyError("a chain's edges must form one connected path")
        return tuple(path[:-1]), (path[-1],)

    @classmethod
    def from_yaml(cls, text: str) -> "Topology":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise TopologyError(f"not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise TopologyError("a topology file is a YAML mapping with kind, agents and edges")
        allowed = {"name", "kind", "agents", "edges", "layers", "sink_tokens", "bits", "group_size", "transport",
                   "max_new_tokens"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise TopologyError(f"unknown top-level field(s) {unknown}; allowed: {sorted(allowed)}")
        agents = data.get("agents")
        if not isinstance(agents, dict) or not agents:
            raise TopologyError("'agents' must map agent names to {model: ...} or {url: ...}")
        edges = data.get("edges")
        if not isinstance(edges, list):
            raise TopologyError("'edges' must be a list such as ['a -> b']")
        layers = data.get("layers", "all")
        if layers == "all" or layers is None:
            layers = None
        elif not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise TopologyError(f"layers must be 'all' or a list of ints, got {layers!r}")
        try:
            return cls(str(data.get("kind", "")), {str(k): AgentSpec.from_yaml(str(k), v) for k, v in agents.items()},
                       tuple(_edge(item) for item in edges), None if layers is None else tuple(layers),
                       int(data.get("sink_tokens", 1)), data.get("bits"), int(data.get("group_size", 32)),
                       str(data.get("transport", "url")), data.get("max_new_tokens"), str(data.get("name", "topology")))
        except (TypeError, ValueError) as error:
            raise TopologyError(f"malformed topology: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        path = Path(path)
        if not path.is_file():
            raise TopologyError(f"topology file not found: {path}")
        return cls.from_yaml(path.read_text(encoding="utf-8"))

    @property
    def local_only(self) -> bool:
        return all(spec.model is not None for spec in self.agents.values())


ModelLoader = Callable[[AgentSpec], LoadedModel]


def default_loader() -> ModelLoader:
    """Loads each (model, dtype, device) once, so agents of the same model share one copy (and one lock)."""
    loaded: dict[tuple[str, str, str], LoadedModel] = {}

    def load(spec: AgentSpec) -> LoadedModel:
        key = (str(spec.model), spec.dtype, spec.device)
        if key not in loaded:
            loaded[key] = load_model(key[0], dtype=spec.dtype, device=spec.device)
        return loaded[key]

    return load


def build_endpoints(topology: Topology, loader: ModelLoader | None = None,
                    models: Mapping[str, LoadedModel] | None = None, timeout_s: float = 300.0
                    ) -> dict[str, Endpoint]:
    """An endpoint per agent. ``models`` (by agent name) overrides loading, e.g. for test models."""
    loader = loader or default_loader()
    endpoints: dict[str, Endpoint] = {}
    for name, spec in topology.agents.items():
        if spec.url is not None:
            endpoints[name] = RemoteEndpoint(AgentClient(spec.url, spec.token, timeout_s), name, topology.transport)
        elif spec.ray:
            from kvcomm.service.ray_agents import RayEndpoint, spawn_agent

            model: Any = spec.model
            if models and name in models:
                raise TopologyError(f"agent {name!r}: a Ray agent loads its model in its actor; give a model name")
            endpoints[name] = RayEndpoint(spawn_agent(model, spec.dtype, spec.device, spec.num_cpus, spec.num_gpus),
                                          name)
        else:
            model = models[name] if models and name in models else loader(spec)
            endpoints[name] = LocalEndpoint(Agent(model), name)
    return endpoints


def topology_method(topology: Topology, endpoints: Mapping[str, Endpoint],
                    settings: GenerationSettings | None = None) -> AgentsKVComm:
    """The :class:`~kvcomm.service.method.AgentsKVComm` of ``topology`` over ``endpoints``."""
    settings = settings or GenerationSettings(max_new_tokens=topology.max_new_tokens)
    return AgentsKVComm([endpoints[n] for n in topology.senders], [endpoints[n] for n in topology.receivers],
                        topology.kind, topology.layers, topology.sink_tokens, topology.bits, topology.group_size,
                        settings, name=f"{topology.name}-{topology.kind}")


def run_topology(method: AgentsKVComm, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """Per-item rows ``{"id", "gold", "answers": {receiver: answer}}`` (``"error"`` instead when an item failed)."""
    rows = []
    for example in examples:
        row: dict[str, Any] = {"id": example.id, "gold": list(example.answers)}
        try:
            outputs = method.answer_all(example)
            row["answers"] = {name: output.answer for name, output in outputs.items()}
            row["kv_bytes"] = {name: output.costs.kv_bytes for name, output in outputs.items()}
        except KVCommError as error:
            logger.warning("item %s failed: %s", example.id, error)
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
    return rows


def reference_methods(topology: Topology, models: Mapping[str, LoadedModel],
                      settings: GenerationSettings | None = None) -> dict[str, Method]:
    """The in-process methods a topology must equal, per receiver (``models`` by agent name).

    Unquantized: KVComm (one sender), MultiSenderKVComm (gather) or ChainKVComm (chain); quantized (``bits``):
    ChainKVComm, which quantizes each hop (a one-sender chain is quantized KVComm); a quantized gather of several
    senders has no in-process reference.
    """
    settings = settings or GenerationSettings(max_new_tokens=topology.max_new_tokens)
    senders = [models[name] for name in topology.senders]
    first = models[topology.receivers[0]]
    layers = topology.layers if topology.layers is not None else tuple(range(first.num_layers))
    if topology.bits is not None and topology.kind != "chain" and len(senders) > 1:
        raise TopologyError("a quantized gather of several senders has no in-process reference")
    methods: dict[str, Method] = {}
    for name in topology.receivers:
        receiver = models[name]
        if topology.kind == "chain" or topology.bits is not None:
            methods[name] = ChainKVComm(senders, receiver, layers, topology.sink_tokens, topology.bits,
                                        topology.group_size, settings)
        elif len(senders) == 1:
            methods[name] = KVComm(senders[0], receiver, layers, topology.sink_tokens, settings)
        else:
            methods[name] = MultiSenderKVComm(senders, receiver, layers, topology.sink_tokens, settings)
    return methods


def reference_rows(topology: Topology, models: Mapping[str, LoadedModel], examples: Sequence[Example]
                   ) -> list[dict[str, Any]]:
    """Per-item rows of the in-process reference (same shape as :func:`run_topology`)."""
    methods = reference_methods(topology, models)
    rows = []
    for example in examples:
        item = with_parts(example, len(topology.senders))
        rows.append({"id": example.id, "gold": list(example.answers),
                     "answers": {name: method.answer(item).answer for name, method in methods.items()}})
    return rows
