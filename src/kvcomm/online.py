"""Online recalibration (paper App. L): KVComm whose layer selection is refreshed from the stream of test items.

Items ``0 .. interval-1`` use the initial selection (from calibration items, given at construction). Then every
``interval`` items (item indices ``interval, 2·interval, …``) the current item is first scored with all layers shared
(:func:`kvcomm.selection.attention_importance`, then :func:`kvcomm.selection.combine` with ``alpha``/``mu``/``sigma``),
the top ``ceil(ratio·L)`` layers become the new selection, and the item is answered **once** with it (the reference
code scores that item twice): the sender prefills it once with every layer, the receiver scores that message and then
answers from the same message cut down to the new layers (:meth:`kvcomm.message.KVMessage.restrict`). Without an
initial selection the first item is a recalibration item.

Costs of a recalibration item: ``sender_seconds`` is the all-layer prefill, the receiver's scoring pass is added to
``receiver_seconds``, and ``kv_bytes`` counts the all-layer KV that scoring needs to receive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcomm.costs import stopwatch
from kvcomm.errors import LayerSelectionError
from kvcomm.generation import GenerationSettings
from kvcomm.message import KVMessage, validate_layers
from kvcomm.methods.base import MethodOutput
from kvcomm.methods.kvcomm import KVComm
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.selection import LayerScores, attention_importance, calibrate, combine, layer_count
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    """One refresh of the selection: at which item, from which scores, to which layers, in how many seconds."""

    item_index: int
    item_id: str
    scores: LayerScores
    layers: tuple[int, ...]
    seconds: float


@dataclass
class OnlineKVComm:
    """KVComm with the selection recomputed every ``interval`` items from the item being answered."""

    sender: LoadedModel
    receiver: LoadedModel
    ratio: float
    interval: int
    alpha: float = 1.0
    mu: float = 0.5
    sigma: float = 10.0
    initial_layers: Sequence[int] | None = None
    sink_tokens: int = 1
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    name: str = "kvcomm_online"
    layers: tuple[int, ...] | None = field(init=False, default=None)
    items_seen: int = field(init=False, default=0)
    recalibrations: list[Recalibration] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        check_compatible(self.sender.fingerprint, self.receiver.fingerprint)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise LayerSelectionError(f"interval must be an integer >= 1, got {self.interval!r}")
        self._count = layer_count(self.ratio, self.receiver.num_layers)  # validates ratio
        combine([0.0] * self.receiver.num_layers, self.alpha, self.mu, self.sigma)  # validates alpha and sigma
        if self.initial_layers is not None:
            self.initial_layers = validate_layers(tuple(self.initial_layers), self.receiver.num_layers)
            if not self.initial_layers:
                raise LayerSelectionError("initial_layers is empty")
        self.reset()

    @classmethod
    def from_calibration(cls, sender: LoadedModel, receiver: LoadedModel, calibration: Sequence[Example],
                         ratio: float, interval: int, alpha: float = 1.0, mu: float = 0.5, sigma: float = 10.0,
                         **options: object) -> OnlineKVComm:
        """The initial selection from ``calibration`` items (:func:`kvcomm.selection.calibrate`), then online."""
        scores = calibrate(sender, receiver, calibration, alpha, mu, sigma)
        return cls(sender, receiver, ratio, interval, alpha, mu, sigma, initial_layers=scores.select(ratio),
                   **options)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forget the stream: back to the initial selection and item 0."""
        self.layers = self.initial_layers  # type: ignore[assignment]
        self.items_seen = 0
        self.recalibrations = []

    def due(self, index: int) -> bool:
        """Whether item ``index`` (0-based position in the stream) recalibrates before being answered."""
        return self.layers is None or (index > 0 and index % self.interval == 0)

    def recalibrate(self, example: Example, message: KVMessage | None = None) -> Recalibration:
        """Score ``example`` with all layers shared and make the top layers the current selection (``message``: the
        sender's all-layer KV of ``example`` when already computed; ``seconds`` counts the receiver's scoring only)."""
        with stopwatch(self.receiver.device) as elapsed:
            importance = attention_importance(self.sender, self.receiver, example, message)
            scores = combine(importance, self.alpha, self.mu, self.sigma, [example.id])
        layers = scores.select(self.ratio)
        record = Recalibration(self.items_seen, example.id, scores, layers, elapsed[0])
        logger.info("online recalibration at item %d (%s): layers %s -> %s", self.items_seen, example.id,
                    self.layers, layers)
        self.layers = layers
        self.recalibrations.append(record)
        return record

    def answer(self, example: Example) -> MethodOutput:
        """Answer the next item of the stream (recalibrating first when it is due)."""
        if not self.due(self.items_seen):
            output = self._method(self.layers).answer(example)  # type: ignore[arg-type]
            self.items_seen += 1
            return output
        everything = self._method(range(self.sender.num_layers))
        message, sender_seconds = everything.send(example)  # one prefill serves scoring and answering
        record = self.recalibrate(example, message)
        output = self._method(record.layers).receive(message.restrict(record.layers, self.sink_tokens), example)
        self.items_seen += 1
        output.costs.sender_seconds = sender_seconds
        output.costs.receiver_seconds += record.seconds
        output.costs.kv_bytes = message.nbytes  # scoring needs every layer's KV on the receiver
        return output

    def _method(self, layers: Sequence[int]) -> KVComm:
        return KVComm(self.sender, self.receiver, layers, self.sink_tokens, self.settings, name=self.name)
