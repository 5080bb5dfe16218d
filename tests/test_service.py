"""Agent services on loopback with the tiny model: HTTP answers equal in-process answers, and every failure (bad
token, oversized, truncated or corrupted messages, wrong fingerprint, dying clients and senders, timeouts) gives a
clear error while the service keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import typer
from starlette.testclient import TestClient
from typer.testing import CliRunner

from kvcomm import wire
from kvcomm.methods.kvcomm import KVComm
from kvcomm.methods.multi_sender import MultiSenderKVComm
from kvcomm.service import (AgentClient, ChainKVComm, MessageRef, RemoteKVComm, ServerThread, ServiceError,
                            ServiceSettings, create_app)
from kvcomm.service.agent import model_lock
from kvcomm.service.cli import register
from kvcomm.service.method import with_parts
from kvcomm.service.store import MessageStore
from kvcomm.service.tiny import save_tiny_model
from kvcomm.service.topology import (Topology, TopologyError, build_endpoints, reference_rows, run_topology,
                                     topology_method)
from kvcomm.tasks import get_task
from tests.conftest import tiny_llama

ITEMS = get_task("demo").load().test[:2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread per model call keeps the tiny model fast (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(create_app(tiny, ServiceSettings(request_timeout_s=60))) as running:
        yield running


@pytest.fixture(scope="module")
def second_server(tiny):
    """A second agent of the same model (a sender other agents fetch from)."""
    with ServerThread(create_app(tiny, ServiceSettings(request_timeout_s=60))) as running:
        yield running


@pytest.fixture()
def client(server):
    with AgentClient(server.url, timeout=60) as agent:
        yield agent


def still_answers(agent: AgentClient) -> None:
    """The service is healthy and answers an item exactly as the in-process method does."""
    assert agent.health()["status"] == "ok"
    message = agent.prefill(ITEMS[0].messages["sender"], [0, 2])
    result = agent.answer(ITEMS[0].messages["receiver"], [message.payload], ITEMS[0].answer_prefix,
                          ITEMS[0].max_new_tokens)
    assert isinstance(result.answer, str) and result.layers == (0, 2)


# --- equivalence -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["url", "inline"])
@pytest.mark.parametrize("layers", [(0, 2), None])
def test_http_answer_equals_in_process(tiny, server, second_server, transport, layers):
    local = KVComm(tiny, tiny, layers if layers else range(tiny.num_layers))
    with AgentClient(second_server.url) as sender, AgentClient(server.url) as receiver:
        remote = RemoteKVComm(sender, receiver, layers, transport=transport)
        for example in ITEMS:
            got, expected = remote.answer(example), local.answer(example)
            assert got.answer == expected.answer
            assert got.layers == expected.layers and got.costs.generated_tokens == expected.costs.generated_tokens
            assert got.costs.kv_bytes > expected.costs.kv_bytes > 0  # wire bytes include the header
    receiver_metrics = AgentClient(server.url).metrics()
    assert receiver_metrics["requests"]["/answer"] >= len(ITEMS)
    if transport == "url":
        assert receiver_metrics["bytes_fetched"] > 0


def test_quantized_http_answer_equals_in_process(tiny, client):
    local = ChainKVComm([tiny], tiny, (1, 3), bits=4)
    remote = RemoteKVComm(client, client, (1, 3), bits=4)
    for example in ITEMS:
        assert remote.answer(example).answer == local.answer(with_parts(example, 1)).answer


def test_gather_and_chain_equal_in_process(tiny, server, second_server):
    senders = [AgentClient(second_server.url), AgentClient(server.url)]
    receiver = AgentClient(server.url)
    gather = RemoteKVComm(senders, receiver, (0, 1, 3), kind="gather")
    chain = RemoteKVComm(senders, receiver, (0, 1, 3), kind="chain")
    for example in ITEMS:
        item = with_parts(example, 2)
        assert gather.answer(example).answer == MultiSenderKVComm([tiny, tiny], tiny, (0, 1, 3)).answer(item).answer
        expected_chain = ChainKVComm([tiny, tiny], tiny, (0, 1, 3)).answer(item)
        got_chain = chain.answer(example)
        assert got_chain.answer == expected_chain.answer
        assert got_chain.costs.sender_prefill_tokens == expected_chain.costs.sender_prefill_tokens
    # a one-hop chain is KVComm
    example = ITEMS[0]
    assert ChainKVComm([tiny], tiny, (0, 2)).answer(with_parts(example, 1)).answer == \
        KVComm(tiny, tiny, (0, 2)).answer(example).answer


def test_messages_by_id_upload_download_delete(client):
    done = client.prefill(ITEMS[1].messages["sender"], [1], store=True)
    assert done.ref is not None and done.payload is None and done.nbytes > 0
    payload = client.download(done.ref.id)
    assert wire.decode(payload).layers == (1,)
    uploaded = client.upload(payload)
    by_id = client.answer(ITEMS[1].messages["receiver"], [MessageRef(uploaded.id)], ITEMS[1].answer_prefix, 8)
    inline = client.answer(ITEMS[1].messages["receiver"], [payload], ITEMS[1].answer_prefix, 8)
    assert by_id.answer == inline.answer
    client.delete(uploaded.id)
    with pytest.raises(ServiceError) as error:
        client.download(uploaded.id)
    assert error.value.status == 404 and error.value.code == "message_not_found"


# --- refusals --------------------------------------------------------------------------------------------------

def test_truncated_and_corrupted_uploads_are_refused(client):
    payload = client.prefill(ITEMS[0].messages["sender"], [0]).payload
    for bad, words in ((payload[: len(payload) // 2], "truncated"), (payload[:-1] + bytes([payload[-1] ^ 1]), "checksum")):
        with pytest.raises(ServiceError) as error:
            client.answer(ITEMS[0].messages["receiver"], [bad], max_new_tokens=4)
        assert error.value.status == 422 and error.value.code == "invalid_message" and words in error.value.detail
    with pytest.raises(ServiceError) as error:
        client.upload(payload[:100])
    assert error.value.status == 422
    still_answers(client)


def test_wrong_fingerprint_is_refused(client):
    other = tiny_llama(seed=1, layers=3)
    foreign = wire.encode(KVComm(other, other, (0, 1)).send(ITEMS[0])[0])
    with pytest.raises(ServiceError) as error:
        client.answer(ITEMS[0].messages["receiver"], [foreign], max_new_tokens=4)
    assert error.value.status == 409 and error.value.code == "incompatible_fingerprint"
    assert "num_layers" in error.value.detail
    with pytest.raises(ServiceError) as error:
        client.upload(foreign)
    assert error.value.status == 409
    still_answers(client)


def test_oversized_messages_are_refused(tiny, second_server):
    small = ServiceSettings(max_message_bytes=65536)
    with ServerThread(create_app(tiny, small)) as limited, AgentClient(limited.url) as agent, \
            AgentClient(second_server.url) as sender:
        stored = sender.prefill(ITEMS[0].messages["sender"], store=True)
        assert stored.nbytes > 65536
        payload = sender.download(stored.ref.id)
        for inputs in ([payload], [stored.ref]):  # uploaded inline, or fetched from the sender by URL
            with pytest.raises(ServiceError) as error:
                agent.answer(ITEMS[0].messages["receiver"], inputs, max_new_tokens=4)
            assert error.value.status == 413 and error.value.code == "payload_too_large"
            assert "--max-message-mb" in error.value.detail
        raw = TestClient(create_app(tiny, small)).post("/messages", content=payload,
                                                       headers={"content-type": "application/octet-stream"})
        assert raw.status_code == 413 and raw.json()["error"] == "payload_too_large"
        assert agent.health()["status"] == "ok"
        small_message = agent.prefill(ITEMS[0].messages["sender"], [0]).payload
        assert len(small_message) <= 65536
        assert agent.answer(ITEMS[0].messages["receiver"], [small_message], max_new_tokens=4).layers == (0,)


def test_wrong_or_missing_token_is_401(tiny):
    app = create_app(tiny, ServiceSettings(token="s3cret"))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200  # liveness stays open
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            response = http.get("/fingerprint", headers=headers)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        response = http.post("/prefill", json={"message": "x"})
        assert response.status_code == 401
        with pytest.raises(ServiceError) as error:
            AgentClient("http://testserver", token="nope", client=TestClient(app)).prefill("hello")
        assert error.value.status == 401
        good = AgentClient("http://testserver", token="s3cret", client=TestClient(app))
        still_answers(good)
        assert good.metrics()["errors"]["unauthorized"] >= 4


def test_bad_requests_give_clear_json_errors(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        cases = [
            (http.post("/answer", json={"message": "q"}), 422, "at least one KV message"),
            (http.post("/answer", json={"message": "q", "messages": [{"id": "missing"}]}), 404, "no message"),
            (http.post("/prefill", json={"message": "x", "layers": [9]}), 422, "out of range"),
            (http.post("/prefill", json={"message": "x", "bits": 5}), 422, "bits must be"),
            (http.post("/prefill", json={"message": "x", "colour": 1}), 422, "unknown field"),
            (http.post("/prefill", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
            (http.post("/prefill", content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, response.text
            assert words in response.json()["detail"]


def test_client_dying_mid_upload_leaves_the_service_working(client, server):
    before = client.metrics()["errors"].get("upload_incomplete", 0)
    request = json.dumps({"message": ITEMS[0].messages["receiver"], "max_new_tokens": 4})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall((f"POST /answer HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n"
                     f"content-length: 100000\r\nx-kvcomm-request: {request}\r\n\r\n").encode() + b"\0" * 5000)
    deadline = time.monotonic() + 10
    while client.metrics()["errors"].get("upload_incomplete", 0) == before:
        assert time.monotonic() < deadline, "the service never noticed the client leaving"
        time.sleep(0.05)
    still_answers(client)


class DyingSender:
    """A fake agent that answers GET /messages/… with the headers and half of ``payload``, then drops the line."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(4096)
            head = (f"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.kvcomm.kv-message\r\n"
                    f"content-length: {len(self.payload)}\r\n\r\n").encode()
            connection.sendall(head + self.payload[: len(self.payload) // 2])
        self.listener.close()


def test_sender_dying_mid_transfer_gives_502_and_the_receiver_keeps_working(client):
    payload = client.prefill(ITEMS[0].messages["sender"], [0, 2]).payload
    dying = DyingSender(payload)
    with pytest.raises(ServiceError) as error:
        client.answer(ITEMS[0].messages["receiver"], [MessageRef("abc", dying.url)], max_new_tokens=4)
    assert error.value.status == 502 and error.value.code == "upstream_failed"
    assert f"failed after {len(payload) // 2} bytes" in error.value.detail
    dying.thread.join(5)
    with pytest.raises(ServiceError) as error:  # the sender is gone altogether
        client.answer(ITEMS[0].messages["receiver"], [MessageRef("abc", dying.url)], max_new_tokens=4)
    assert error.value.status == 502 and "ConnectError" in error.value.detail
    still_answers(client)


def test_request_timeout_gives_504_and_the_service_recovers(tiny):
    app = create_app(tiny, ServiceSettings(request_timeout_s=0.3))
    agent = AgentClient("http://testserver", client=TestClient(app))
    payload = agent.prefill(ITEMS[0].messages["sender"], [0]).payload
    with model_lock(tiny):  # the model is busy elsewhere for longer than the request may take
        with pytest.raises(ServiceError) as error:
            agent.answer(ITEMS[0].messages["receiver"], [payload], max_new_tokens=4)
    assert error.value.status == 504 and error.value.code == "timeout"
    time.sleep(0.4)  # the abandoned worker gives up on the lock
    assert agent.answer(ITEMS[0].messages["receiver"], [payload], max_new_tokens=4).layers == (0,)


# --- store -----------------------------------------------------------------------------------------------------

def test_store_ttl_and_byte_cap_evict_oldest():
    now = [0.0]
    store = MessageStore(ttl_s=10, max_bytes=100, clock=lambda: now[0])
    first, second = store.put(b"a" * 40), store.put(b"b" * 40)
    third = store.put(b"c" * 40)  # 120 > 100: the oldest goes
    assert store.get(first) is None and store.get(second) == b"b" * 40 and store.get(third) == b"c" * 40
    assert store.stats()["evicted_cap"] == 1 and store.stats()["bytes"] == 80
    now[0] = 9.0
    fourth = store.put(b"d" * 10)
    now[0] = 10.5  # second and third expired, fourth has until 19
    assert store.get(second) is None and store.get(third) is None and store.get(fourth) == b"d" * 10
    assert store.stats() | {} == {"messages": 1, "bytes": 10, "max_bytes": 100, "ttl_s": 10, "evicted_ttl": 2,
                                  "evicted_cap": 1}
    with pytest.raises(ServiceError) as error:
        store.put(b"x" * 101)
    assert error.value.status == 413
    assert store.delete(fourth) and not store.delete(fourth)


def test_service_store_evicts_and_expires(tiny):
    payload = wire.encode(KVComm(tiny, tiny, (0,)).send(ITEMS[0])[0])
    app = create_app(tiny, ServiceSettings(store_max_bytes=2 * len(payload) + 10, store_ttl_s=0.5))
    agent = AgentClient("http://testserver", client=TestClient(app))
    refs = [agent.upload(payload) for _ in range(3)]
    with pytest.raises(ServiceError) as error:
        agent.download(refs[0].id)
    assert error.value.status == 404 and "evicted" in error.value.detail
    assert agent.download(refs[2].id) == payload
    assert agent.metrics()["store"]["evicted_cap"] == 1
    time.sleep(0.6)
    with pytest.raises(ServiceError):
        agent.download(refs[2].id)
    assert agent.metrics()["store"]["messages"] == 0


# --- topologies and CLI ----------------------------------------------------------------------------------------

def test_topology_files_are_validated():
    agents = "agents: {a: {url: 'http://x'}, b: {url: 'http://y'}, c: {url: 'http://z'}}\n"
    good = Topology.from_yaml("kind: chain\n" + agents + "edges: ['b -> c', 'a -> b']\n")
    assert good.senders == ("a", "b") and good.receivers == ("c",)
    assert Topology.from_yaml("kind: broadcast\n" + agents + "edges: [[a, b], [a, c]]\n").receivers == ("b", "c")
    for text, words in [("kind: broadcast\n" + agents + "edges: ['a -> c', 'b -> c']", "one sender"),
                        ("kind: gather\n" + agents + "edges: ['a -> b', 'a -> c']", "one receiver"),
                        ("kind: chain\n" + agents + "edges: ['a -> b', 'a -> c']", "at most one"),
                        ("kind: chain\n" + agents + "edges: ['a -> b', 'b -> a']", "one path"),
                        ("kind: ring\n" + agents + "edges: ['a -> b']", "kind must be"),
                        ("kind: gather\n" + agents + "edges: ['a -> d']", "unknown agents"),
                        ("kind: gather\nagents: {a: {model: m, url: u}}\nedges: []", "exactly one")]:
        with pytest.raises(TopologyError, match=words):
            Topology.from_yaml(text)


def test_topology_over_urls_equals_in_process(tiny, server, second_server):
    for kind, edges in [("broadcast", "['a -> b', 'a -> c']"), ("gather", "['a -> c', 'b -> c']"),
                        ("chain", "['a -> b', 'b -> c']")]:
        text = (f"kind: {kind}\nlayers: [0, 3]\ntransport: url\nagents:\n  a: {{url: '{second_server.url}'}}\n"
                f"  b: {{url: '{server.url}'}}\n  c: {{url: '{second_server.url}'}}\nedges: {edges}\n")
        topology = Topology.from_yaml(text)
        rows = run_topology(topology_method(topology, build_endpoints(topology)), ITEMS)
        expected = reference_rows(topology, {"a": tiny, "b": tiny, "c": tiny}, ITEMS)
        assert [row["answers"] for row in rows] == [row["answers"] for row in expected], kind
        assert set(rows[0]["answers"]) == set(topology.receivers)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_agent_commands(server, tmp_path):
    runner = CliRunner()
    health = runner.invoke(cli(), ["agent", "health", "--url", server.url])
    assert health.exit_code == 0 and json.loads(health.output)["status"] == "ok"
    stored = runner.invoke(cli(), ["agent", "prefill", "--url", server.url, "--context", ITEMS[0].context,
                                   "--layers", "0,2-3", "--store"])
    assert stored.exit_code == 0, stored.output
    info = json.loads(stored.output)
    assert info["layers"] == [0, 2, 3]
    saved = runner.invoke(cli(), ["agent", "prefill", "--url", server.url, "--context", ITEMS[0].context,
                                  "--layers", "0,2-3", "--out", str(tmp_path / "m.kv")])
    assert saved.exit_code == 0 and (tmp_path / "m.kv").stat().st_size == info["bytes"]
    answers = []
    for source in (["--message-url", f"{info['url']}#{info['id']}"], ["--message-file", str(tmp_path / "m.kv")]):
        answered = runner.invoke(cli(), ["agent", "answer", "--url", server.url, "--question", ITEMS[0].question,
                                         "--answer-prefix", ITEMS[0].answer_prefix, "--max-new-tokens", "8", *source])
        assert answered.exit_code == 0, answered.output
        answers.append(json.loads(answered.output)["answer"])
    assert answers[0] == answers[1]
    missing = runner.invoke(cli(), ["agent", "answer", "--url", server.url, "--question", "q", "--message-id", "nope"])
    assert missing.exit_code == 2 and "no message 'nope'" in missing.output
    assert runner.invoke(cli(), ["serve", "--help"]).exit_code == 0


def test_cli_topology_run_in_process_checks_against_the_method(tiny_folder, tmp_path):
    spec = tmp_path / "gather.yaml"
    spec.write_text(f"kind: gather\nlayers: [1, 2]\nagents:\n  a: {{model: '{tiny_folder}', dtype: fp32}}\n"
                    f"  b: {{model: '{tiny_folder}', dtype: fp32}}\n  r: {{model: '{tiny_folder}', dtype: fp32}}\n"
                    "edges: ['a -> r', 'b -> r']\n")
    output = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(cli(), ["topology", "run", str(spec), "--task", "demo", "--limit", "2", "--check",
                                        "--output", str(output)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == [item.id for item in ITEMS]
    assert all(row["matches_in_process"] and set(row["answers"]) == {"r"} for row in rows)


def test_kvcomm_run_through_agent_services_equals_in_process(tiny, server, second_server, tmp_path):
    from kvcomm.errors import LayerSelectionError
    from kvcomm.experiment import RunOptions, SelectionOptions, run
    from kvcomm.methods import KVComm
    from kvcomm.tasks import get_task

    options = RunOptions(method="kvcomm", task="demo", limit=2, sender_url=second_server.url,
                         receiver_url=server.url, selection=SelectionOptions(layers="0,2"), agent_token="secret-x")
    summary = run(options, tmp_path / "remote", progress=False)
    assert summary["n"] == 2 and summary["errors"] == 0 and summary["layers"] == [0, 2]
    rows = [json.loads(line) for line in (tmp_path / "remote" / "predictions.jsonl").read_text().splitlines()]
    local = KVComm(tiny, tiny, (0, 2))
    items = get_task("demo").load().test[:2]
    assert [row["answer"] for row in rows] == [local.answer(item).answer for item in items]
    assert "secret-x" not in (tmp_path / "remote" / "config.json").read_text()
    with pytest.raises(LayerSelectionError, match="local models"):
        run(RunOptions(method="kvcomm", task="demo", limit=1, sender_url=second_server.url, receiver_url=server.url,
                       selection=SelectionOptions(ratio=0.5)), tmp_path / "calibrated", progress=False)


def test_eval_grid_through_agent_services_equals_in_process(tiny, server, second_server, tmp_path):
    from kvcomm.evaluation import EvalConfig, run_grid

    def grid(output, **remote):
        config = EvalConfig(tasks=["demo"], methods=["kvcomm", "random"], ratios=[0.5], limit=2, dtype="fp32",
                            output=str(output), generation={"max_new_tokens": 4}, **remote)
        run_grid(config, models=(tiny, tiny), progress=False, report=False)
        return {label: [json.loads(line)["answer"] for line in
                        (output / "demo" / label / "predictions.jsonl").read_text().splitlines()]
                for label in ("kvcomm-0.5", "random-0.5")}

    local = grid(tmp_path / "local")
    remote = grid(tmp_path / "remote", sender_url=second_server.url, receiver_url=server.url)
    assert remote == local
    assert json.loads((tmp_path / "remote" / "demo" / "kvcomm-0.5" / "config.json").read_text())["params"]["remote"]
