"""Baseline: the receiver answers the question alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcomm.generation import GenerationSettings
from kvcomm.methods.base import MethodOutput, answer_alone
from kvcomm.models import LoadedModel
from kvcomm.tasks.base import Example


@dataclass
class Baseline:
    """Receiver alone, on the paper's baseline prompt (instruction + question)."""

    receiver: LoadedModel
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "baseline"

    def answer(self, example: Example) -> MethodOutput:
        return answer_alone(self.receiver, "baseline", example, self.settings)
