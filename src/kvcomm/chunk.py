"""The paper's *contiguous chunk* baseline: share one block of adjacent layers, the block chosen by how well the
receiver then predicts the gold answers of calibration items (the paper picks it on the test set; we never do)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcomm.errors import LayerSelectionError, TaskError
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.models import LoadedModel
from kvcomm.prompts import chat_ids
from kvcomm.tasks import Example


@dataclass(frozen=True)
class ChunkChoice:
    """The chosen block ``layers`` and the mean gold log-likelihood per token for every start layer (``scores``)."""

    layers: tuple[int, ...]
    scores: dict[int, float]


@torch.no_grad()
def gold_log_likelihood(receiver: LoadedModel, message: KVMessage, example: Example) -> float:
    """Mean log-probability per token of ``example``'s first gold answer, teacher-forced after the receiver prompt
    (and answer prefix) while the receiver attends to ``message``."""
    if not example.answers:
        raise TaskError(f"item {example.id!r} has no gold answer to score a layer chunk with")
    query = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)  # [1, Q]
    gold = receiver.tokenizer(" " + example.answers[0], add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([query, gold], dim=-1).to(receiver.device)  # [1, Q + G]
    mask = torch.ones(1, message.context_length + ids.shape[-1], dtype=torch.long, device=receiver.device)
    logits = receiver.model(input_ids=ids, attention_mask=mask, cache=receiver_cache(message, receiver)).logits
    log_probs = logits[0, query.shape[-1] - 1: -1].float().log_softmax(-1)  # [G, vocab]: the positions predicting gold
    return float(log_probs.gather(-1, gold[0].to(log_probs.device).unsqueeze(-1)).mean())


def best_chunk(sender: LoadedModel, receiver: LoadedModel, items: Sequence[Example], size: int,
               sink_tokens: int = 1) -> ChunkChoice:
    """The block of ``size`` adjacent layers under which the receiver gives the gold answers of ``items`` the highest
    mean log-likelihood (lowest start on ties). One sender prefill per item with every layer, then one
    teacher-forced receiver forward per candidate block and item."""
    if not items:
        raise LayerSelectionError("the contiguous chunk needs at least one calibration item")
    if not 1 <= size <= min(sender.num_layers, receiver.num_layers):
        raise LayerSelectionError(f"chunk size must be in [1, {receiver.num_layers}], got {size}")
    every_layer = tuple(range(sender.num_layers))
    messages = [encode_context(sender, chat_ids(sender.tokenizer, example.messages["sender"]), every_layer,
                               sink_tokens) for example in items]
    scores: dict[int, float] = {}
    for start in range(receiver.num_layers - size + 1):
        block = tuple(range(start, start + size))
        scores[start] = statistics.fmean(gold_log_likelihood(receiver, message.restrict(block, sink_tokens), example)
                                         for message, example in zip(messages, items))
    start = max(scores, key=lambda s: (scores[s], -s))
    return ChunkChoice(tuple(range(start, start + size)), scores)
