"""The agent service: ``create_app(model, settings)`` builds the Starlette app (serve it with uvicorn).

Endpoints (JSON errors ``{"error", "detail", "status"}`` everywhere):

* ``GET /health`` — liveness, open without token;
* ``GET /fingerprint`` — the model's KV-compatibility fingerprint;
* ``GET /metrics`` — request, byte, latency and error counters, store occupancy;
* ``POST /prefill`` — prefill a sender message; returns the wire-format-v1 message bytes, or stores it
  (``"store": true``) and returns its id; ``extends`` sources make it a chain hop;
* ``POST /answer`` — answer with one or more messages given inline (multipart parts or a raw body), by id, or by URL
  on other agents (fetched with ``GET /messages/{id}``);
* ``POST /messages`` (raw body: upload and store, validated), ``GET /messages/{id}``, ``DELETE /messages/{id}``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvcomm.models import LoadedModel
from kvcomm.service.agent import Agent, decode_messages
from kvcomm.service.errors import ServiceError, as_service_error
from kvcomm.service.http_io import fetch_message, read_limited, read_request
from kvcomm.service.metrics import Metrics
from kvcomm.service.middleware import ServiceMiddleware, error_response
from kvcomm.service.schemas import MESSAGE_MEDIA_TYPE, AnswerRequest, PrefillRequest, Source, check_id, invalid
from kvcomm.service.settings import ServiceSettings
from kvcomm.service.store import MessageStore

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class _Service:
    """State and handlers of one app."""

    def __init__(self, model: LoadedModel, settings: ServiceSettings) -> None:
        self.settings = settings
        self.agent = Agent(model, settings.generation)
        self.store = MessageStore(settings.store_ttl_s, settings.store_max_bytes)
        self.metrics = Metrics()
        self.started = time.time()

    def guard(self, handler: Handler) -> Handler:
        """Turn every exception of ``handler`` into a JSON error response (500 for unexpected ones, logged)."""

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every failure becomes a clear JSON error
                service_error = as_service_error(error)
                if service_error.status >= 500 and service_error.code == "internal_error":
                    logger.exception("%s %s failed", request.method, request.url.path)
                else:
                    logger.warning("%s %s: %d %s: %s", request.method, request.url.path, service_error.status,
                                   service_error.code, service_error.detail)
                return error_response(service_error, self.metrics)

        return guarded

    async def in_thread(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking model call in the threadpool (the agent's lock serialises it); abandoned on timeout."""
        start = time.perf_counter()
        call = functools.partial(function, *args, wait_s=self.settings.request_timeout_s)
        try:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        finally:
            self.metrics.model_time(what, time.perf_counter() - start)

    async def collect(self, sources: Sequence[Source], parts: dict[str, bytes]) -> list[bytes]:
        """The payloads named by ``sources`` (all inline parts, in order, when there are no sources)."""
        if not sources:
            sources = [Source(part=name) for name in parts]
        if len(sources) > self.settings.max_messages:
            raise invalid(f"{len(sources)} messages exceed this service's limit of {self.settings.max_messages}")
        unused = set(parts) - {source.part for source in sources}
        if unused:
            raise invalid(f"message parts {sorted(unused)} are not named by any source")
        payloads = []
        for source in sources:
            if source.part is not None:
                if source.part not in parts:
                    raise invalid(f"no message part named {source.part!r} in the request")
                payloads.append(parts[source.part])
            elif source.location is None:
                payloads.append(self.stored(source.id))
            else:
                payloads.append(await self.fetch(source.location))
        return payloads

    def stored(self, message_id: str | None) -> bytes:
        payload = self.store.get(check_id(message_id or ""))
        if payload is None:
            raise ServiceError(404, "message_not_found", f"no message {message_id!r} here (unknown, expired after "
                               f"{self.settings.store_ttl_s:g} s, or evicted to respect the store cap)")
        return payload

    async def fetch(self, url: str) -> bytes:
        allowed = self.settings.allowed_peers
        if allowed is not None and not any(url.startswith(prefix) for prefix in allowed):
            raise ServiceError(403, "peer_not_allowed", f"{url} is not under an allowed peer ({', '.join(allowed)})")
        return await fetch_message(url, self.settings.max_message_bytes, self.settings.fetch_timeout_s,
                                   self.settings.peer_token, on_bytes=self.metrics.fetched)

    async def body(self, request: Request) -> tuple[Any, dict[str, bytes]]:
        limits = self.settings
        return await read_request(request, limits.max_message_bytes, limits.max_messages, limits.max_json_bytes)

    # --- endpoints ----------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.agent.model.name,
                             "uptime_s": round(time.time() - self.started, 3), "busy": self.agent.lock.locked()})

    async def fingerprint(self, request: Request) -> Response:
        model = self.agent.model
        return JSONResponse({"model": model.name, "fingerprint": model.fingerprint.to_dict(),
                             "num_layers": model.num_layers, "dtype": str(model.dtype).replace("torch.", ""),
                             "max_positions": model.max_positions})

    async def metrics_view(self, request: Request) -> Response:
        return JSONResponse({"model": self.agent.model.name, **self.metrics.snapshot(), "store": self.store.stats()})

    async def prefill(self, request: Request) -> Response:
        payload, parts = await self.body(request)
        prefill = PrefillRequest.from_json(payload)
        incoming = await self.collect(prefill.extends, parts) if prefill.extends or parts else []
        result = await self.in_thread("prefill", self.agent.prefill, prefill, incoming)
        meta = result.meta()
        if prefill.store:
            message_id = self.store.put(result.payload)
            return JSONResponse({"id": message_id, "url": str(request.base_url).rstrip("/"),
                                 "expires_in_s": self.store.expires_in(message_id), **meta}, status_code=201)
        return Response(result.payload, media_type=MESSAGE_MEDIA_TYPE, headers={"x-kvcomm-meta": json.dumps(meta)})

    async def answer(self, request: Request) -> Response:
        payload, parts = await self.body(request)
        answer = AnswerRequest.from_json(payload)
        payloads = await self.collect(answer.messages, parts)
        result = await self.in_thread("answer", self.agent.answer, answer, payloads)
        return JSONResponse(result.to_json())

    async def upload(self, request: Request) -> Response:
        payload = await read_limited(request, self.settings.max_message_bytes, "the uploaded message")
        (message,) = await anyio.to_thread.run_sync(decode_messages, [payload], self.agent.model)
        message_id = self.store.put(payload)
        return JSONResponse({"id": message_id, "url": str(request.base_url).rstrip("/"), "bytes": len(payload),
                             "context_length": message.context_length, "layers": list(message.layers),
                             "expires_in_s": self.store.expires_in(message_id)}, status_code=201)

    async def download(self, request: Request) -> Response:
        return Response(self.stored(request.path_params["message_id"]), media_type=MESSAGE_MEDIA_TYPE)

    async def delete(self, request: Request) -> Response:
        message_id = check_id(request.path_params["message_id"])
        if not self.store.delete(message_id):
            raise ServiceError(404, "message_not_found", f"no message {message_id!r} here")
        return Response(status_code=204)


def create_app(model: LoadedModel, settings: ServiceSettings | None = None) -> Starlette:
    """The ASGI app serving ``model`` as an agent (see the module docstring for the endpoints)."""
    service = _Service(model, settings or ServiceSettings())
    guard = service.guard
    routes = [
        Route("/health", guard(service.health), methods=["GET"]),
        Route("/fingerprint", guard(service.fingerprint), methods=["GET"]),
        Route("/metrics", guard(service.metrics_view), methods=["GET"]),
        Route("/prefill", guard(service.prefill), methods=["POST"]),
        Route("/answer", guard(service.answer), methods=["POST"]),
        Route("/messages", guard(service.upload), methods=["POST"]),
        Route("/messages/{message_id}", guard(service.download), methods=["GET"]),
        Route("/messages/{message_id}", guard(service.delete), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(ServiceMiddleware, settings=service.settings,
                                                          metrics=service.metrics)])
    app.state.service = service
    logger.info("agent service for %s ready (auth %s)", model.name, "on" if service.settings.token else "off")
    return app
