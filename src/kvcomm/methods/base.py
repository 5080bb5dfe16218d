"""What every method returns, the single-model answering step shared by Baseline and Skyline, and the cost helpers
every method uses to fill its :class:`~kvcomm.costs.CostRecord` (FLOPs from :mod:`kvcomm.flops`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvcomm.costs import CostRecord, stopwatch
from kvcomm.flops import ModelDims, decode_steps, forward_flops, generation_flops
from kvcomm.generation import GenerationSettings, decode, generate
from kvcomm.message import KVMessage, check_window
from kvcomm.models import LoadedModel
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example


@dataclass
class MethodOutput:
    """The receiver's answer to one item and what it cost."""

    answer: str
    costs: CostRecord
    layers: tuple[int, ...] | None = None
    # text methods: what was said before the answer ({"sender": ..., "draft": ...}; CIPHER: nearest tokens, decoded)
    messages: dict[str, str] | None = None


class Method(Protocol):
    """A way to answer an item; ``name`` labels results."""

    name: str

    def answer(self, example: Example) -> MethodOutput: ...


def send_then_receive(method: object, example: Example) -> MethodOutput:
    """``method.send(example)`` then ``method.receive(packet, example)``, with the sender's seconds in the costs."""
    packet, sender_seconds = method.send(example)  # type: ignore[attr-defined]
    output: MethodOutput = method.receive(packet, example)  # type: ignore[attr-defined]
    output.costs.sender_seconds = sender_seconds
    return output


def max_new_tokens(example: Example, settings: GenerationSettings) -> int:
    return settings.max_new_tokens or example.max_new_tokens


def model_dims(model: LoadedModel) -> ModelDims:
    """The sizes of ``model`` that the FLOPs formulas need."""
    return ModelDims.from_config(model.model.config)


def prefill_flops(model: LoadedModel, tokens: int, past_keys: int | Sequence[int] = 0, logits_kept: int = 1) -> int:
    """FLOPs of one forward pass of ``model`` over ``tokens`` tokens (e.g. the sender's context prefill)."""
    return forward_flops(model_dims(model), tokens, past_keys, logits_kept)


def answer_flops(model: LoadedModel, prompt_tokens: int, generated_tokens: int, budget: int,
                 settings: GenerationSettings, past_keys: int | Sequence[int] = 0) -> int:
    """FLOPs of one ``generate`` call: prefill of ``prompt_tokens`` after ``past_keys`` cached keys (per layer or
    one number), then the decode steps that produced ``generated_tokens`` of ``budget`` (see
    :func:`kvcomm.flops.decode_steps`)."""
    steps = decode_steps(generated_tokens, budget, settings.ignore_eos)
    return generation_flops(model_dims(model), prompt_tokens, steps, past_keys)


def message_past_keys(message: KVMessage, num_layers: int) -> list[int]:
    """Sender keys each receiver layer attends to: ``|C|`` at shared layers, the sink count where a sink is kept,
    0 elsewhere (length ``num_layers``)."""
    return [message.context_length if layer in message.keys
            else message.sink_tokens if layer in message.sink_keys else 0
            for layer in range(num_layers)]


def kv_costs(sender: LoadedModel, receiver: LoadedModel, message: KVMessage, query_tokens: int, tokens: list[int],
             budget: int, settings: GenerationSettings, receiver_seconds: float, kv_bytes: int | None = None,
             text_bytes: int = 0, text_tokens: int = 0, sender_flops: int | None = None) -> CostRecord:
    """The cost record of a KV-sharing answer (KVComm, KVComm-S, Q-KVComm, multi-sender).

    Sender: one prefill over ``message.context_length`` tokens (unless ``sender_flops`` is given). Receiver: the
    prompt of ``query_tokens`` tokens and the decode steps that produced ``tokens``, where each layer attends to
    the sender keys of :func:`message_past_keys`. ``kv_bytes`` defaults to ``message.nbytes``.
    """
    past = message_past_keys(message, receiver.num_layers)
    return CostRecord(
        sender_prefill_tokens=message.context_length, receiver_prefill_tokens=query_tokens,
        generated_tokens=len(tokens), kv_bytes=message.nbytes if kv_bytes is None else kv_bytes,
        text_bytes=text_bytes, text_tokens=text_tokens, receiver_seconds=receiver_seconds,
        sender_flops=prefill_flops(sender, message.context_length) if sender_flops is None else sender_flops,
        receiver_flops=answer_flops(receiver, query_tokens, len(tokens), budget, settings, past),
        attended_context_keys=sum(past),
    )


def answer_alone(model: LoadedModel, role: str, example: Example, settings: GenerationSettings) -> MethodOutput:
    """One model answers the ``role`` message (``baseline`` or ``skyline``) of ``example``."""
    input_ids = chat_ids(model.tokenizer, example.messages[role], example.answer_prefix)
    budget = max_new_tokens(example, settings)
    check_window(model, input_ids.shape[-1] + budget, f"the {role} prompt")
    with stopwatch(model.device) as elapsed:
        tokens = generate(model, input_ids, budget, settings)
    prompt_tokens = int(input_ids.shape[-1])
    costs = CostRecord(receiver_prefill_tokens=prompt_tokens, generated_tokens=len(tokens),
                       receiver_seconds=elapsed[0],
                       receiver_flops=answer_flops(model, prompt_tokens, len(tokens), budget, settings))
    return MethodOutput(answer=decode(model, tokens), costs=costs)
