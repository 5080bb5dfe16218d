"""One agent: a model behind a lock, prefilling contexts into wire messages and answering with received ones.

The HTTP service, the Ray actors and the in-process topology runner all call this class, and it calls the same
library functions as the in-process methods (:func:`~kvcomm.message.encode_context`, :func:`~kvcomm.multi.merge_messages`,
:class:`~kvcomm.methods.kvcomm.KVComm`'s receiver step), so every path gives the same answers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Sequence

from kvcomm import wire
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, encode_context, validate_layers
from kvcomm.methods.kvcomm import KVComm
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.multi import merge_messages
from kvcomm.prompts import chat_ids
from kvcomm.service.chain import compress, extend_message
from kvcomm.service.errors import ServiceError
from kvcomm.service.schemas import AnswerRequest, AnswerResult, PrefillRequest, PrefillResult
from kvcomm.tasks.base import Example
from kvcomm.wire import Buffer

logger = logging.getLogger(__name__)

_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: LoadedModel) -> threading.Lock:
    """The one lock of ``model`` (shared by every agent that serves the same model object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model.model)
        if lock is None:
            lock = _LOCKS[model.model] = threading.Lock()
        return lock


def decode_messages(payloads: Sequence[Buffer], model: LoadedModel) -> list[KVMessage]:
    """Decode (checksums verified) and check each message's sender fingerprint against ``model``."""
    messages = []
    for index, payload in enumerate(payloads):
        message = wire.decode(payload)
        check_compatible(message.fingerprint, model.fingerprint)
        logger.debug("message %d: %d layers, %d tokens from %s", index, len(message.layers), message.context_length,
                     message.fingerprint.model_id)
        messages.append(message)
    return messages


def query_example(request: AnswerRequest) -> Example:
    """An item holding only what the receiver side of KVComm reads (its message, answer prefix and budget)."""
    return Example(id=request.item_id or "remote", context="(received as KV)", question=request.message, answers=(),
                   messages={"receiver": request.message}, max_new_tokens=request.max_new_tokens,
                   answer_prefix=request.answer_prefix)


class Agent:
    """A served model. Methods are blocking and thread-safe: model calls are serialised by :func:`model_lock`."""

    def __init__(self, model: LoadedModel, generation: GenerationSettings | None = None) -> None:
        self.model = model
        self.generation = generation or GenerationSettings()
        self.lock = model_lock(model)

    def _locked(self, wait_s: float | None) -> "_Held":
        return _Held(self.lock, wait_s, self.model.name)

    def prefill(self, request: PrefillRequest, incoming: Sequence[Buffer] = (), wait_s: float | None = None
                ) -> PrefillResult:
        """Prefill ``request.message`` (extending ``incoming`` messages when given) into wire-format-v1 bytes."""
        received = decode_messages(incoming, self.model)
        ids = chat_ids(self.model.tokenizer, request.message)
        start = time.perf_counter()
        with self._locked(wait_s):
            if received:
                base = merge_messages(received) if len(received) > 1 else received[0]
                if request.layers is not None and tuple(sorted(set(request.layers))) != base.layers:
                    raise ServiceError(422, "invalid_request", f"a chain keeps the first agent's layers "
                                       f"{list(base.layers)}; got layers {list(request.layers)}")
                message = extend_message(self.model, base, ids)
            else:
                layers = validate_layers(request.layers if request.layers is not None
                                         else range(self.model.num_layers), self.model.num_layers)
                message = encode_context(self.model, ids, layers, request.sink_tokens)
            payload = wire.encode(compress(message, request.bits, request.group_size))
        seconds = time.perf_counter() - start
        return PrefillResult(payload, message.context_length, message.layers, message.sink_tokens,
                             int(ids.shape[-1]), seconds)

    def answer(self, request: AnswerRequest, payloads: Sequence[Buffer], wait_s: float | None = None) -> AnswerResult:
        """Answer ``request.message`` attending to the messages (several: concatenated, multi-sender layout)."""
        if not payloads:
            raise ServiceError(422, "invalid_request", "an answer needs at least one KV message")
        messages = decode_messages(payloads, self.model)
        settings = self.generation if request.generation is None else request.generation
        settings = dataclasses.replace(settings, max_new_tokens=None)  # the request's budget applies
        with self._locked(wait_s):
            message = merge_messages(messages) if len(messages) > 1 else messages[0]
            method = KVComm(self.model, self.model, message.layers, message.sink_tokens, settings)
            output = method.receive(message, query_example(request))
        wire_bytes = sum(memoryview(payload).nbytes for payload in payloads)
        return AnswerResult(output.answer, output.costs, tuple(message.layers), message.context_length, wire_bytes,
                            request.item_id)


class _Held:
    """Hold a lock for a block, waiting at most ``wait_s`` seconds (503 ``busy`` otherwise)."""

    def __init__(self, lock: threading.Lock, wait_s: float | None, name: str) -> None:
        self.lock, self.wait_s, self.name = lock, wait_s, name

    def __enter__(self) -> None:
        if not self.lock.acquire(timeout=-1 if self.wait_s is None else max(self.wait_s, 0.0)):
            raise ServiceError(503, "busy", f"model {self.name!r} stayed busy for {self.wait_s:.1f} s; retry later")

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
