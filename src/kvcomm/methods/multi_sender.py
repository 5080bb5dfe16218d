"""KVComm with several senders (paper App. J): each sender reads one part of the context.

See :mod:`kvcomm.multi` for the layout: at selected layers the receiver attends to ``[K_1 ; … ; K_r]`` (each
sender's KV at its own RoPE positions ``0 .. |C_i|-1``), at the other layers to the first sender's sink only, and the
receiver's positions start at ``Σ|C_i|``. All senders use the receiver's tokenizer and the same selected layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcomm.costs import stopwatch
from kvcomm.errors import LayerSelectionError
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, validate_layers
from kvcomm.methods.base import MethodOutput, prefill_flops
from kvcomm.methods.kvcomm import KVComm
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.multi import encode_senders, merge_messages
from kvcomm.tasks.base import Example


@dataclass
class MultiSenderKVComm:
    """Selective KV sharing from ``len(senders)`` senders; items carry ``extra["contexts"]`` (one part per sender)."""

    senders: list[LoadedModel]
    receiver: LoadedModel
    layers: tuple[int, ...]
    sink_tokens: int = 1
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "kvcomm_multi"

    def __post_init__(self) -> None:
        self.senders = list(self.senders)
        if not self.senders:
            raise LayerSelectionError("MultiSenderKVComm needs at least one sender")
        for sender in self.senders:
            check_compatible(sender.fingerprint, self.receiver.fingerprint)
        self.layers = validate_layers(tuple(self.layers), self.receiver.num_layers)
        # the receiver side is exactly KVComm's, given the merged message
        self._receiver_side = KVComm(self.senders[0], self.receiver, self.layers, self.sink_tokens, self.settings,
                                     name=self.name)

    def _send_all(self, example: Example) -> tuple[list[KVMessage], KVMessage, float]:
        with stopwatch(self.senders[0].device) as elapsed:
            messages = encode_senders(self.senders, self.receiver.tokenizer, example, self.layers, self.sink_tokens)
            merged = merge_messages(messages)
        return messages, merged, elapsed[0]

    def send(self, example: Example) -> tuple[KVMessage, float]:
        """All senders prefill their part; returns the merged message and the senders' total seconds."""
        _, merged, seconds = self._send_all(example)
        return merged, seconds

    def receive(self, message: KVMessage, example: Example) -> MethodOutput:
        """Receiver side: answer the receiver prompt attending to the merged message (as KVComm)."""
        return self._receiver_side.receive(message, example)

    def answer(self, example: Example) -> MethodOutput:
        """Send, then receive; the sender FLOPs are the sum of every sender's own prefill."""
        messages, merged, seconds = self._send_all(example)
        output = self.receive(merged, example)
        output.costs.sender_seconds = seconds
        output.costs.sender_flops = sum(prefill_flops(sender, message.context_length)
                                        for sender, message in zip(self.senders, messages))
        return output
