"""Layer selection: explicit lists, contiguous ranges, random subsets, and the KVComm attention-importance score.

KVComm score (paper Eq. 1, with the reference code's conventions where the paper is silent):

* raw importance ``Ŝ_l`` = mean over heads and receiver prompt positions of the attention mass on the sender's
  context tokens, the sink token (column 0) excluded, computed under a causal mask with **all** layers shared;
  averaged over the calibration items;
* ``S_a`` = min–max normalised ``Ŝ`` (all zeros when the range is below 1e-9);
* prior ``P_l = exp(-(l - mu·(L-1))² / (2·sigma²))`` over 0-based layers, min–max normalised;
* ``S = alpha·S_a + (1 - alpha)·P``; the top ``ceil(ratio·L)`` layers by ``S`` are shared (ties: lower index first).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcomm import _hf
from kvcomm.errors import LayerSelectionError
from kvcomm.message import KVMessage, encode_context, receiver_cache, validate_layers
from kvcomm.models import LoadedModel, check_compatible
from kvcomm.prompts import chat_ids
from kvcomm.tasks.base import Example


def layer_count(ratio: float, num_layers: int) -> int:
    """``ceil(ratio·L)`` (paper), at least 1; ``ratio`` in (0, 1]. Float noise such as 0.7·30 = 21.000000000000004 is ignored."""
    if not 0 < ratio <= 1:
        raise LayerSelectionError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, min(num_layers, math.ceil(round(ratio * num_layers, 9))))


def min_max(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low < 1e-9:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def gaussian_prior(num_layers: int, mu: float = 0.5, sigma: float = 10.0) -> list[float]:
    """Min–max normalised Gaussian over 0-based layers centred at ``mu·(L-1)`` with width ``sigma`` layers."""
    if sigma <= 0:
        raise LayerSelectionError(f"sigma must be > 0, got {sigma}")
    centre = mu * (num_layers - 1)
    raw = [math.exp(-((layer - centre) ** 2) / (2 * sigma**2)) for layer in range(num_layers)]
    return min_max(raw)


def top_layers(scores: Sequence[float], count: int) -> tuple[int, ...]:
    """Indices of the ``count`` highest scores (ties broken by lower index), returned sorted."""
    if not 1 <= count <= len(scores):
        raise LayerSelectionError(f"cannot pick {count} of {len(scores)} layers")
    ranking = sorted(range(len(scores)), key=lambda layer: (-scores[layer], layer))
    return tuple(sorted(ranking[:count]))


def contiguous_layers(first: int, last: int, num_layers: int) -> tuple[int, ...]:
    """Layers ``first..last`` inclusive."""
    if first > last:
        raise LayerSelectionError(f"empty range {first}..{last}")
    return validate_layers(list(range(first, last + 1)), num_layers)


def random_layers(num_layers: int, count: int, seed: int = 42) -> tuple[int, ...]:
    """A uniformly random subset of ``count`` layers, reproducible from ``seed``."""
    if not 1 <= count <= num_layers:
        raise LayerSelectionError(f"cannot pick {count} of {num_layers} layers")
    return tuple(sorted(random.Random(seed).sample(range(num_layers), count)))


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """``"0,3,5"``, ``"4-12"`` or a mix (``"0,4-6"``) → validated layer indices."""
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if first > last:
                    raise LayerSelectionError(f"empty range {part!r}")
                layers.extend(range(first, last + 1))
            else:
                layers.append(int(part))
    except ValueError as error:
        raise LayerSelectionError(f"cannot parse layer list {spec!r}; use e.g. '0,3,5' or '4-12'") from error
    if not layers:
        raise LayerSelectionError("the layer list is empty")
    return validate_layers(layers, num_layers)


@dataclass
class LayerScores:
    """Calibration result, saved as JSON so it can be plotted."""

    importance: list[float]  # raw attention mass per layer, in [0, 1]
    normalized: list[float]  # min–max normalised importance
    prior: list[float]
    combined: list[float]
    alpha: float
    mu: float
    sigma: float
    calibration_ids: list[str]

    @property
    def num_layers(self) -> int:
        return len(self.combined)

    def select(self, ratio: float) -> tuple[int, ...]:
        return top_layers(self.combined, layer_count(ratio, self.num_layers))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "LayerScores":
        return cls(**json.loads(Path(path).read_text()))


def combine(importance: Sequence[float], alpha: float = 1.0, mu: float = 0.5, sigma: float = 10.0,
            calibration_ids: Sequence[str] = ()) -> LayerScores:
    """Normalise raw importance and mix it with the Gaussian prior."""
    if not 0 <= alpha <= 1:
        raise LayerSelectionError(f"alpha must be in [0, 1], got {alpha}")
    normalized = min_max(importance)
    prior = gaussian_prior(len(importance), mu, sigma)
    combined = [alpha * s + (1 - alpha) * p for s, p in zip(normalized, prior)]
    return LayerScores(list(importance), normalized, prior, combined, alpha, mu, sigma, list(calibration_ids))


@torch.no_grad()
def attention_importance(sender: LoadedModel, receiver: LoadedModel, example: Example,
                         message: KVMessage | None = None) -> list[float]:
    """Raw per-layer attention mass of the receiver prompt on the sender context (sink excluded), all layers shared.

    ``message``: the sender's KV of ``example`` at every layer when the caller already has it (no second prefill)."""
    check_compatible(sender.fingerprint, receiver.fingerprint)
    query_ids = chat_ids(receiver.tokenizer, example.messages["receiver"], example.answer_prefix)
    if message is None:
        context_ids = chat_ids(receiver.tokenizer, example.messages["sender"])
        message = encode_context(sender, context_ids, range(sender.num_layers), sink_tokens=0)
    elif message.layers != tuple(range(sender.num_layers)):
        raise LayerSelectionError(f"attention importance needs the KV of every layer; the message holds "
                                  f"{list(message.layers)}")
    cache = receiver_cache(message, receiver)
    mask = torch.ones(1, message.context_length + query_ids.shape[-1], dtype=torch.long, device=receiver.device)
    with _hf.capture_context_attention(exclude_sink=True) as capture:
        receiver.model(input_ids=query_ids.to(receiver.device), attention_mask=mask, cache=cache)
    if sorted(capture.mass) != list(range(receiver.num_layers)):
        raise RuntimeError(f"attention capture saw layers {sorted(capture.mass)}, expected all {receiver.num_layers}")
    return [capture.mass[layer][0] for layer in range(receiver.num_layers)]


def calibrate(sender: LoadedModel, receiver: LoadedModel, examples: Sequence[Example], alpha: float = 1.0,
              mu: float = 0.5, sigma: float = 10.0) -> LayerScores:
    """KVComm layer scores averaged over ``examples`` (calibration items, never test items)."""
    if not examples:
        raise LayerSelectionError("calibration needs at least one item")
    per_item = [attention_importance(sender, receiver, example) for example in examples]
    importance = [sum(values) / len(values) for values in zip(*per_item)]
    return combine(importance, alpha, mu, sigma, [example.id for example in examples])
