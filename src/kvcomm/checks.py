"""Pair verification: all layers shared must reproduce the single-model run on the concatenated tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcomm.generation import generate
from kvcomm.message import encode_context, receiver_cache
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example

PROBE = Example.qa(context="Bob lives in Ollerby. Alice's code is 4821.", question="What is Alice's code?",
                   answers=["4821"], id="probe", max_new_tokens=8, answer_prefix="Alice's code is")


@dataclass
class EquivalenceResult:
    """Receiver logits over the query with all layers shared vs. one model reading ``[context ; query]``."""

    max_logit_diff: float
    kvcomm_tokens: list[int]
    single_tokens: list[int]
    no_kv_tokens: list[int]

    @property
    def tokens_equal(self) -> bool:
        return self.kvcomm_tokens == self.single_tokens

    @property
    def kv_matters(self) -> bool:
        return self.no_kv_tokens != self.kvcomm_tokens


@torch.no_grad()
def equivalence(sender: LoadedModel, receiver: LoadedModel, example: Example = PROBE,
                max_new_tokens: int = 8) -> EquivalenceResult:
    check_compatible(sender.fingerprint, receiver.fingerprint)
    context_ids = chat_ids(receiver.tokenizer, example.messages["sender"])
    query_ids = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
    all_layers = range(receiver.num_layers)
    context_length = context_ids.shape[-1]
    mask = torch.ones(1, context_length + query_ids.shape[-1], dtype=torch.long, device=receiver.device)

    message = encode_context(sender, context_ids, all_layers)
    shared = receiver.model(input_ids=query_ids.to(receiver.device), attention_mask=mask,
                            cache=receiver_cache(message, receiver)).logits
    joined_ids = torch.cat([context_ids, query_ids], dim=-1).to(receiver.device)
    single = receiver.model(input_ids=joined_ids).logits[:, context_length:]
    diff = (shared.float() - single.float()).abs().max().item()

    kvcomm_tokens = generate(receiver, query_ids, max_new_tokens, cache=receiver_cache(message, receiver),
                             past_length=context_length)
    single_tokens = generate(receiver, joined_ids, max_new_tokens)
    no_kv = encode_context(sender, context_ids, [], sink_tokens=1)
    no_kv_tokens = generate(receiver, query_ids, max_new_tokens, cache=receiver_cache(no_kv, receiver),
                            past_length=context_length)
    return EquivalenceResult(diff, kvcomm_tokens, single_tokens, no_kv_tokens)
