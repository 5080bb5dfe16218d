"""ASGI middleware of the service: bearer-token authentication, request timeout, and the request counters."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcomm.service.errors import ServiceError
from kvcomm.service.metrics import Metrics, route_of
from kvcomm.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

OPEN_ROUTES = ("/health",)  # answered without a token (liveness probes)


def error_response(error: ServiceError, metrics: Metrics | None = None) -> JSONResponse:
    """The JSON error response for ``error`` (counted in ``metrics``)."""
    if metrics is not None:
        metrics.error(error.code)
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


def _authorized(scope: Scope, token: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return False


class ServiceMiddleware:
    """Wraps the routes: 401 without the right token, 504 past ``request_timeout_s``, counters for every request."""

    def __init__(self, app: ASGIApp, settings: ServiceSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(scope["path"])
        state: dict[str, Any] = {"in": 0, "out": 0, "status": 0, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["in"] += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"], state["status"] = True, message["status"]
            elif message["type"] == "http.response.body":
                state["out"] += len(message.get("body", b""))
            await send(message)

        self.metrics.started(route)
        start = time.perf_counter()
        try:
            if self.settings.token is not None and route not in OPEN_ROUTES and not _authorized(scope, self.settings.token):
                error = ServiceError(401, "unauthorized", "missing or wrong bearer token (send 'Authorization: Bearer "
                                     "<token>' with the service's --token)")
                await error_response(error, self.metrics)(scope, counted_receive, counted_send)
                return
            try:
                with anyio.fail_after(self.settings.request_timeout_s):
                    await self.app(scope, counted_receive, counted_send)
            except TimeoutError:
                logger.warning("%s %s timed out after %.1f s", scope["method"], scope["path"],
                               self.settings.request_timeout_s)
                if state["started"]:
                    raise
                error = ServiceError(504, "timeout", f"the request took longer than {self.settings.request_timeout_s:g} s "
                                     "(the service's request timeout)")
                await error_response(error, self.metrics)(scope, counted_receive, counted_send)
        finally:
            self.metrics.finished(route, state["status"], time.perf_counter() - start, state["in"], state["out"])
