"""Moment matching between a sender's and a receiver's KV statistics (Q-KVComm "heterogeneous calibration", Eq 10–14).

Both models prefill the **same calibration texts**; :func:`collect_statistics` pools, per layer, every token of every
sample. Each K (and, separately, V) element of the sender is then moved onto the receiver's moments::

    x' = (x − µ_s) / σ_s · σ_r + µ_r

* ``per_dimension`` mode: µ and σ per ``(kv_head, head_dim)`` dimension, tensors ``[kv_heads, head_dim]``;
* ``scalar`` mode: one µ and one σ per layer for K and one for V, over all elements.

σ is the population standard deviation of the features over all pooled tokens, so after :meth:`MomentMatcher.apply`
the sender's calibration KV has exactly the receiver's mean and standard deviation per dimension. (The released
Q-KVComm code instead took σ as the spread of the *per-text means*, which is not a feature scale and can be tiny.)
Both variances are floored at ``epsilon`` before the square root, so equal statistics give the exact identity.

The receiver layer paired with sender layer ``l`` comes from :func:`layer_map` (KVComm's proportional map; the
identity when both models have the same depth). Different ``kv_heads`` or ``head_dim`` are refused with
:class:`~kvcomm.errors.CalibrationError`: moment matching cannot change a shape, that needs a projection (not yet).

RoPE caveat
-----------
The message holds **post-RoPE** keys (rotated at positions ``0 .. |C|-1``) and they are matched as they are. In every
rotated pair of dimensions the values at different positions are mixed, so a key's per-dimension mean is pulled
towards zero and its σ blends the pair, depending on the lengths of the calibration contexts. We keep post-RoPE
matching because the receiver consumes post-RoPE keys at the same positions, and it is what Q-KVComm does; it is
only sound when both models share RoPE parameters (base, scaling) and the calibration contexts have lengths like
the real ones. For models whose RoPE differs, strip the sender's RoPE, map, and re-apply the receiver's
(the ridge option of the design notes); values carry no RoPE and are unaffected.

Saved files: statistics as one safetensors file (tensors ``layer.{l}.{keys|values}.{mean|std}``, float64) whose
header metadata ``kvcomm`` holds JSON (format, version, model id, depth, per-layer counts and scalar moments);
a matcher as a folder with ``matcher.json`` and ``sender.safetensors`` / ``receiver.safetensors``. No pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvcomm.depth import layer_map, layer_mapping
from kvcomm.errors import CalibrationError
from kvcomm.message import KVMessage, encode_context
from kvcomm.models import LoadedModel

logger = logging.getLogger(__name__)

Mode = Literal["per_dimension", "scalar"]
MODES: tuple[Mode, ...] = ("per_dimension", "scalar")
STATS_FORMAT = "kvcomm.kv_statistics"
MATCHER_FORMAT = "kvcomm.moment_matcher"
FORMAT_VERSION = 1

# One calibration sample: a KVMessage, or {layer: (keys, values)} with tensors [batch, kv_heads, seq, head_dim]
Sample = KVMessage | Mapping[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Moments:
    """Moments of one tensor kind (keys or values) of one layer over ``count`` pooled tokens.

    ``mean`` / ``std``: ``[kv_heads, head_dim]`` float64 (population std); ``scalar_mean`` / ``scalar_std``: over
    every element.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scalar_mean: float
    scalar_std: float
    count: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(kv_heads, head_dim)``."""
        return (int(self.mean.shape[0]), int(self.mean.shape[1]))


@dataclass(frozen=True)
class LayerStats:
    """Key and value moments of one layer."""

    keys: Moments
    values: Moments


@dataclass
class KVStatistics:
    """Per-layer KV moments of one model (``num_layers`` = the model's depth, for the layer map)."""

    num_layers: int
    layers: dict[int, LayerStats]
    model_id: str = ""

    def layer(self, layer: int, side: str = "") -> LayerStats:
        """Statistics of ``layer``; :class:`CalibrationError` when there are none."""
        if layer not in self.layers:
            who = f"{side} " if side else ""
            raise CalibrationError(
                f"no {who}statistics for layer {layer} (have {sorted(self.layers)}); collect statistics on that "
                "layer or choose layers that have them"
            )
        return self.layers[layer]

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors float64, JSON in the header metadata); returns the path."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, object] = {"format": STATS_FORMAT, "version": FORMAT_VERSION, "model_id": self.model_id,
                                   "num_layers": self.num_layers, "layers": {}}
        for layer, stats in sorted(self.layers.items()):
            entry = {}
            for kind, moments in (("keys", stats.keys), ("values", stats.values)):
                tensors[f"layer.{layer}.{kind}.mean"] = moments.mean.detach().to("cpu", torch.float64).contiguous()
                tensors[f"layer.{layer}.{kind}.std"] = moments.std.detach().to("cpu", torch.float64).contiguous()
                entry[kind] = {"scalar_mean": moments.scalar_mean, "scalar_std": moments.scalar_std,
                               "count": moments.count}
            meta["layers"][str(layer)] = entry  # type: ignore[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"kvcomm": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> KVStatistics:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"no statistics file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["kvcomm"])
                if meta.get("format") != STATS_FORMAT or meta.get("version") != FORMAT_VERSION:
                    raise CalibrationError(f"{path} is not a kvcomm statistics file of version {FORMAT_VERSION}")
                layers = {}
                for name, entry in meta["layers"].items():
                    parts = []
                    for kind in ("keys", "values"):
                        parts.append(Moments(handle.get_tensor(f"layer.{name}.{kind}.mean"),
                                             handle.get_tensor(f"layer.{name}.{kind}.std"),
                                             float(entry[kind]["scalar_mean"]), float(entry[kind]["scalar_std"]),
                                             int(entry[kind]["count"])))
                    layers[int(name)] = LayerStats(*parts)
        except (KeyError, ValueError, OSError) as error:
            raise CalibrationError(f"{path} is not a readable kvcomm statistics file: {error}") from error
        return cls(int(meta["num_layers"]), dict(sorted(layers.items())), str(meta.get("model_id", "")))


def _dense(tensor: object, layer: int, what: str) -> torch.Tensor:
    """``tensor`` if it is a dense tensor; quantized KV is refused (match before quantizing, as Q-KVComm does)."""
    if not isinstance(tensor, torch.Tensor):
        raise CalibrationError(f"layer {layer} {what} are {type(tensor).__name__}, not a dense tensor; moment matching "
                               "runs on full-precision KV, before quantization")
    return tensor


@dataclass
class _Accumulator:
    """Running count, mean and centred sum of squares per (kv_head, head_dim) (Chan's parallel update)."""

    count: int = 0
    mean: torch.Tensor | None = None  # [kv_heads, head_dim] float64
    m2: torch.Tensor | None = None

    def add(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.dim() != 4:
            raise CalibrationError(f"{what} must be [batch, kv_heads, seq, head_dim], got shape {tuple(tensor.shape)}")
        if tensor.numel() == 0:
            return
        x = tensor.detach().to(torch.float64)
        n = int(x.shape[0] * x.shape[2])
        mean = x.mean(dim=(0, 2)).cpu()
        m2 = ((x - mean.to(x.device)[None, :, None, :]) ** 2).sum(dim=(0, 2)).cpu()
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise CalibrationError(f"{what} has (kv_heads, head_dim) = {tuple(mean.shape)}, earlier samples had "
                                   f"{tuple(self.mean.shape)}; calibrate each model separately")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def moments(self) -> Moments:
        assert self.mean is not None and self.m2 is not None  # only called after at least one add
        std = (self.m2 / self.count).clamp_min(0).sqrt()
        scalar_mean = self.mean.mean()
        spread = self.m2.sum() + self.count * ((self.mean - scalar_mean) ** 2).sum()
        scalar_std = math.sqrt(max(float(spread) / (self.count * self.mean.numel()), 0.0))
        return Moments(self.mean, std, float(scalar_mean), scalar_std, self.count)


def collect_statistics(samples: Iterable[Sample], num_layers: int | None = None,
                       model_id: str | None = None) -> KVStatistics:
    """Per-layer K/V moments pooled over every token of every sample.

    Parameters
    ----------
    samples : :class:`KVMessage` objects (their selected layers ``keys[l]`` / ``values[l]``, sinks ignored) or
        mappings ``{layer: (keys, values)}``, tensors ``[batch, kv_heads, seq, head_dim]``.
    num_layers : the model's depth; taken from the messages' fingerprints when None.
    model_id : a label stored with the statistics; the fingerprint's model id when None.
    """
    keys: dict[int, _Accumulator] = {}
    values: dict[int, _Accumulator] = {}
    depth, label = num_layers, model_id
    for index, sample in enumerate(samples):
        if isinstance(sample, KVMessage):
            found = sample.fingerprint.num_layers
            if depth is None:
                depth = found
            elif depth != found:
                raise CalibrationError(f"sample {index} comes from a {found}-layer model, expected {depth} layers; "
                                       "collect statistics for each model separately")
            label = sample.fingerprint.model_id if label is None else label
            pairs = {layer: (_dense(sample.keys[layer], layer, "keys"), _dense(sample.values[layer], layer, "values"))
                     for layer in sample.layers}
        else:
            pairs = dict(sample)
        for layer, (k, v) in pairs.items():
            keys.setdefault(int(layer), _Accumulator()).add(k, f"sample {index} layer {layer} keys")
            values.setdefault(int(layer), _Accumulator()).add(v, f"sample {index} layer {layer} values")
    filled = sorted(layer for layer in keys if keys[layer].count > 0 and values[layer].count > 0)
    if not filled:
        raise CalibrationError("no KV tokens to collect statistics from; give at least one non-empty sample")
    if depth is None:
        raise CalibrationError("num_layers is needed when the samples are not KVMessages")
    out_of_range = [layer for layer in filled if not 0 <= layer < depth]
    if out_of_range:
        raise CalibrationError(f"layers {out_of_range} are out of range for a {depth}-layer model")
    layers = {layer: LayerStats(keys[layer].moments(), values[layer].moments()) for layer in filled}
    return KVStatistics(int(depth), layers, label or "")


@torch.no_grad()
def collect_model_statistics(model: LoadedModel, contexts: Iterable[torch.Tensor],
                             layers: Sequence[int]) -> KVStatistics:
    """Prefill ``model`` on each context ``[1, C]`` (token ids) and collect the KV moments of ``layers``.

    Run it on both models with the same calibration texts; for the receiver pass the mapped layers,
    ``sorted(set(layer_mapping(sender_layers, L_s, L_r).values()))``.
    """
    messages = (encode_context(model, ids, tuple(layers), sink_tokens=0) for ids in contexts)
    return collect_statistics(messages, model.num_layers, model.fingerprint.model_id)


@dataclass
class MomentMatcher:
    """Moves sender KV onto the receiver's per-layer moments; build it with :meth:`fit`.

    ``apply(message)`` returns a new :class:`KVMessage` whose ``keys[l]`` / ``values[l]``
    (``[1, kv_heads, context_length, head_dim]``) are transformed with the statistics of sender layer ``l`` and of
    receiver layer ``layer_map(l)``. The message keeps the sender's layer indices, positions and fingerprint; sink
    tensors are passed through unchanged (the sink token is an outlier position that the per-layer statistics of
    the selected layers do not describe).
    """

    sender: KVStatistics
    receiver: KVStatistics
    mode: Mode = "per_dimension"
    epsilon: float = 1e-8  # variance floor before the square root
    _coefficients: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        sender_shapes = {s.keys.shape for s in self.sender.layers.values()} | {
            s.values.shape for s in self.sender.layers.values()}
        receiver_shapes = {s.keys.shape for s in self.receiver.layers.values()} | {
            s.values.shape for s in self.receiver.layers.values()}
        if sender_shapes != receiver_shapes:
            raise CalibrationError(
                f"sender KV (kv_heads, head_dim) {sorted(sender_shapes)} differ from the receiver's "
                f"{sorted(receiver_shapes)}; moment matching cannot change shapes and no head or head_dim "
                "projection is implemented yet"
            )

    @classmethod
    def fit(cls, sender: KVStatistics, receiver: KVStatistics, mode: Mode = "per_dimension", epsilon: float = 1e-8,
            layers: Iterable[int] | None = None) -> MomentMatcher:
        """A matcher for ``sender`` → ``receiver``.

        Checks now that every sender layer in ``layers`` (default: every sender layer with statistics) has
        statistics on both sides and matching shapes, raising :class:`CalibrationError` otherwise.
        """
        matcher = cls(sender, receiver, mode, epsilon)
        for layer in sorted(set(layers if layers is not None else sender.layers)):
            matcher.coefficients(layer)
        return matcher

    @property
    def layer_map(self) -> dict[int, int]:
        """``{sender layer: receiver layer}`` for every sender layer with statistics."""
        return layer_mapping(self.sender.layers, self.sender.num_layers, self.receiver.num_layers)

    def coefficients(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(key_scale, key_shift, value_scale, value_shift)`` for sender ``layer``, so that ``x' = x·scale + shift``.

        float64, ``[1, kv_heads, 1, head_dim]`` (per-dimension) or ``[1, 1, 1, 1]`` (scalar).
        """
        if layer not in self._coefficients:
            target = layer_map(layer, self.sender.num_layers, self.receiver.num_layers)
            mine, theirs = self.sender.layer(layer, "sender"), self.receiver.layer(target, "receiver")
            parts: list[torch.Tensor] = []
            for source, goal in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                if source.shape != goal.shape:
                    raise CalibrationError(
                        f"sender layer {layer} has (kv_heads, head_dim) {source.shape}, receiver layer {target} has "
                        f"{goal.shape}; no projection is implemented yet"
                    )
                parts.extend(self._affine(source, goal))
            self._coefficients[layer] = tuple(parts)
        k_scale, k_shift, v_scale, v_shift = self._coefficients[layer]
        return k_scale, k_shift, v_scale, v_shift

    def _affine(self, source: Moments, goal: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "scalar":
            mu_s = torch.tensor(source.scalar_mean, dtype=torch.float64)
            mu_r = torch.tensor(goal.scalar_mean, dtype=torch.float64)
            var_s = torch.tensor(source.scalar_std**2, dtype=torch.float64)
            var_r = torch.tensor(goal.scalar_std**2, dtype=torch.float64)
            shape = (1, 1, 1, 1)
        else:
            mu_s, mu_r = source.mean.to(torch.float64), goal.mean.to(torch.float64)
            var_s, var_r = source.std.to(torch.float64) ** 2, goal.std.to(torch.float64) ** 2
            shape = (1, source.shape[0], 1, source.shape[1])
        scale = var_r.clamp_min(self.epsilon).sqrt() / var_s.clamp_min(self.epsilon).sqrt()
        shift = mu_r - mu_s * scale
        return scale.to(torch.float64).reshape(shape), shift.to(torch.float64).reshape(shape)

    def transform(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched ``(keys, values)`` of sender ``layer``; tensors ``[batch, kv_heads, seq, head_dim]``, dtype kept.

        Computed in float32 (float64 for float64 inputs).
        """
        k_scale, k_shift, v_scale, v_shift = self.coefficients(layer)
        return (self._affine_apply(keys, k_scale, k_shift, layer, "keys"),
                self._affine_apply(values, v_scale, v_shift, layer, "values"))

    def _affine_apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, layer: int,
                      what: str) -> torch.Tensor:
        expected = self.sender.layers[layer].keys.shape if what == "keys" else self.sender.layers[layer].values.shape
        if x.dim() != 4 or (int(x.shape[1]), int(x.shape[3])) != expected:
            raise CalibrationError(f"layer {layer} {what} have shape {tuple(x.shape)}, the sender statistics expect "
                                   f"[batch, {expected[0]}, seq, {expected[1]}]")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = x.to(compute) * scale.to(x.device, compute) + shift.to(x.device, compute)
        return out.to(x.dtype)

    def apply(self, message: KVMessage) -> KVMessage:
        """A new message with every selected layer's K and V matched (sinks, layers and fingerprint unchanged)."""
        if message.fingerprint.num_layers != self.sender.num_layers:
            raise CalibrationError(
                f"the message comes from a {message.fingerprint.num_layers}-layer model, the sender statistics from a "
                f"{self.sender.num_layers}-layer model; collect statistics on the model that sends"
            )
        if self.sender.model_id and message.fingerprint.model_id != self.sender.model_id:
            logger.warning("message from %s, sender statistics from %s", message.fingerprint.model_id,
                           self.sender.model_id)
        keys, values = dict(message.keys), dict(message.values)  # same value types as the message
        for layer in message.layers:
            keys[layer], values[layer] = self.transform(layer, _dense(message.keys[layer], layer, "keys"),
                                                        _dense(message.values[layer], layer, "values"))
        return dataclasses.replace(message, keys=keys, values=values, sink_keys=dict(message.sink_keys),
                                   sink_values=dict(message.sink_values))

    def save(self, directory: str | Path) -> Path:
        """Write ``matcher.json``, ``sender.safetensors`` and ``receiver.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.sender.save(directory / "sender.safetensors")
        self.receiver.save(directory / "receiver.safetensors")
        config = {"format": MATCHER_FORMAT, "version": FORMAT_VERSION, "mode": self.mode, "epsilon": self.epsilon,
                  "sender": "sender.safetensors", "receiver": "receiver.safetensors"}
        (directory / "matcher.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MomentMatcher:
        """Read a folder written by :meth:`save`."""
        directory = Path(directory)
        config_path = directory / "matcher.json"
        if not config_path.is_file():
            raise CalibrationError(f"no matcher.json in {directory}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{config_path} is not valid JSON: {error}") from error
        if config.get("format") != MATCHER_FORMAT or config.get("version") != FORMAT_VERSION:
            raise CalibrationError(f"{config_path} is not a kvcomm moment matcher of version {FORMAT_VERSION}")
        return cls(KVStatistics.load(directory / config["sender"]), KVStatistics.load(directory / config["receiver"]),
                   config["mode"], float(config["epsilon"]))
