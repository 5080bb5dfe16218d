"""Bounded request bodies, multipart parsing and fetching messages from other agents (the HTTP side of the service)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from kvcomm.service.errors import ServiceError
from kvcomm.service.schemas import REQUEST_HEADER, invalid

logger = logging.getLogger(__name__)


def too_large(size: int | str, limit: int, what: str) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"{what} of {size} bytes exceeds the limit of {limit} bytes "
                        "(raise it with --max-message-mb)")


async def read_limited(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The whole body, refusing (413) more than ``limit`` bytes before reading them when Content-Length says so.

    A client that disconnects before the declared length arrived gets a 400 ``upload_incomplete`` (logged; the
    connection is gone, the service carries on).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "bad_request", f"Content-Length must be a number, got {declared!r}")
        if int(declared) > limit:
            raise too_large(declared, limit, what)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large(f"more than {limit}", limit, what)
            chunks.append(chunk)
    except ClientDisconnect as error:
        expected = f" of {declared}" if declared else ""
        raise ServiceError(400, "upload_incomplete",
                           f"the client disconnected after {total}{expected} bytes of {what}") from error
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise invalid(f"the request body is not valid JSON: {error}") from error


async def read_request(request: Request, max_message: int, max_messages: int, max_json: int
                       ) -> tuple[Any, dict[str, bytes]]:
    """The JSON request and the inline message parts of a call, whichever way it was sent.

    * ``application/json``: the request only;
    * ``multipart/form-data``: a ``request`` field (JSON) and message files, named by their field names;
    * ``application/octet-stream`` (or the message media type): one message, part ``"body"``, the JSON request in
      the ``X-KVComm-Request`` header.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("", "application/json"):
        return parse_json(await read_limited(request, max_json, "the JSON request")), {}
    if kind == "multipart/form-data":
        body = await read_limited(request, max_message * max_messages + max_json, "the multipart request")
        return await _multipart(request, body, max_message, max_messages, max_json)
    if kind in ("application/octet-stream", "application/vnd.kvcomm.kv-message"):
        body = await read_limited(request, max_message, "the uploaded message")
        header = request.headers.get(REQUEST_HEADER)
        return (parse_json(header.encode()) if header else {}), {"body": body}
    raise ServiceError(415, "unsupported_media_type",
                       f"send application/json, multipart/form-data or application/octet-stream, not {kind!r}")


async def _multipart(request: Request, body: bytes, max_message: int, max_messages: int, max_json: int
                     ) -> tuple[Any, dict[str, bytes]]:
    sent = False

    async def replay() -> dict[str, Any]:  # the already-read (bounded) body, once
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_messages, max_fields=4, max_part_size=max_json)
    except Exception as error:  # malformed multipart: python-multipart / starlette raise several types
        raise invalid(f"malformed multipart body: {error}") from error
    try:
        parts: dict[str, bytes] = {}
        payload: Any = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if len(data) > max_message:
                    raise too_large(len(data), max_message, f"message part {name!r}")
                if name in parts:
                    raise invalid(f"two message parts are named {name!r}")
                parts[name] = data
            elif name == "request":
                payload = parse_json(value.encode())
            else:
                raise invalid(f"unknown form field {name!r}; send 'request' (JSON) and message files")
        return payload, parts
    finally:
        await form.close()


async def fetch_message(url: str, limit: int, timeout_s: float, token: str | None,
                        on_bytes: Callable[[int], None] | None = None,
                        transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """Download one message from another agent (``GET …/messages/{id}``), at most ``limit`` bytes.

    A connection that drops mid-body (the sender died), a refused connection or a non-200 answer is a 502
    ``upstream_failed``; a timeout a 504 ``upstream_timeout``; an oversized message a 413.
    """
    headers = {"authorization": f"Bearer {token}"} if token else {}
    received = 0
    try:
        async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as client:
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:2000].decode("utf-8", "replace")
                    raise ServiceError(502, "upstream_failed",
                                       f"fetching {url}: the agent answered {response.status_code}: {detail}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise too_large(declared, limit, f"the message at {url}")
                chunks = []
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    if received > limit:
                        raise too_large(f"more than {limit}", limit, f"the message at {url}")
                    chunks.append(chunk)
    except httpx.TimeoutException as error:
        raise ServiceError(504, "upstream_timeout",
                           f"fetching {url} timed out after {timeout_s:g} s ({received} bytes received)") from error
    except httpx.HTTPError as error:
        raise ServiceError(502, "upstream_failed", f"fetching {url} failed after {received} bytes: "
                           f"{type(error).__name__}: {error}") from error
    finally:
        if on_bytes is not None:
            on_bytes(received)
    return b"".join(chunks)


Fetcher = Callable[[str], Awaitable[bytes]]
