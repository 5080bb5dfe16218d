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


def eos_ids(model: LoadedModel) -> set[int]:
    """End-of-sequence ids of ``model`` (its generation config, else its tokenizer)."""
    eos = model.model.generation_config.eos_token_id
    if eos is None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _run_generate(model: LoadedModel, inputs: dict[str, object], mask_length: int, max_new_tokens: int,
                  settings: GenerationSettings) -> torch.Tensor:
    """One ``model.generate`` call with an all-ones 2-D mask of ``mask_length`` (past + prompt) positions."""
    attention_mask = torch.ones(1, mask_length, dtype=torch.long, device=model.device)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return model.model.generate(
        **inputs,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if settings.ignore_eos else None,
        pad_token_id=model.tokenizer.pad_token_id,
        **sampling,
    )


def _until_eos(model: LoadedModel, tokens: list[int], settings: GenerationSettings) -> list[int]:
    if settings.ignore_eos:
        return tokens
    stop = eos_ids(model)
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[:index]
    return tokens


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
    input_ids = input_ids.to(model.device)
    output = _run_generate(model, {"input_ids": input_ids, "cache": cache}, past_length + input_ids.shape[-1],
                           max_new_tokens, settings)
    return _until_eos(model, output[0, input_ids.shape[-1]:].tolist(), settings)


@torch.no_grad()
def generate_from_embeds(model: LoadedModel, embeds: torch.Tensor, max_new_tokens: int,
                         settings: GenerationSettings = GenerationSettings()) -> list[int]:
    """``model.generate`` from ``inputs_embeds`` ``[1, n, hidden]``; the new token ids, cut at the first EOS."""
    embeds = embeds.to(model.device, model.dtype)
    output = _run_generate(model, {"inputs_embeds": embeds}, embeds.shape[1], max_new_tokens, settings)
    # decoder-only models return only the new tokens when given inputs_embeds
    return _until_eos(model, output[0].tolist(), settings)


def decode(model: LoadedModel, tokens: list[int]) -> str:
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
