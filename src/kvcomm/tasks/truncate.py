"""Middle truncation of long contexts (spec §6, ``--max_input_length``, tasks with ``truncate_input=True``).

The reference keeps the first and last ``(max − |x_B|)/2`` tokens of the sender prompt when ``|x_A| + |x_B|`` exceeds
the limit. Here only the *context* is cut, so the instruction and chat scaffolding stay intact: when the chat-templated
sender prompt plus the receiver prompt (with its answer prefix) — or the Skyline prompt, if longer — exceed
``max_input_tokens``, the context keeps its first and last halves of the allowed number of context tokens, decoded back
to text and joined directly (as LongBench does), and all four messages are rebuilt with the item's template. Because
decoded text can re-tokenise a little differently, the cut is tightened until the prompts fit.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from kvcomm.errors import PromptError
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 16


def prompt_tokens(example: Example, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the item needs: the larger of |sender| + |receiver| and |Skyline| (chat-templated, with prefix)."""
    sender = chat_ids(tokenizer, example.messages["sender"]).shape[-1]
    receiver = chat_ids(tokenizer, example.messages["receiver"], example.answer_prefix).shape[-1]
    skyline = chat_ids(tokenizer, example.messages["skyline"], example.answer_prefix).shape[-1]
    return max(sender + receiver, skyline)


def cut_middle(text: str, tokenizer: PreTrainedTokenizerBase, keep: int) -> str:
    """``text`` reduced to its first ``ceil(keep/2)`` and last ``floor(keep/2)`` tokens, decoded and joined."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if keep >= len(ids):
        return text
    if keep <= 0:
        raise PromptError(f"cannot keep {keep} tokens of a context")
    head, tail = keep - keep // 2, keep // 2
    kept = tokenizer.decode(ids[:head], skip_special_tokens=True)
    if tail:
        kept += tokenizer.decode(ids[len(ids) - tail:], skip_special_tokens=True)
    return kept


def truncate_example(example: Example, tokenizer: PreTrainedTokenizerBase, max_input_tokens: int) -> Example:
    """``example`` unchanged when its prompts fit ``max_input_tokens`` (see :func:`prompt_tokens`), else a copy whose
    context lost its middle, with rebuilt messages and ``extra["truncated"] = True`` plus
    ``extra["context_tokens"] = (before, kept)``. Raises :class:`PromptError` when even an empty context cannot fit."""
    if max_input_tokens <= 0:
        raise PromptError(f"max_input_tokens must be positive, got {max_input_tokens}")
    total = prompt_tokens(example, tokenizer)
    if total <= max_input_tokens:
        return example
    before = len(tokenizer(example.context, add_special_tokens=False).input_ids)
    keep = before - (total - max_input_tokens)
    for _ in range(MAX_ATTEMPTS):
        if keep <= 0:
            raise PromptError(f"item {example.id!r}: the prompts without their context already need about "
                              f"{total - before} tokens, more than max_input_tokens={max_input_tokens}")
        candidate = example.with_context(cut_middle(example.context, tokenizer, keep), truncated=True,
                                         context_tokens=(before, keep), **_cut_parts(example, tokenizer, keep, before))
        total = prompt_tokens(candidate, tokenizer)
        if total <= max_input_tokens:
            logger.debug("item %s: context cut from %d to %d tokens", example.id, before, keep)
            return candidate
        keep -= total - max_input_tokens
    raise PromptError(f"item {example.id!r}: could not cut the context to fit max_input_tokens={max_input_tokens}")


def _cut_parts(example: Example, tokenizer: PreTrainedTokenizerBase, keep: int, before: int) -> dict[str, list[str]]:
    """Several-sender items (``extra["contexts"]``): every part cut in the middle to the same kept fraction
    ``keep / before`` as the whole context (at least one token each), so that the senders together send about as many
    tokens as the truncated single context."""
    parts = example.extra.get("contexts")
    if not parts:
        return {}
    return {"contexts": [cut_middle(part, tokenizer, max(1, keep * len(tokenizer(part, add_special_tokens=False)
                                                                         .input_ids) // before)) for part in parts]}


def fit_to_window(examples: list[Example], tokenizer: PreTrainedTokenizerBase, window: int,
                  max_input_tokens: int | None = None, allowed: bool = True) -> list[Example]:
    """Items whose prompts fit: each context is cut in the middle to ``min(max_input_tokens, window − max new
    tokens)`` prompt tokens when ``allowed`` (the task's ``truncate`` flag, spec §6); unchanged otherwise, so that
    too-long items of tasks that must not be truncated fail with a clear window error instead."""
    if not allowed:
        return list(examples)
    fitted = []
    for example in examples:
        limit = window - example.max_new_tokens
        if max_input_tokens is not None:
            limit = min(limit, max_input_tokens)
        fitted.append(truncate_example(example, tokenizer, limit))
    return fitted
