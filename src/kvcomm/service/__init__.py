"""Agents as services: KVComm senders and receivers behind HTTP (Starlette + uvicorn) or as Ray actors.

* :func:`create_app` — the ASGI app of one agent (:mod:`kvcomm.service.app` lists the endpoints);
* :class:`AgentClient` — a Python client of one agent; :class:`RemoteKVComm` — the KVComm method over agents;
* :mod:`kvcomm.service.topology` — broadcast / gather / chain topologies from YAML;
* :mod:`kvcomm.service.ray_agents` — agents as Ray actors (``ray`` imported lazily).

See ``docs/service.md``.
"""

from kvcomm.service.agent import Agent
from kvcomm.service.app import create_app
from kvcomm.service.chain import ChainKVComm, extend_message
from kvcomm.service.client import AgentClient, MessageRef, Prefilled
from kvcomm.service.errors import MissingDependencyError, ServiceError
from kvcomm.service.method import AgentsKVComm, RemoteKVComm
from kvcomm.service.server import ServerThread, run_server
from kvcomm.service.settings import ServiceSettings

__all__ = ["Agent", "AgentClient", "AgentsKVComm", "ChainKVComm", "MessageRef", "MissingDependencyError",
           "Prefilled", "RemoteKVComm", "ServerThread", "ServiceError", "ServiceSettings", "create_app",
           "extend_message", "run_server"]
