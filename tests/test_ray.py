"""Agents as Ray actors on a local Ray instance: the same answers as in-process, messages as object references."""

from __future__ import annotations

import sys

import pytest
import torch

from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.service.chain import ChainKVComm
from kvcomm.service.errors import MissingDependencyError
from kvcomm.service.method import with_parts
from kvcomm.service.ray_agents import RayKVComm, require_ray, spawn_agent
from kvcomm.service.tiny import tiny_model
from kvcomm.tasks import get_task

ITEMS = get_task("demo").load().test[:2]


@pytest.fixture(scope="module")
def ray_agents():
    """A one-CPU local Ray instance with a sender and a receiver actor (0 CPUs each, so both fit)."""
    ray = require_ray()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        sender = spawn_agent(tiny_model, num_cpus=0)
        receiver = spawn_agent(tiny_model, num_cpus=0)
        yield sender, receiver
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(previous)


def test_ray_answers_equal_in_process(ray_agents, model):
    sender, receiver = ray_agents
    remote = RayKVComm(sender, receiver, (0, 2))
    local = KVComm(model, model, (0, 2))
    for example in ITEMS:
        got, expected = remote.answer(example), local.answer(example)
        assert got.answer == expected.answer and got.layers == expected.layers
        assert got.costs.generated_tokens == expected.costs.generated_tokens and got.costs.kv_bytes > 0


def test_ray_gather_and_chain_equal_in_process(ray_agents, model):
    sender, receiver = ray_agents
    example = with_parts(ITEMS[0], 2)
    gather = RayKVComm([sender, receiver], receiver, (1, 3), kind="gather").answer(example)
    assert gather.answer == MultiSenderKVComm([model, model], model, (1, 3)).answer(example).answer
    chain = RayKVComm([sender, receiver], receiver, (1, 3), kind="chain", bits=4).answer(example)
    assert chain.answer == ChainKVComm([model, model], model, (1, 3), bits=4).answer(example).answer


def test_missing_ray_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(MissingDependencyError, match="pip install ray=="):
        require_ray()
