"""Skyline: one model reads context and question together (the upper bound)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcomm.generation import GenerationSettings
from kvcomm.methods.base import MethodOutput, answer_alone
from kvcomm.models import LoadedModel
from kvcomm.tasks.base import Example


@dataclass
class Skyline:
    """Receiver on the paper's skyline prompt (instruction + context + question)."""

    receiver: LoadedModel
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "skyline"

    def answer(self, example: Example) -> MethodOutput:
        return answer_alone(self.receiver, "skyline", example, self.settings)
