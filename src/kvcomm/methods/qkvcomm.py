"""Q-KVComm (arXiv 2512.17914) done for real: the selected layers' KV is quantized layer by layer, serialised in
wire format v1 and injected into the receiver; a short key-facts text may travel beside it; moment matching may
adapt sender statistics to a different receiver. Every part can be switched off for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcomm import wire
from kvcomm.bitalloc import BitAllocation, allocate_bits, distortion_profile, output_sensitivity, rank_rule_bits
from kvcomm.costs import stopwatch
from kvcomm.facts import FactsConfig, extract_facts, token_counter
from kvcomm.generation import GenerationSettings, decode, generate
from kvcomm.message import KVMessage, check_window, encode_context, map_depth, receiver_cache, validate_layers
from kvcomm.methods.base import MethodOutput, kv_costs, max_new_tokens, send_then_receive
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.prompts import chat_ids, with_side_text
from kvcomm.quant import KVQuantConfig, quantize_message
from kvcomm.tasks.base import Example
from kvcomm.translate import MomentMatcher


@dataclass(frozen=True)
class QKVPacket:
    """What crosses the wire: the encoded KV message and the key-facts text (``""`` when facts are off)."""

    payload: bytes
    facts: str

    @property
    def nbytes(self) -> int:
        return len(self.payload) + len(self.facts.encode("utf-8"))


@dataclass
class QKVComm:
    """KVComm with quantized, serialised KV and an optional key-facts side channel.

    ``quant=None`` sends the KV at the model's dtype (still through the wire format); ``allocation`` gives per-layer
    key/value widths (adaptive), otherwise ``quant.key_bits``/``quant.value_bits`` apply to every layer (uniform).
    ``facts=None`` sends no text. ``matcher`` (a fitted :class:`~kvcomm.translate.MomentMatcher`) adapts the sender's
    KV statistics to the receiver before quantization. ``map_depth`` lets a receiver of another depth take the KV:
    the receiver re-indexes the decoded message by relative depth (:func:`kvcomm.message.map_depth`); ``layers`` are
    then sender layer indices. The receiver prompt never carries the context text.
    """

    sender: LoadedModel
    receiver: LoadedModel
    layers: tuple[int, ...]
    quant: KVQuantConfig | None = field(default_factory=KVQuantConfig)
    allocation: BitAllocation | None = None
    facts: FactsConfig | None = None
    matcher: MomentMatcher | None = None
    sink_tokens: int = 1
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "qkvcomm"
    map_depth: bool = False

    def __post_init__(self) -> None:
        check_compatible(self.sender.fingerprint, self.receiver.fingerprint, allow_depth=self.map_depth)
        self.layers = validate_layers(tuple(self.layers), self.sender.num_layers)
        if self.allocation is not None and self.quant is None:
            raise ValueError("a bit allocation needs a quantization config (quant)")

    def compress(self, message: KVMessage) -> KVMessage:
        """Moment matching (if any), then quantization (if any)."""
        if self.matcher is not None:
            message = self.matcher.apply(message)
        if self.quant is None:
            return message
        key_bits = self.allocation.key_bits if self.allocation else None
        value_bits = self.allocation.value_bits if self.allocation else None
        return quantize_message(message, self.quant, key_bits=key_bits, value_bits=value_bits)

    def send(self, example: Example) -> tuple[QKVPacket, float]:
        """Sender side: prefill, compress, serialise, extract facts. Returns the packet and the seconds it took."""
        context_ids = chat_ids(self.receiver.tokenizer, example.messages["sender"])
        with stopwatch(self.sender.device) as elapsed:
            message = encode_context(self.sender, context_ids, self.layers, self.sink_tokens)
            payload = wire.encode(self.compress(message))
            facts = ""
            if self.facts is not None:
                facts = extract_facts(example.context, self.facts, token_counter(self.receiver.tokenizer)).text
        return QKVPacket(payload, facts), elapsed[0]

    def receive(self, packet: QKVPacket, example: Example) -> MethodOutput:
        """Receiver side: decode (checksummed), dequantize into the cache, answer with the facts in the prompt."""
        query = with_side_text(example.messages["receiver"], packet.facts)
        query_ids = chat_ids(self.receiver.tokenizer, query, example.answer_prefix)
        budget = max_new_tokens(example, self.settings)
        with stopwatch(self.receiver.device) as elapsed:
            message = wire.decode(packet.payload)
            check_window(self.receiver, message.context_length + query_ids.shape[-1] + budget, "context + question")
            mapped = map_depth(message, self.receiver.fingerprint) if self.map_depth else message
            cache = receiver_cache(mapped, self.receiver)
            tokens = generate(self.receiver, query_ids, budget, self.settings, cache, message.context_length)
        facts_tokens = (len(self.receiver.tokenizer(packet.facts, add_special_tokens=False).input_ids)
                        if packet.facts else 0)
        costs = kv_costs(self.sender, self.receiver, mapped, int(query_ids.shape[-1]), tokens, budget, self.settings,
                         elapsed[0], kv_bytes=len(packet.payload), text_bytes=len(packet.facts.encode("utf-8")),
                         text_tokens=facts_tokens)
        return MethodOutput(answer=decode(self.receiver, tokens), costs=costs, layers=message.layers)

    def answer(self, example: Example) -> MethodOutput:
        return send_then_receive(self, example)


def _next_token_kl(receiver: LoadedModel, query_ids: torch.Tensor, reference: torch.Tensor, cross_depth: bool = False):
    """A score for :func:`output_sensitivity`: KL(reference ‖ perturbed) of the receiver's next-token distribution."""

    def score(message: KVMessage) -> float:
        mask = torch.ones(1, message.context_length + query_ids.shape[-1], dtype=torch.long, device=receiver.device)
        cache = receiver_cache(message, receiver, cross_depth=cross_depth)
        with torch.no_grad():
            logits = receiver.model(input_ids=query_ids, attention_mask=mask, cache=cache,
                                    logits_to_keep=1).logits[0, -1].float()
        return float(torch.sum(reference.exp() * (reference - logits.log_softmax(-1))))

    return score


@torch.no_grad()
def profile_allocation(sender: LoadedModel, receiver: LoadedModel, examples: list[Example], layers: tuple[int, ...],
                       target_bits: float, quant: KVQuantConfig | None = None, measure: str = "relative",
                       keys_at_least_values: bool = False, sink_tokens: int = 1, rule: str = "solver",
                       map_depth: bool = False) -> BitAllocation:
    """Per-layer widths from sensitivity profiling on calibration ``examples`` (never test items).

    ``measure``: ``"relative"`` — measured relative round-trip error at every width (keys and values apart);
    ``"kl"`` — the receiver's next-token KL when one layer alone is quantized at 2 bits (scalar per layer, scaled
    by 4× per removed bit). ``rule="solver"`` meets ``target_bits`` exactly (element-weighted average);
    ``rule="rank"`` is the paper's 30/40/30 rank rule (most sensitive 30 % of layers at 8 bits, least sensitive 30 %
    at 4, the rest at ``int(target_bits)``; the same width for K and V; the average is whatever it comes to).
    ``map_depth``: the receiver has another depth (see :class:`QKVComm`).
    """
    if rule not in ("solver", "rank"):
        raise ValueError(f"unknown allocation rule {rule!r}; choose solver or rank")
    quant = quant or KVQuantConfig()
    key_tables: dict[int, dict[int, float]] = {}
    value_tables: dict[int, dict[int, float]] = {}
    kl: dict[int, float] = {}
    for example in examples:
        context_ids = chat_ids(receiver.tokenizer, example.messages["sender"])
        message = encode_context(sender, context_ids, layers, sink_tokens)
        if measure == "relative":
            keys, values = distortion_profile(message, config=quant)
            for source, target in ((keys, key_tables), (values, value_tables)):
                for layer, row in source.items():
                    for bits, value in row.items():
                        target.setdefault(layer, {})[bits] = target.get(layer, {}).get(bits, 0.0) + value / len(examples)
        elif measure == "kl":
            query_ids = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
            query_ids = query_ids.to(receiver.device)
            mask = torch.ones(1, message.context_length + query_ids.shape[-1], dtype=torch.long,
                              device=receiver.device)
            reference = receiver.model(input_ids=query_ids, attention_mask=mask,
                                       cache=receiver_cache(message, receiver, cross_depth=map_depth),
                                       logits_to_keep=1).logits[0, -1]
            kl_score = _next_token_kl(receiver, query_ids, reference.float().log_softmax(-1), map_depth)
            scores = output_sensitivity(message, kl_score, bits=2, config=quant)
            for layer, value in scores.items():
                kl[layer] = kl.get(layer, 0.0) + value / len(examples) + 1e-9
        else:
            raise ValueError(f"unknown sensitivity measure {measure!r}; choose relative or kl")
    if rule == "rank":
        scalar = kl if measure == "kl" else {layer: sum(key_tables[layer].values()) + sum(value_tables[layer].values())
                                              for layer in key_tables}
        widths = rank_rule_bits(scalar, min_bits=4, target_bits=target_bits, max_bits=8)
        average = sum(widths.values()) / len(widths)
        return BitAllocation(dict(widths), dict(widths), average, float("nan"))
    if measure == "relative":
        return allocate_bits(key_tables, value_tables, target_bits, keys_at_least_values=keys_at_least_values)
    return allocate_bits(kl, None, target_bits, keys_at_least_values=keys_at_least_values, reference_bits=2)
