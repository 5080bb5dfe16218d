"""Command-line commands of the agent service: ``register(app)`` adds ``serve``, ``agent …`` and ``topology run``.

``python -m kvcomm.service`` runs them on their own.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, List, Optional, TypeVar

import typer

from kvcomm.errors import KVCommError
from kvcomm.prompts import QA_INSTRUCTION, RECEIVER_TEMPLATE, SENDER_TEMPLATE

F = TypeVar("F", bound=Callable[..., Any])
MIB = 1024 * 1024


def _fail_cleanly(function: F) -> F:
    """Print kvcomm errors as one line on stderr and exit 2 (no traceback)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KVCommError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2)

    return wrapper  # type: ignore[return-value]


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def parse_layer_list(text: Optional[str]) -> Optional[list[int]]:
    """``"0,3,5"`` / ``"4-12"`` / ``"0,2-4"`` / ``"all"`` (→ None) into layer indices."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                layers.extend(range(low, high + 1))
            elif part.strip():
                layers.append(int(part))
    except ValueError:
        raise typer.BadParameter(f"layers are like '0,3,5', '4-12' or 'all', got {text!r}")
    return layers


def _message(message: Optional[str], text: Optional[str], template: str, field: str) -> str:
    if (message is None) == (text is None):
        raise typer.BadParameter(f"give exactly one of --message or --{field}")
    if message is not None:
        return message
    return template.format(instruction=QA_INSTRUCTION, context=text, question=text)


def _client(url: str, token: Optional[str], timeout: float) -> Any:
    from kvcomm.service.client import AgentClient

    return AgentClient(url, token, timeout)


URL = typer.Option("http://127.0.0.1:8000", "--url", help="the agent service's base URL")
TOKEN = typer.Option(None, "--token", envvar="KVCOMM_TOKEN", help="bearer token (or $KVCOMM_TOKEN)")
TIMEOUT = typer.Option(300.0, "--timeout", help="seconds to wait for the agent")


def serve(
    model: str = typer.Option(..., "--model", help="hub id, local folder, .gguf file or smollm2-135m-instruct"),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    token: Optional[str] = typer.Option(None, "--token", envvar="KVCOMM_TOKEN",
                                        help="require this bearer token (or $KVCOMM_TOKEN); none: no auth"),
    max_message_mb: float = typer.Option(256.0, "--max-message-mb", help="largest KV message accepted (MiB)"),
    store_ttl: float = typer.Option(600.0, "--store-ttl", help="seconds a stored message lives"),
    store_mb: float = typer.Option(1024.0, "--store-mb", help="memory cap of the message store (MiB)"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="seconds per request before a 504"),
    peer_token: Optional[str] = typer.Option(None, "--peer-token", envvar="KVCOMM_PEER_TOKEN",
                                             help="bearer token sent when fetching messages from other agents"),
    allow_peer: Optional[List[str]] = typer.Option(None, "--allow-peer",
                                                   help="URL prefix messages may be fetched from (repeatable)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a model as a KVComm agent over HTTP (uvicorn)."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    app = build_app(model, token, max_message_mb, store_ttl, store_mb, dtype, device, request_timeout, peer_token,
                    allow_peer)
    from kvcomm.service.server import run_server

    run_server(app, host, port, log_level)


@_fail_cleanly
def build_app(model: str, token: Optional[str] = None, max_message_mb: float = 256.0, store_ttl: float = 600.0,
              store_mb: float = 1024.0, dtype: str = "bf16", device: str = "cpu", request_timeout: float = 300.0,
              peer_token: Optional[str] = None, allow_peer: Optional[List[str]] = None) -> Any:
    """The app ``serve`` runs (loads the model)."""
    from kvcomm.models import load_model
    from kvcomm.service.app import create_app
    from kvcomm.service.settings import ServiceSettings

    settings = ServiceSettings(token=token, max_message_bytes=int(max_message_mb * MIB), store_ttl_s=store_ttl,
                               store_max_bytes=int(store_mb * MIB), request_timeout_s=request_timeout,
                               peer_token=peer_token, allowed_peers=tuple(allow_peer) if allow_peer else None)
    return create_app(load_model(model, dtype=dtype, device=device), settings)


agent_app = typer.Typer(no_args_is_help=True, help="Talk to a running agent service.")


@agent_app.command("health")
@_fail_cleanly
def agent_health(url: str = URL, token: Optional[str] = TOKEN, timeout: float = TIMEOUT) -> None:
    """GET /health."""
    with _client(url, token, timeout) as client:
        _echo_json(client.health())


@agent_app.command("fingerprint")
@_fail_cleanly
def agent_fingerprint(url: str = URL, token: Optional[str] = TOKEN, timeout: float = TIMEOUT) -> None:
    """GET /fingerprint."""
    with _client(url, token, timeout) as client:
        _echo_json(client.info())


@agent_app.command("metrics")
@_fail_cleanly
def agent_metrics(url: str = URL, token: Optional[str] = TOKEN, timeout: float = TIMEOUT) -> None:
    """GET /metrics."""
    with _client(url, token, timeout) as client:
        _echo_json(client.metrics())


@agent_app.command("prefill")
@_fail_cleanly
def agent_prefill(
    url: str = URL, token: Optional[str] = TOKEN, timeout: float = TIMEOUT,
    context: Optional[str] = typer.Option(None, "--context", help="context text (wrapped in the paper's sender prompt)"),
    message: Optional[str] = typer.Option(None, "--message", help="the sender's whole user message instead"),
    layers: Optional[str] = typer.Option(None, "--layers", help="'0,3,5', '4-12' or all (default)"),
    sink_tokens: int = typer.Option(1, "--sink-tokens"),
    bits: Optional[int] = typer.Option(None, "--bits", help="quantize to 2/3/4/6/8 bits"),
    group_size: int = typer.Option(32, "--group-size"),
    store: bool = typer.Option(False, "--store", help="keep the message on the agent and print its id"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the message bytes here (without --store)"),
) -> None:
    """POST /prefill: print the stored message's id, or write the message bytes to --out."""
    if not store and out is None:
        raise typer.BadParameter("give --out FILE for the message bytes, or --store")
    text = _message(message, context, SENDER_TEMPLATE, "context")
    with _client(url, token, timeout) as client:
        done = client.prefill(text, parse_layer_list(layers), sink_tokens, bits, group_size, store)
    info = {"bytes": done.nbytes, "context_length": done.context_length, "layers": list(done.layers),
            "seconds": round(done.seconds, 4)}
    if done.ref is not None:
        info.update(id=done.ref.id, url=done.ref.url)
    elif out is not None:
        out.write_bytes(done.payload or b"")
        info["file"] = str(out)
    _echo_json(info)


@agent_app.command("answer")
@_fail_cleanly
def agent_answer(
    url: str = URL, token: Optional[str] = TOKEN, timeout: float = TIMEOUT,
    question: Optional[str] = typer.Option(None, "--question", help="question (wrapped in the receiver prompt)"),
    message: Optional[str] = typer.Option(None, "--message", help="the receiver's whole user message instead"),
    answer_prefix: str = typer.Option("", "--answer-prefix"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    message_file: Optional[List[Path]] = typer.Option(None, "--message-file", help="a message file (repeatable)"),
    message_id: Optional[List[str]] = typer.Option(None, "--message-id", help="a message stored on this agent"),
    message_url: Optional[List[str]] = typer.Option(None, "--message-url",
                                                    help="a message on another agent: BASE_URL#ID or a full URL"),
) -> None:
    """POST /answer with messages from files, ids and other agents (in that order)."""
    from kvcomm.service.client import MessageRef

    text = _message(message, question, RECEIVER_TEMPLATE, "question")
    inputs: list[Any] = [path.read_bytes() for path in message_file or []]
    inputs += [MessageRef(ident) for ident in message_id or []]
    for item in message_url or []:
        base, _, ident = item.partition("#")
        inputs.append(MessageRef(ident or None, base))  # no '#ID': a full message URL
    if not inputs:
        raise typer.BadParameter("give at least one --message-file, --message-id or --message-url")
    with _client(url, token, timeout) as client:
        result = client.answer(text, inputs, answer_prefix, max_new_tokens)
    _echo_json(result.to_json())


@agent_app.command("upload")
@_fail_cleanly
def agent_upload(file: Path = typer.Argument(..., help="a message file"), url: str = URL,
                 token: Optional[str] = TOKEN, timeout: float = TIMEOUT) -> None:
    """POST /messages: store a message file on the agent; prints its id."""
    with _client(url, token, timeout) as client:
        ref = client.upload(file.read_bytes())
    _echo_json({"id": ref.id, "url": ref.url})


@agent_app.command("download")
@_fail_cleanly
def agent_download(message_id: str = typer.Argument(...), out: Path = typer.Option(..., "--out"), url: str = URL,
                   token: Optional[str] = TOKEN, timeout: float = TIMEOUT) -> None:
    """GET /messages/{id} into a file."""
    with _client(url, token, timeout) as client:
        data = client.download(message_id)
    out.write_bytes(data)
    _echo_json({"id": message_id, "bytes": len(data), "file": str(out)})


topology_app = typer.Typer(no_args_is_help=True, help="Run topologies of agents described in YAML.")


@topology_app.command("run")
@_fail_cleanly
def topology_run(
    file: Path = typer.Argument(..., help="topology YAML"),
    task: str = typer.Option(..., "--task", help="demo, countries, tipsheets or hotpotqa"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N test items"),
    output: Optional[Path] = typer.Option(None, "--output", help="write per-item rows (JSON lines) here"),
    check: bool = typer.Option(False, "--check", help="compare with the in-process method (model agents only)"),
    answer_prefix: str = typer.Option("", "--answer-prefix", help="text after the receivers' generation prompt"),
) -> None:
    """Run a topology on a task's test items; prints one JSON row per item (with each receiver's score under the
    task's metric) and a per-receiver mean score."""
    from kvcomm.service.topology import (Topology, TopologyError, build_endpoints, default_loader, reference_rows,
                                         run_topology, topology_method)
    from kvcomm.tasks import get_task

    from kvcomm.metrics import score_all

    topology = Topology.load(file)
    task_spec = get_task(task)
    examples = task_spec.load(data_dir).test
    examples = examples[:limit] if limit else examples
    if answer_prefix:
        examples = [example.with_answer_prefix(answer_prefix) for example in examples]
    loader = default_loader()
    rows = run_topology(topology_method(topology, build_endpoints(topology, loader)), examples)
    if check:
        if not topology.local_only or any(spec.ray for spec in topology.agents.values()):
            raise TopologyError("--check needs every agent to be a local model (no url, no ray)")
        models = {name: loader(spec) for name, spec in topology.agents.items()}
        expected = {row["id"]: row["answers"] for row in reference_rows(topology, models, examples)}
        for row in rows:
            row["matches_in_process"] = row.get("answers") == expected[row["id"]]
    totals: dict[str, list[float]] = {}
    for row in rows:
        if "answers" in row:
            row["scores"] = {name: score_all(answer, row["gold"])[task_spec.metric]
                             for name, answer in row["answers"].items()}
            for name, value in row["scores"].items():
                totals.setdefault(name, []).append(value)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for line in lines:
        typer.echo(line)
    for name, values in totals.items():
        typer.echo(f"{name}: {task_spec.metric} = {sum(values) / len(values):.3f} over {len(values)} items", err=True)
    failed = sum("error" in row for row in rows) + sum(row.get("matches_in_process") is False for row in rows)
    if failed:
        typer.echo(f"{failed} of {len(rows)} items failed or differ from the in-process method", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``agent …`` and ``topology …`` to ``app``."""
    app.command("serve")(serve)
    app.add_typer(agent_app, name="agent")
    app.add_typer(topology_app, name="topology")


def main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True, help="KVComm agent services.")
    register(app)
    app(args=sys.argv[1:], prog_name="python -m kvcomm.service")
