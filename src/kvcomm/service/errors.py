"""Errors of the agent service: each carries the HTTP status and a short machine-readable code."""

from __future__ import annotations

from typing import Any

from kvcomm.errors import (IncompatibleModelsError, KVCommError, LayerSelectionError, PromptError, QuantizationError,
                           TaskError, WireFormatError)


class ServiceError(KVCommError):
    """A request the service refuses, or a failure talking to an agent.

    ``status`` is the HTTP status (0 when no agent answered at all), ``code`` a short stable identifier such as
    ``"payload_too_large"``, and the message says what was wrong and what would fix it.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        """The JSON body the service answers with."""
        return {"error": self.code, "detail": self.detail, "status": self.status}

    @classmethod
    def from_json(cls, status: int, body: Any, fallback: str = "") -> "ServiceError":
        """Rebuild an error from a service's JSON error body (client side)."""
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return cls(status, body["error"], str(body.get("detail", "")))
        return cls(status, "http_error", fallback or f"the agent answered HTTP {status}")


class MissingDependencyError(KVCommError):
    """An optional dependency (such as ``ray``) is not installed."""


def as_service_error(error: Exception) -> ServiceError:
    """Map a library error to the status the service answers with (500 for anything unexpected)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, IncompatibleModelsError):
        return ServiceError(409, "incompatible_fingerprint", str(error))
    if isinstance(error, WireFormatError):
        return ServiceError(422, "invalid_message", str(error))
    if isinstance(error, (LayerSelectionError, PromptError, QuantizationError, TaskError)):
        return ServiceError(422, "invalid_request", str(error))
    if isinstance(error, KVCommError):
        return ServiceError(400, "bad_request", str(error))
    return ServiceError(500, "internal_error", f"{type(error).__name__}: {error}")
