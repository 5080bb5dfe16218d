"""Chains A → B → C over KV, and the in-process chain method (the reference the services must equal).

What a chain means: the first agent prefills its prompt and sends the KV of the selected layers (a KVComm message).
Each following agent *extends* the message: it prefills its own prompt while attending to the incoming message
exactly as a receiver would (selected layers see the incoming KV, the others only its sink; positions continue at
``|C_in|``), then forwards ``[K_in ; K_own]`` at the selected layers (context length ``|C_in| + |C_own|``) and the
incoming sink elsewhere. The last agent answers with the usual KVComm receiver step. A one-hop chain is KVComm; the
selected layers are fixed by the first agent for the whole chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvcomm import _hf
from kvcomm.costs import stopwatch
from kvcomm.errors import LayerSelectionError
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, check_window, encode_context, receiver_cache, validate_layers
from kvcomm.methods.base import MethodOutput, send_then_receive
from kvcomm.methods.kvcomm import KVComm
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.multi import sender_prompts
from kvcomm.prompts import chat_ids
from kvcomm.quant import KVQuantConfig, quantize_message
from kvcomm.tasks.base import Example


@torch.no_grad()
def extend_message(model: LoadedModel, incoming: KVMessage, prompt_ids: torch.Tensor) -> KVMessage:
    """``model`` prefills ``prompt_ids`` ``[1, n]`` attending to ``incoming``; returns ``incoming`` extended by its KV.

    The result selects ``incoming.layers``: ``[1, kv_heads, |C_in| + n, head_dim]`` there (incoming KV first, then
    the new tokens at positions ``|C_in| .. |C_in| + n - 1``), and ``incoming``'s sink at the other layers.
    """
    check_compatible(incoming.fingerprint, model.fingerprint)
    added = int(prompt_ids.shape[-1])
    if added == 0:
        raise LayerSelectionError("extend_message needs a non-empty prompt")
    total = incoming.context_length + added
    check_window(model, total, "the extended context")
    mask = torch.ones(1, total, dtype=torch.long, device=model.device)
    output = model.model(input_ids=prompt_ids.to(model.device), attention_mask=mask,
                         cache=receiver_cache(incoming, model), use_cache=True, logits_to_keep=1)
    keys, values = {}, {}
    for layer in incoming.layers:
        keys[layer], values[layer] = _hf.cache_layer_kv(output.cache, layer)
    return KVMessage(incoming.layers, keys, values, dict(incoming.sink_keys), dict(incoming.sink_values), total,
                     incoming.sink_tokens, model.fingerprint)


def compress(message: KVMessage, bits: int | None, group_size: int = 32) -> KVMessage:
    """``message`` quantized with ``bits`` for keys and values (as ``kvcomm run --method qkvcomm --bits``), or as is."""
    if bits is None:
        return message
    return quantize_message(message, KVQuantConfig(bits, bits, group_size))


@dataclass
class ChainKVComm:
    """In-process chain ``senders[0] → senders[1] → … → receiver``; sender ``i`` reads part ``i`` of the context.

    Items carry ``extra["contexts"]`` with one part per sender (see :func:`kvcomm.multi.sender_prompts`). ``bits``
    quantizes every forwarded message (each hop re-quantizes what it forwards).
    """

    senders: list[LoadedModel]
    receiver: LoadedModel
    layers: tuple[int, ...]
    sink_tokens: int = 1
    bits: int | None = None
    group_size: int = 32
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "kvcomm_chain"

    def __post_init__(self) -> None:
        self.senders = list(self.senders)
        if not self.senders:
            raise LayerSelectionError("a chain needs at least one sender")
        for sender in self.senders:
            check_compatible(sender.fingerprint, self.receiver.fingerprint)
        self.layers = validate_layers(tuple(self.layers), self.receiver.num_layers)
        self._receiver_side = KVComm(self.senders[0], self.receiver, self.layers, self.sink_tokens, self.settings,
                                     name=self.name)

    def send(self, example: Example) -> tuple[KVMessage, float]:
        """Every hop in turn; returns the message the receiver gets and the senders' total seconds."""
        prompts = sender_prompts(example)
        with stopwatch(self.senders[0].device) as elapsed:
            message = self.hops(prompts)
        return message, elapsed[0]

    def hops(self, prompts: Sequence[str]) -> KVMessage:
        if len(prompts) != len(self.senders):
            raise LayerSelectionError(f"{len(prompts)} context parts for a chain of {len(self.senders)} senders")
        tokenizer = self.receiver.tokenizer
        message = encode_context(self.senders[0], chat_ids(tokenizer, prompts[0]), self.layers, self.sink_tokens)
        message = compress(message, self.bits, self.group_size)
        for sender, prompt in zip(self.senders[1:], prompts[1:]):
            message = compress(extend_message(sender, message, chat_ids(tokenizer, prompt)), self.bits, self.group_size)
        return message

    def receive(self, message: KVMessage, example: Example) -> MethodOutput:
        return self._receiver_side.receive(message, example)

    def answer(self, example: Example) -> MethodOutput:
        return send_then_receive(self, example)
