"""KVComm: the sender shares the KV of selected layers; the receiver attends to it while answering."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcomm.costs import stopwatch
from kvcomm.generation import GenerationSettings, decode, generate
from kvcomm.message import KVMessage, check_window, encode_context, receiver_cache, validate_layers
from kvcomm.methods.base import MethodOutput, kv_costs, max_new_tokens, send_then_receive
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example


@dataclass
class KVComm:
    """Selective KV sharing (arXiv 2510.03346).

    ``layers`` are the shared layers (0-based). Non-selected layers keep ``sink_tokens`` of the sender's first tokens
    (default 1: the attention sink, as the reference code does) or none (``sink_tokens=0``, the paper's App. K).
    Receiver positions start at ``|C|`` in every layer; attention among receiver tokens is causal everywhere.
    """

    sender: LoadedModel
    receiver: LoadedModel
    layers: tuple[int, ...]
    sink_tokens: int = 1
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "kvcomm"

    def __post_init__(self) -> None:
        check_compatible(self.sender.fingerprint, self.receiver.fingerprint)  # refuse before any compute
        self.layers = validate_layers(tuple(self.layers), self.receiver.num_layers)

    def send(self, example: Example) -> tuple[KVMessage, float]:
        """Sender side: prefill the sender message once; returns the message and the seconds it took."""
        context_ids = chat_ids(self.receiver.tokenizer, example.messages["sender"])  # receiver's tokenizer for both
        with stopwatch(self.sender.device) as elapsed:
            message = encode_context(self.sender, context_ids, self.layers, self.sink_tokens)
        return message, elapsed[0]

    def receive(self, message: KVMessage, example: Example) -> MethodOutput:
        """Receiver side: answer the receiver message while attending to ``message``."""
        query_ids = chat_ids(self.receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
        budget = max_new_tokens(example, self.settings)
        check_window(self.receiver, message.context_length + query_ids.shape[-1] + budget, "context + question")
        with stopwatch(self.receiver.device) as elapsed:
            cache = receiver_cache(message, self.receiver)
            tokens = generate(self.receiver, query_ids, budget, self.settings, cache, message.context_length)
        costs = kv_costs(self.sender, self.receiver, message, int(query_ids.shape[-1]), tokens, budget, self.settings,
                         elapsed[0])
        return MethodOutput(answer=decode(self.receiver, tokens), costs=costs, layers=message.layers)

    def answer(self, example: Example) -> MethodOutput:
        return send_then_receive(self, example)
