"""Receiver-side generation: one ``model.generate`` call on a (possibly pre-filled) cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache

from kvcomm.models import LoadedModel


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options. Greedy by default, as in the paper; ``max_new_tokens=None`` uses the task's value."""

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks compare equal work)

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@torch.no_grad()
def generate(
    model: LoadedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    settings: GenerationSettings = GenerationSettings(),
    cache: Cache | None = None,
    past_length: int = 0,
) -> list[int]:
    """Generate after ``input_ids`` ``[1, n]``; ``cache`` may hold ``past_length`` earlier positions.

    Returns the new token ids (prompt excluded, stopping at end-of-sequence).
    """
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones(1, past_length + input_ids.shape[-1], dtype=torch.long, device=device)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    output = model.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cache=cache,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if settings.ignore_eos else None,
        pad_token_id=model.tokenizer.pad_token_id,
        **sampling,
    )
    new_tokens = output[0, input_ids.shape[-1]:].tolist()
    eos = model.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if settings.ignore_eos:
        return new_tokens
    for index, token in enumerate(new_tokens):
        if token in eos_ids:
            return new_tokens[:index]
    return new_tokens


def decode(model: LoadedModel, tokens: list[int]) -> str:
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
