"""Several senders (paper App. J): per-sender prompts, merging their KV messages, and the importance score.

Layout: sender ``i`` prefills its own prompt (the item's sender template with its part of the context), so its KV
keeps its own RoPE positions ``0 .. |C_i|-1`` and starts with its own BOS/chat header, as in the reference code (no
re-rotation). At selected layers the receiver sees ``[K_1 ; K_2 ; … ; K_r ; K_receiver]``; at the other layers only
the first sender's sink token(s). Receiver positions start at ``Σ|C_i|`` at every layer.

Importance (App. J, "the same score with the inner sum over all senders' context tokens"): with all layers shared,
the mean over heads and receiver prompt positions of the attention mass on every sender column except the first
sender's sink (column 0), causal softmax — the single-sender score of :mod:`kvcomm.selection` on the merged message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from kvcomm import _hf
from kvcomm.errors import LayerSelectionError, PromptError
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.prompts import chat_ids
from kvcomm.quant import as_tensor
from kvcomm.selection import LayerScores, combine
from kvcomm.tasks.base import Example


def sender_prompts(example: Example) -> list[str]:
    """One sender message per part of ``example.extra["contexts"]``.

    ``example.extra["sender_messages"]`` (one string per part) is used when present; otherwise each message is the
    item's sender message with its context replaced by the part (the sender template ends with the context).
    """
    parts = example.extra.get("contexts")
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise PromptError(f"item {example.id!r}: extra['contexts'] must be a non-empty list of non-empty strings")
    explicit = example.extra.get("sender_messages")
    if explicit is not None:
        if len(explicit) != len(parts):
            raise PromptError(f"item {example.id!r}: {len(explicit)} sender messages for {len(parts)} contexts")
        return list(explicit)
    base = example.messages["sender"]
    if not base.endswith(example.context):
        raise PromptError(f"item {example.id!r}: the sender message does not end with the context; "
                          "give extra['sender_messages'] explicitly")
    prefix = base[: len(base) - len(example.context)]
    return [prefix + part for part in parts]


def merge_messages(messages: Sequence[KVMessage]) -> KVMessage:
    """One message holding ``[K_1 ; … ; K_r]`` along the sequence axis at every selected layer.

    Every message must select the same layers; the sink of the merged message is the first message's. Keys/values
    ``[1, kv_heads, Σ|C_i|, head_dim]`` are dequantized and put on the first message's device and dtype;
    ``context_length = Σ|C_i|``. The first message's fingerprint is kept (all must be KV-compatible with it).
    """
    if not messages:
        raise LayerSelectionError("merge_messages needs at least one message")
    first = messages[0]
    for other in messages[1:]:
        if other.layers != first.layers:
            raise LayerSelectionError(f"senders selected different layers: {first.layers} vs {other.layers}")
        check_compatible(other.fingerprint, first.fingerprint)

    keys, values = {}, {}
    for layer in first.layers:
        reference = as_tensor(first.keys[layer])
        keys[layer] = torch.cat([as_tensor(m.keys[layer]).to(reference.device, reference.dtype)
                                 for m in messages], dim=-2)
        values[layer] = torch.cat([as_tensor(m.values[layer]).to(reference.device, reference.dtype)
                                   for m in messages], dim=-2)
    return KVMessage(first.layers, keys, values, dict(first.sink_keys), dict(first.sink_values),
                     sum(m.context_length for m in messages), first.sink_tokens, first.fingerprint)


def encode_senders(senders: Sequence[LoadedModel], tokenizer: PreTrainedTokenizerBase, example: Example,
                   layers: Sequence[int], sink_tokens: int = 1) -> list[KVMessage]:
    """Each sender prefills its own prompt (tokenised with ``tokenizer``); only the first keeps sink tokens."""
    prompts = sender_prompts(example)
    if len(prompts) != len(senders):
        raise PromptError(f"item {example.id!r} has {len(prompts)} context parts for {len(senders)} senders")
    return [encode_context(sender, chat_ids(tokenizer, prompt), layers, sink_tokens if index == 0 else 0)
            for index, (sender, prompt) in enumerate(zip(senders, prompts))]


@torch.no_grad()
def attention_importance_multi(senders: Sequence[LoadedModel], receiver: LoadedModel,
                               example: Example) -> list[float]:
    """Raw per-layer mass (in [0, 1]) of the receiver prompt on all senders' columns but the first sink."""
    for sender in senders:
        check_compatible(sender.fingerprint, receiver.fingerprint)
    query_ids = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
    messages = encode_senders(senders, receiver.tokenizer, example, range(receiver.num_layers), sink_tokens=0)
    merged = merge_messages(messages)
    mask = torch.ones(1, merged.context_length + query_ids.shape[-1], dtype=torch.long, device=receiver.device)
    with _hf.capture_context_attention(exclude_sink=True) as capture:
        receiver.model(input_ids=query_ids.to(receiver.device), attention_mask=mask,
                       cache=receiver_cache(merged, receiver))
    if sorted(capture.mass) != list(range(receiver.num_layers)):
        raise RuntimeError(f"attention capture saw layers {sorted(capture.mass)}, expected all {receiver.num_layers}")
    return [capture.mass[layer][0] for layer in range(receiver.num_layers)]


def calibrate_multi(senders: Sequence[LoadedModel], receiver: LoadedModel, examples: Sequence[Example],
                    alpha: float = 1.0, mu: float = 0.5, sigma: float = 10.0) -> LayerScores:
    """Several-sender layer scores averaged over calibration ``examples`` (then normalised and mixed with the prior)."""
    if not examples:
        raise LayerSelectionError("calibration needs at least one item")
    per_item = [attention_importance_multi(senders, receiver, example) for example in examples]
    importance = [sum(values) / len(values) for values in zip(*per_item)]
    return combine(importance, alpha, mu, sigma, [example.id for example in examples])
