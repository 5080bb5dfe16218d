"""AC — activation communication (Ramesh & Li 2025), the paper's activation-grafting baseline (``KVCOMM.md`` §4).

The sender runs one prefill over its sender prompt; ``a`` is the last token's vector of ``hidden_states[k]`` (index 0
= embeddings, so ``a`` is the *input* of sender layer ``k``). In the receiver's prefill only, just before decoder layer
``j``, the last prompt token's hidden vector ``b`` becomes ``a`` (``replace``), ``a + b`` (``sum``) or ``(a + b)/2``
(``mean``); decode steps are plain forward passes, so the change reaches them only through the cache.

Defaults: ``k = round(0.8·L_sender)`` and ``j = round(0.8·L_receiver)``, clipped to ``[0, L-1]`` (the reference
default 26/26 is valid only for 28- and 32-layer models and the paper never states per-model values; 0.8·L gives
22 for 28 layers and 26 for 32). The models need not share a tokenizer (each reads its own prompt) nor KV shapes, but
their hidden sizes must agree unless a ``mapping`` callable turns a sender vector ``[1, d_sender]`` into a receiver
vector ``[1, d_receiver]`` (the reference code's "trailing min(d) dimensions" rule is not reproduced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kvcomm import _hf
from kvcomm.costs import CostRecord, stopwatch
from kvcomm.errors import IncompatibleModelsError, KVCommError, LayerSelectionError
from kvcomm.generation import GenerationSettings, decode, generate
from kvcomm.message import check_window
from kvcomm.methods.base import MethodOutput, answer_flops, max_new_tokens, prefill_flops, send_then_receive
from kvcomm.models import LoadedModel
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example

COMBINES = ("replace", "sum", "mean")
DEFAULT_DEPTH = 0.8


class ACError(KVCommError):
    """An invalid AC setting (combine rule, activation shape)."""


class HiddenSizeMismatchError(ACError, IncompatibleModelsError):
    """Sender and receiver hidden sizes differ and no mapping was given."""


def default_layer(num_layers: int) -> int:
    """``round(0.8·L)`` clipped to ``[0, L-1]``: the layer AC uses when none is given."""
    return min(max(round(DEFAULT_DEPTH * num_layers), 0), num_layers - 1)


def _check_layer(value: int, num_layers: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_layers:
        raise LayerSelectionError(f"{what} must be an integer in 0..{num_layers - 1}, got {value!r}")
    return value


@dataclass(frozen=True)
class ACPacket:
    """What crosses: the sender's activation ``vector`` ``[1, d_sender]`` and its prompt length (for costs)."""

    vector: torch.Tensor
    sender_prompt_tokens: int

    @property
    def nbytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


@dataclass
class AC:
    """Activation communication: graft the sender's last-token activation into the receiver's prefill."""

    sender: LoadedModel
    receiver: LoadedModel
    layer_k: int | None = None
    layer_j: int | None = None
    combine: str = "replace"
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    mapping: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "ac"

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ACError(f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.layer_k is None:
            self.layer_k = default_layer(self.sender.num_layers)
        if self.layer_j is None:
            self.layer_j = default_layer(self.receiver.num_layers)
        self.layer_k = _check_layer(self.layer_k, self.sender.num_layers, "layer_k (sender)")
        self.layer_j = _check_layer(self.layer_j, self.receiver.num_layers, "layer_j (receiver)")
        sender_size, receiver_size = self.sender.fingerprint.hidden_size, self.receiver.fingerprint.hidden_size
        if sender_size != receiver_size and self.mapping is None:
            raise HiddenSizeMismatchError(
                f"AC needs equal hidden sizes: sender {self.sender.name!r} has {sender_size}, receiver "
                f"{self.receiver.name!r} has {receiver_size}; pass mapping= to translate sender vectors"
            )

    def send(self, example: Example) -> tuple[ACPacket, float]:
        """Sender side: one prefill over the sender prompt; returns the packet and the seconds it took."""
        prompt_ids = chat_ids(self.sender.tokenizer, example.messages["sender"])
        check_window(self.sender, int(prompt_ids.shape[-1]), "the sender's prompt")
        with stopwatch(self.sender.device) as elapsed:
            hidden = _hf.hidden_states_at(self.sender.model, prompt_ids, self.layer_k)  # [1, n, d_sender]
            vector = hidden[:, -1, :].clone()
        return ACPacket(vector, int(prompt_ids.shape[-1])), elapsed[0]

    def receiver_vector(self, packet: ACPacket) -> torch.Tensor:
        """``a`` in receiver space: ``[1, d_receiver]`` at the receiver's device and dtype (after ``mapping``)."""
        vector = packet.vector if self.mapping is None else self.mapping(packet.vector)
        expected = (1, self.receiver.fingerprint.hidden_size)
        if tuple(vector.shape) != expected:
            raise ACError(f"the activation has shape {tuple(vector.shape)}, the receiver needs {expected}")
        return vector.to(self.receiver.device, self.receiver.dtype)

    @contextlib.contextmanager
    def injected(self, packet: ACPacket) -> Iterator[None]:
        """Inside the block, receiver prefills graft ``packet`` before layer ``layer_j`` (decode steps are plain)."""
        a = self.receiver_vector(packet)
        rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "replace": lambda b: a.expand_as(b),
            "sum": lambda b: a + b,
            "mean": lambda b: (a + b) / 2,
        }
        with _hf.last_token_injection(self.receiver.model, self.layer_j, rules[self.combine]):
            yield

    def receive(self, packet: ACPacket, example: Example) -> MethodOutput:
        """Receiver side: answer the receiver prompt through ``generate()`` with the activation grafted in."""
        query_ids = chat_ids(self.receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
        budget = max_new_tokens(example, self.settings)
        check_window(self.receiver, int(query_ids.shape[-1]) + budget, "the receiver prompt")
        with stopwatch(self.receiver.device) as elapsed, self.injected(packet):
            tokens = generate(self.receiver, query_ids, budget, self.settings)
        # kv_bytes holds the bytes of the tensor sent (one activation vector), so costs stay comparable with KVComm
        query_tokens = int(query_ids.shape[-1])
        costs = CostRecord(sender_prefill_tokens=packet.sender_prompt_tokens,
                           receiver_prefill_tokens=query_tokens, generated_tokens=len(tokens),
                           kv_bytes=packet.nbytes, receiver_seconds=elapsed[0],
                           sender_flops=prefill_flops(self.sender, packet.sender_prompt_tokens),
                           receiver_flops=answer_flops(self.receiver, query_tokens, len(tokens), budget, self.settings))
        return MethodOutput(answer=decode(self.receiver, tokens), costs=costs)

    def answer(self, example: Example) -> MethodOutput:
        return send_then_receive(self, example)
