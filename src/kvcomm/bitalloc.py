"""Per-layer sensitivity profiling and bit allocation for quantized KV messages (``QKVCOMM.md`` §3.2–3.3, §6.3).

Sensitivity measures: the paper's round-trip MSE at its lowest width, the relative error, a measured distortion
profile per width, and a hook for the receiver's output distortion. Allocation: the paper's 30/40/30 rank rule and an
exact solver that meets a target average bit width (weighted by element count).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Union

import torch

from kvcomm.errors import QuantizationError
from kvcomm.quant import (
    ALLOWED_BITS, Axis, KVQuantConfig, QuantizedTensor, _check_bits, _raw, quantize,
)

if TYPE_CHECKING:
    from kvcomm.message import KVMessage

logger = logging.getLogger(__name__)


# --- sensitivity profiling ------------------------------------------------------------------------------------------

def _squared_error(tensor: torch.Tensor, quantized: QuantizedTensor) -> tuple[float, float]:
    """``(‖x − x̂‖², ‖x‖²)`` in fp32."""
    reference = tensor.float()
    return float((quantized.dequantize().float() - reference).square().sum()), float(reference.square().sum())


def round_trip_mse(message: KVMessage, bits: int = 4, axis: Axis = "tensor", group_size: int = 32) -> dict[int, float]:
    """The paper's sensitivity (QKVCOMM.md §3.2, Algorithm 1) for one message: ``MSE(K, K̂) + MSE(V, V̂)`` per layer.

    Defaults are the paper's: per-tensor quantization at its lowest width (``min_bits = 4``); pass ``bits=2`` to
    profile at this library's lowest width. Raw MSE favours large-magnitude layers; see :func:`relative_error`.
    Average over several messages to reproduce the paper's profiling over texts.
    """
    result = {}
    for layer in message.layers:
        total = 0.0
        for tensor in (_raw(message.keys[layer], "keys"), _raw(message.values[layer], "values")):
            error, _ = _squared_error(tensor, quantize(tensor, bits, group_size, axis))
            total += error / max(1, tensor.numel())
        result[layer] = total
    return result


def relative_error(message: KVMessage, bits: int = 2, config: KVQuantConfig | None = None,
                   part: Literal["both", "keys", "values"] = "both") -> dict[int, float]:
    """Normalised sensitivity ``‖x − q(x)‖ / ‖x‖`` per layer (QKVCOMM.md §6.3) under ``config``'s axes, group size
    and sink at ``bits``; ``part="both"`` pools K and V: ``√((‖ΔK‖² + ‖ΔV‖²)/(‖K‖² + ‖V‖²))``."""
    if part not in ("both", "keys", "values"):
        raise QuantizationError(f"part must be 'both', 'keys' or 'values', got {part!r}")
    config = config or KVQuantConfig()
    keep = min(config.keep_sink, message.context_length)
    result = {}
    for layer in message.layers:
        error = norm = 0.0
        if part in ("both", "keys"):
            tensor = _raw(message.keys[layer], "keys")
            e, n = _squared_error(tensor, quantize(tensor, bits, config.group_size, config.key_axis, keep))
            error, norm = error + e, norm + n
        if part in ("both", "values"):
            tensor = _raw(message.values[layer], "values")
            e, n = _squared_error(tensor, quantize(tensor, bits, config.group_size, config.value_axis, keep))
            error, norm = error + e, norm + n
        result[layer] = math.sqrt(error / norm) if norm > 0 else 0.0
    return result


def distortion_profile(message: KVMessage, widths: Sequence[int] = ALLOWED_BITS,
                       config: KVQuantConfig | None = None) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
    """Measured squared relative error ``(‖x − q(x)‖/‖x‖)²`` at every width, for keys and for values:
    ``({layer: {bits: d}}, {layer: {bits: d}})`` — the tables :func:`allocate_bits` accepts."""
    tables: tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]] = ({}, {})
    for part, table in zip(("keys", "values"), tables):
        for bits in widths:
            for layer, error in relative_error(message, bits, config, part).items():  # type: ignore[arg-type]
                table.setdefault(layer, {})[bits] = error**2
    return tables


def output_sensitivity(message: KVMessage, score: Callable[[KVMessage], float], bits: int = 2,
                       config: KVQuantConfig | None = None, layers: Sequence[int] | None = None) -> dict[int, float]:
    """Model-output sensitivity hook: for each layer, quantize only that layer's K and V at ``bits`` (under
    ``config``) and return ``score(perturbed_message)`` — e.g. the receiver's logit KL against the unquantized
    message, computed by the caller. Other layers stay unquantized."""
    config = config or KVQuantConfig()
    keep = min(config.keep_sink, message.context_length)
    result = {}
    for layer in (message.layers if layers is None else layers):
        if layer not in message.keys:
            raise QuantizationError(f"layer {layer} is not in the message (it has {list(message.layers)})")
        keys, values = dict(message.keys), dict(message.values)
        keys[layer] = quantize(_raw(keys[layer], "keys"), bits, config.group_size, config.key_axis, keep)
        values[layer] = quantize(_raw(values[layer], "values"), bits, config.group_size, config.value_axis, keep)
        result[layer] = float(score(replace(message, keys=keys, values=values)))
    return result


# --- bit allocation ---------------------------------------------------------------------------------------------------

def rank_rule_bits(sensitivity: Mapping[int, float], min_bits: int = 4, target_bits: float = 6.0,
                   max_bits: int = 8) -> dict[int, int]:
    """The Q-KVComm 30/40/30 rank rule (QKVCOMM.md §3.3): of N layers, the ⌊0.3·N⌋ most sensitive get
    ``max_bits``, the ⌊0.3·N⌋ least sensitive get ``min_bits``, the rest ``int(target_bits)`` (ties: lower layer
    index counts as more sensitive). The same width serves K and V. ``target_bits`` does not set the average."""
    middle = int(target_bits)
    if not min_bits <= target_bits <= max_bits:
        raise QuantizationError(f"need min_bits ≤ target_bits ≤ max_bits, got {min_bits}, {target_bits}, {max_bits}")
    for bits in (min_bits, middle, max_bits):
        _check_bits(bits)
    ranked = sorted(sensitivity, key=lambda layer: (-float(sensitivity[layer]), layer))
    edge = len(ranked) * 3 // 10
    widths = {layer: middle for layer in ranked}
    for layer in ranked[:edge]:
        widths[layer] = max_bits
    for layer in ranked[len(ranked) - edge:] if edge else []:
        widths[layer] = min_bits
    return dict(sorted(widths.items()))


@dataclass(frozen=True)
class BitAllocation:
    """Per-layer widths chosen by :func:`allocate_bits`; ``average_bits`` is weighted by element count."""

    key_bits: dict[int, int]
    value_bits: dict[int, int]
    average_bits: float
    distortion: float


Sensitivity = Mapping[int, Union[float, Mapping[int, float]]]


def _table(sensitivity: Sensitivity, widths: Sequence[int], reference_bits: int, what: str) -> dict[int, dict[int, float]]:
    """``{layer: {bits: distortion}}``; a scalar ``s`` becomes ``s·4^(reference_bits − b)`` (uniform-quantizer MSE
    quarters per extra bit)."""
    table = {}
    for layer, value in sensitivity.items():
        if isinstance(value, Mapping):
            missing = [bits for bits in widths if bits not in value]
            if missing:
                raise QuantizationError(f"{what}[{layer}] has no distortion for widths {missing}")
            table[layer] = {bits: float(value[bits]) for bits in widths}
        else:
            table[layer] = {bits: float(value) * 4.0 ** (reference_bits - bits) for bits in widths}
        if any(not math.isfinite(d) for d in table[layer].values()):
            raise QuantizationError(f"{what}[{layer}] is not finite")
    return table


def _counts(numel: Mapping[int, int] | None, layers: Sequence[int], what: str) -> dict[int, int]:
    counts = {layer: 1 for layer in layers} if numel is None else {layer: numel.get(layer, -1) for layer in layers}
    bad = [layer for layer, count in counts.items() if isinstance(count, bool) or not isinstance(count, int) or count < 1]
    if bad:
        raise QuantizationError(f"{what} needs a positive element count for layers {bad}")
    return counts


def allocate_bits(key_sensitivity: Sensitivity, value_sensitivity: Sensitivity | None, target_bits: float,
                  widths: Sequence[int] = ALLOWED_BITS, *, key_numel: Mapping[int, int] | None = None,
                  value_numel: Mapping[int, int] | None = None, keys_at_least_values: bool = False,
                  reference_bits: int = 4) -> BitAllocation:
    """Per-layer K and V widths minimising total distortion at an exact average width (QKVCOMM.md §6.3).

    Exact knapsack DP over layers: each layer picks a pair ``(b_K, b_V)`` from ``widths``; the element-weighted
    average ``Σ(n_K·b_K + n_V·b_V)/Σ(n_K + n_V)`` equals ``target_bits`` exactly.

    Parameters
    ----------
    key_sensitivity, value_sensitivity : Mapping
        ``{layer: s}`` (scalar, modelled as ``s·4^(reference_bits − b)``) or ``{layer: {bits: distortion}}``
        (measured, e.g. from :func:`distortion_profile`). ``value_sensitivity=None`` reuses the key sensitivity.
    target_bits : float
        Average width to hit exactly.
    widths : Sequence[int]
        Allowed widths, a subset of :data:`ALLOWED_BITS`.
    key_numel, value_numel : Mapping[int, int], optional
        Element counts per layer (default: equal; ``value_numel`` defaults to ``key_numel``).
    keys_at_least_values : bool
        Constrain ``b_K ≥ b_V`` in every layer (KV-AdaQuant: keys deserve more bits).
    reference_bits : int
        Width at which scalar sensitivities were measured.

    Raises
    ------
    QuantizationError
        Bad widths or sensitivities, or a target that no allocation hits exactly (the nearest reachable averages are
        named).
    """
    widths = sorted(set(_check_bits(bits) for bits in widths))
    if not widths:
        raise QuantizationError("widths is empty")
    value_sensitivity = key_sensitivity if value_sensitivity is None else value_sensitivity
    layers = sorted(key_sensitivity)
    if not layers or sorted(value_sensitivity) != layers:
        raise QuantizationError(f"key and value sensitivities must name the same non-empty layers, got "
                                f"{layers} and {sorted(value_sensitivity)}")
    key_table = _table(key_sensitivity, widths, reference_bits, "key_sensitivity")
    value_table = _table(value_sensitivity, widths, reference_bits, "value_sensitivity")
    value_numel = key_numel if value_numel is None else value_numel
    key_counts, value_counts = _counts(key_numel, layers, "key_numel"), _counts(value_numel, layers, "value_numel")
    unit = math.gcd(*key_counts.values(), *value_counts.values())
    key_units = {layer: count // unit for layer, count in key_counts.items()}
    value_units = {layer: count // unit for layer, count in value_counts.items()}
    total_units = sum(key_units.values()) + sum(value_units.values())
    limit = widths[-1] * total_units
    if limit > 4_000_000:
        raise QuantizationError("element counts are too uneven for an exact allocation; pass coarser key_numel/value_numel")
    goal = float(target_bits) * total_units
    budget = round(goal)
    options = [(kb, vb) for kb in widths for vb in widths if kb >= vb or not keys_at_least_values]
    cost = torch.full((limit + 1,), math.inf, dtype=torch.float64)
    cost[0] = 0.0
    picks = []
    for layer in layers:
        new = torch.full_like(cost, math.inf)
        pick = torch.full((limit + 1,), -1, dtype=torch.int64)
        for index, (kb, vb) in enumerate(options):
            weight = key_units[layer] * kb + value_units[layer] * vb
            candidate = cost[: limit + 1 - weight] + (key_table[layer][kb] + value_table[layer][vb])
            better = candidate < new[weight:]
            new[weight:] = torch.where(better, candidate, new[weight:])
            pick[weight:][better] = index
        cost = new
        picks.append(pick)
    if abs(goal - budget) > 1e-9 * max(1.0, goal) or not 0 <= budget <= limit or not math.isfinite(float(cost[budget])):
        reachable = torch.nonzero(torch.isfinite(cost)).flatten()
        nearest = reachable[torch.argsort((reachable.double() - goal).abs())[:2]].sort().values
        hint = ", ".join(f"{int(state) / total_units:.6g}" for state in nearest)
        raise QuantizationError(f"no allocation from widths {widths} averages exactly {target_bits} bits over these "
                                f"layers; nearest reachable averages: {hint}")
    key_bits, value_bits, state = {}, {}, budget
    for layer, pick in zip(reversed(layers), reversed(picks)):
        kb, vb = options[int(pick[state])]
        key_bits[layer], value_bits[layer] = kb, vb
        state -= key_units[layer] * kb + value_units[layer] * vb
    average = sum(key_counts[l] * key_bits[l] + value_counts[l] * value_bits[l] for l in layers) / \
        sum(key_counts[l] + value_counts[l] for l in layers)
    return BitAllocation(dict(sorted(key_bits.items())), dict(sorted(value_bits.items())), average, float(cost[budget]))
