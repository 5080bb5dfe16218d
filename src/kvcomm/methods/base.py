"""What every method returns, and the single-model answering step shared by Baseline and Skyline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvcomm.costs import CostRecord, stopwatch
from kvcomm.generation import GenerationSettings, decode, generate
from kvcomm.message import check_window
from kvcomm.models import LoadedModel
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example


@dataclass
class MethodOutput:
    """The receiver's answer to one item and what it cost."""

    answer: str
    costs: CostRecord
    layers: tuple[int, ...] | None = None


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


def answer_alone(model: LoadedModel, role: str, example: Example, settings: GenerationSettings) -> MethodOutput:
    """One model answers the ``role`` message (``baseline`` or ``skyline``) of ``example``."""
    input_ids = chat_ids(model.tokenizer, example.messages[role], example.answer_prefix)
    budget = max_new_tokens(example, settings)
    check_window(model, input_ids.shape[-1] + budget, f"the {role} prompt")
    with stopwatch(model.device) as elapsed:
        tokens = generate(model, input_ids, budget, settings)
    costs = CostRecord(receiver_prefill_tokens=int(input_ids.shape[-1]), generated_tokens=len(tokens),
                       receiver_seconds=elapsed[0])
    return MethodOutput(answer=decode(model, tokens), costs=costs)
