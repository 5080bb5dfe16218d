"""Transmission quantization of KV tensors: grouped asymmetric min–max codes with real bit-packing, per-layer
sensitivity profiling and bit allocation (``../shared/spec/QKVCOMM.md`` §3.2–3.4, §6.2–6.3).

Quantizer, per group of values with ``qmax = 2^b − 1``: ``zero = min`` rounded *down* to fp16,
``scale = (max − zero)/qmax`` rounded *up* to fp16, codes ``q = ⌊(x − zero)/scale + ½⌋ ∈ [0, qmax]`` and
``x̂ = q·scale + zero``. The rounding directions make ``zero + qmax·scale`` cover the group's maximum, so no value is
clipped and ``|x − x̂| ≤ scale/2`` for every element (up to fp32 rounding and the output dtype's rounding).
``zeros`` therefore holds the zero-point in the input's units (the value of code 0); the integer-style zero-point of
QKVCOMM.md §3.2 is ``−zeros/scales``. Groups (``axis``):

* ``"channel"``: ``group_size`` consecutive tokens of one channel share a (scale, zero) — KIVI's keys;
* ``"token"``: ``group_size`` consecutive channels of one token — KIVI's values;
* ``"tensor"``: one (scale, zero) for the whole tensor — the Q-KVComm paper's per-tensor quantizer.

The first ``keep_first_tokens`` tokens (the attention sink) can stay unquantized. Tensors are ``[..., tokens, head_dim]``
(a message holds ``[1, kv_heads, context_length, head_dim]``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Union

import torch

from kvcomm.errors import QuantizationError

if TYPE_CHECKING:
    from kvcomm.message import KVMessage

logger = logging.getLogger(__name__)

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 6, 8)
AXES: tuple[str, ...] = ("channel", "token", "tensor")
Axis = Literal["channel", "token", "tensor"]
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


# --- bit packing --------------------------------------------------------------------------------------------------

def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise QuantizationError(f"bit width must be one of {ALLOWED_BITS}, got {bits!r}")
    return bits


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` packed ``bits``-bit codes: ``⌈count·bits/8⌉``."""
    return (count * bits + 7) // 8


def _lanes(width: int, lane: int) -> int:
    """An int64 mask with the low ``width`` bits of every ``lane``-bit lane set."""
    return sum(((1 << width) - 1) << shift for shift in range(0, 64, lane))


def _check_host() -> None:
    if sys.byteorder != "little":
        raise QuantizationError("bit packing reinterprets bytes as little-endian int64 words; this host is big-endian")


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[8·k]`` (each ``< 2**bits``) into ``[k·bits]`` bytes: a little-endian bit stream, code ``i``
    in bits ``i·bits … i·bits + bits − 1``. Each group of 8 codes is one int64 word, compacted in three
    shift-and-mask steps (8 → 16 → 32 → 64-bit lanes); no per-element Python loop."""
    if bits == 8:
        return codes
    _check_host()
    words, width = codes.view(torch.int64), bits
    for lane in (16, 32, 64):
        keep = _lanes(lane // 2, lane)
        high = (words >> (lane // 2)).bitwise_and_(keep).bitwise_left_shift_(width)
        words = (words & keep).bitwise_or_(high)
        width *= 2
    return words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)


def _unpack_words(packed: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """Inverse of :func:`_pack_words`: uint8 ``[words·bits]`` → codes ``[words·8]``."""
    if bits == 8:
        return packed
    _check_host()
    buffer = torch.empty(words, 8, dtype=torch.uint8, device=packed.device)
    buffer[:, :bits] = packed.view(words, bits)
    buffer[:, bits:] = 0
    value, width = buffer.view(torch.int64).view(-1), 4 * bits
    for lane in (64, 32, 16):
        keep = _lanes(width, lane)
        high = (value >> width).bitwise_and_(keep).bitwise_left_shift_(lane // 2)
        value = (value & keep).bitwise_or_(high)
        width //= 2
    return value.view(torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes densely, ``bits`` bits each.

    Parameters
    ----------
    codes : torch.Tensor
        uint8, any shape (read in row-major order), every value ``< 2**bits``.
    bits : int
        One of :data:`ALLOWED_BITS`.

    Returns
    -------
    torch.Tensor
        uint8 ``[⌈codes.numel()·bits/8⌉]``, a new tensor.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise QuantizationError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    flat = codes.reshape(-1)
    count = flat.numel()
    if count and int(flat.max()) >= 1 << bits:
        raise QuantizationError(f"codes must be < {1 << bits} for {bits}-bit packing, got {int(flat.max())}")
    padded = -(-count // 8) * 8
    if padded != count or flat.storage_offset() % 8 or not flat.is_contiguous():  # whole, aligned int64 words
        buffer = torch.zeros(padded, dtype=torch.uint8, device=flat.device)
        buffer[:count] = flat
        flat = buffer
    packed = _pack_words(flat, bits)[: packed_size(count, bits)]
    return packed.clone() if packed.untyped_storage().data_ptr() == codes.untyped_storage().data_ptr() else packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Parameters
    ----------
    packed : torch.Tensor
        uint8 ``[⌈count·bits/8⌉]``.
    bits : int
        One of :data:`ALLOWED_BITS`.
    count : int
        Number of codes to read.

    Returns
    -------
    torch.Tensor
        uint8 ``[count]``, a new tensor.
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise QuantizationError("packed codes must be a 1-D uint8 tensor")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise QuantizationError(f"count must be a non-negative int, got {count!r}")
    if packed.numel() != packed_size(count, bits):
        raise QuantizationError(f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes, got {packed.numel()}")
    codes = _unpack(packed.contiguous(), bits, count)
    return codes.clone() if codes.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr() else codes


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    words = -(-count // 8)
    if words * bits != packed.numel():  # the last word is partial: pad it with zero bytes
        buffer = torch.zeros(words * bits, dtype=torch.uint8, device=packed.device)
        buffer[: packed.numel()] = packed
        packed = buffer
    return _unpack_words(packed, bits, words)[:count]


# --- grouped layout -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """How a body tensor ``[*lead, T, D]`` splits into groups (padding the grouped axis to a multiple of ``group``)."""

    shape: tuple[int, ...]
    axis: str
    group: int

    @property
    def dim(self) -> int:  # the axis the groups run along
        return -2 if self.axis == "channel" else -1

    @property
    def padded_shape(self) -> tuple[int, ...]:
        if self.axis == "tensor":
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = -(-shape[self.dim] // self.group) * self.group
        return tuple(shape)

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        if self.axis == "tensor":
            return (1, math.prod(self.shape))
        *lead, tokens, channels = self.padded_shape
        if self.axis == "channel":
            return (*lead, tokens // self.group, self.group, channels)
        return (*lead, tokens, channels // self.group, self.group)

    @property
    def reduce_dim(self) -> int:
        return -2 if self.axis == "channel" else -1

    @property
    def scale_shape(self) -> tuple[int, ...]:
        grouped = list(self.grouped_shape)
        del grouped[self.reduce_dim]
        return tuple(grouped)

    def real(self, padded: torch.Tensor) -> torch.Tensor:
        """The unpadded region of a ``padded_shape`` tensor (a view)."""
        return padded.narrow(self.dim, 0, self.shape[self.dim]) if self.axis != "tensor" else padded


def _group_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` per group with ``zero ≤ low`` and ``zero + qmax·scale ≥ high`` (directed rounding)."""
    qmax = (1 << bits) - 1
    precise = torch.float32 if low.device.type == "mps" else torch.float64
    low, high = low.to(precise), high.to(precise)
    zero = low.to(torch.float16)
    zero = torch.where(zero.to(precise) > low, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    exact = (high - zero.to(precise)) / qmax
    scale = exact.to(torch.float16)
    scale = torch.where(scale.to(precise) < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    if not bool((torch.isfinite(scale).all() & torch.isfinite(zero).all()).item()):
        raise QuantizationError("cannot quantize non-finite values or values outside the fp16 range (|x| > 65504)")
    return scale, zero


# --- quantized tensor -----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class QuantizedTensor:
    """A quantized KV tensor.

    Attributes
    ----------
    packed : torch.Tensor
        uint8 ``[⌈n·bits/8⌉]``: the codes of the ``n`` quantized elements (all but the sink tokens, row-major).
    scales, zeros : torch.Tensor
        fp16, one per group. For a body ``[*lead, T, D]`` (``T`` = tokens after the sink): ``[*lead, ⌈T/G⌉, D]``
        for ``"channel"``, ``[*lead, T, ⌈D/G⌉]`` for ``"token"``, ``[1]`` for ``"tensor"``.
    bits : int
        Code width, one of :data:`ALLOWED_BITS`.
    group_size : int
        ``G``, the group length along the grouped axis (0 for ``"tensor"``).
    axis : str
        ``"channel"``, ``"token"`` or ``"tensor"``.
    shape : tuple[int, ...]
        The original shape ``[*lead, tokens, head_dim]``.
    dtype : torch.dtype
        The original dtype (fp16, bf16 or fp32); :meth:`dequantize` returns it.
    sink : torch.Tensor or None
        The first ``keep`` tokens unquantized, ``[*lead, keep, head_dim]`` in the original dtype (exact).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sink: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.axis not in AXES:
            raise QuantizationError(f"axis must be one of {AXES}, got {self.axis!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise QuantizationError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        self.shape = tuple(int(size) for size in self.shape)
        if len(self.shape) < 2 or min(self.shape) < 0:
            raise QuantizationError(f"shape must be [..., tokens, head_dim], got {list(self.shape)}")
        if self.axis == "tensor" and self.group_size != 0:
            raise QuantizationError(f"group_size must be 0 for axis 'tensor', got {self.group_size}")
        if self.axis != "tensor" and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                      or self.group_size < 1):
            raise QuantizationError(f"group_size must be a positive int, got {self.group_size!r}")
        keep = self.keep
        if keep > self.shape[-2]:
            raise QuantizationError(f"{keep} sink tokens exceed the tensor's {self.shape[-2]} tokens")
        if self.sink is not None:
            expected = (*self.shape[:-2], keep, self.shape[-1])
            if self.sink.dtype != self.dtype or tuple(self.sink.shape) != expected:
                raise QuantizationError(f"sink must be {self.dtype} {list(expected)}, "
                                        f"got {self.sink.dtype} {list(self.sink.shape)}")
        count = math.prod(self.body_shape)
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1 or self.packed.numel() != packed_size(count, self.bits):
            raise QuantizationError(f"packed codes must be uint8 [{packed_size(count, self.bits)}], "
                                    f"got {self.packed.dtype} {list(self.packed.shape)}")
        expected = self._layout().scale_shape
        for name in ("scales", "zeros"):
            value = getattr(self, name)
            if value.dtype != torch.float16 or tuple(value.shape) != expected:
                raise QuantizationError(f"{name} must be float16 {list(expected)}, got {value.dtype} {list(value.shape)}")

    @property
    def keep(self) -> int:
        """Number of leading tokens stored unquantized."""
        return 0 if self.sink is None else int(self.sink.shape[-2])

    @property
    def body_shape(self) -> tuple[int, ...]:
        """Shape of the quantized part ``[*lead, tokens − keep, head_dim]``."""
        return (*self.shape[:-2], self.shape[-2] - self.keep, self.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales, zeros and sink."""
        sink = 0 if self.sink is None else self.sink.numel() * self.sink.element_size()
        return self.packed.numel() + 2 * (self.scales.numel() + self.zeros.numel()) + sink

    def numel(self) -> int:
        """Elements of the original tensor."""
        return math.prod(self.shape)

    def _layout(self) -> _Layout:
        return _Layout(self.body_shape, self.axis, self.group_size)

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        layout = self._layout()
        grouped = per_group.float().unsqueeze(layout.reduce_dim).expand(layout.grouped_shape)
        return layout.real(grouped.reshape(layout.padded_shape))

    def element_scales(self) -> torch.Tensor:
        """The quantization step of every quantized element, fp32 ``body_shape`` (the error bound is half of it)."""
        return self._expand(self.scales)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, ``shape`` and ``dtype`` of the original."""
        device = self.packed.device
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        keep = self.keep
        if keep:
            out[..., :keep, :].copy_(self.sink)
        count = math.prod(self.body_shape)
        if count == 0:
            return out
        layout = self._layout()
        codes = _unpack(self.packed, self.bits, count).view(self.body_shape)
        work = torch.empty(layout.padded_shape, dtype=torch.float32, device=device)
        layout.real(work).copy_(codes)
        if layout.padded_shape != layout.shape:  # padding is dropped below; zero it so it is finite
            length = layout.shape[layout.dim]
            work.narrow(layout.dim, length, layout.padded_shape[layout.dim] - length).zero_()
        grouped = work.view(layout.grouped_shape)
        scale = self.scales.unsqueeze(layout.reduce_dim).float()
        zero = self.zeros.unsqueeze(layout.reduce_dim).float()
        torch.addcmul(zero, grouped, scale, out=grouped)
        out[..., keep:, :].copy_(layout.real(work))
        return out


def quantize(tensor: torch.Tensor, bits: int, group_size: int = 32, axis: Axis = "channel",
             keep_first_tokens: int = 0) -> QuantizedTensor:
    """Asymmetric uniform min–max quantization with bit-packed codes.

    Parameters
    ----------
    tensor : torch.Tensor
        fp16, bf16 or fp32 ``[..., tokens, head_dim]`` (a message holds ``[1, kv_heads, C, head_dim]``).
    bits : int
        Code width, one of :data:`ALLOWED_BITS`.
    group_size : int
        ``G``: tokens per group (``"channel"``) or channels per group (``"token"``); ignored for ``"tensor"``. A
        ``G`` that does not divide the axis leaves a shorter last group (padded internally, never transmitted); a
        ``G`` longer than the axis is shortened to it.
    axis : str
        ``"channel"`` (KIVI keys), ``"token"`` (KIVI values) or ``"tensor"`` (the paper's per-tensor preset).
    keep_first_tokens : int
        Leading tokens kept unquantized (the attention sink), in ``[0, tokens]``.

    Returns
    -------
    QuantizedTensor
    """
    _check_bits(bits)
    if axis not in AXES:
        raise QuantizationError(f"axis must be one of {AXES}, got {axis!r}")
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"can only quantize fp16, bf16 or fp32 tensors, got {getattr(tensor, 'dtype', type(tensor))}")
    if tensor.dim() < 2:
        raise QuantizationError(f"tensor must be [..., tokens, head_dim], got shape {list(tensor.shape)}")
    if axis != "tensor" and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise QuantizationError(f"group_size must be a positive int, got {group_size!r}")
    tokens = tensor.shape[-2]
    if isinstance(keep_first_tokens, bool) or not isinstance(keep_first_tokens, int) or not 0 <= keep_first_tokens <= tokens:
        raise QuantizationError(f"keep_first_tokens must be an int in [0, {tokens}], got {keep_first_tokens!r}")
    keep, device = keep_first_tokens, tensor.device
    sink = None
    if keep:
        sink = torch.empty((*tensor.shape[:-2], keep, tensor.shape[-1]), dtype=tensor.dtype, device=device)
        sink.copy_(tensor[..., :keep, :])
    body = tensor[..., keep:, :]
    body_shape = tuple(body.shape)
    if axis == "tensor":
        group = 0
    else:
        length = body_shape[-2] if axis == "channel" else body_shape[-1]
        group = min(group_size, length) if length else group_size
    layout = _Layout(body_shape, axis, group)
    count = body.numel()
    if count == 0:
        empty = torch.zeros(layout.scale_shape, dtype=torch.float16, device=device)
        return QuantizedTensor(torch.empty(0, dtype=torch.uint8, device=device), empty, empty.clone(), bits, group,
                               axis, tuple(tensor.shape), tensor.dtype, sink)
    # one fp32 working copy, padded by repeating the last row/column so padding never widens a group's range
    work = torch.empty(layout.padded_shape, dtype=torch.float32, device=device)
    real = layout.real(work)
    real.copy_(body)
    if layout.padded_shape != body_shape:
        length = body_shape[layout.dim]
        work.narrow(layout.dim, length, layout.padded_shape[layout.dim] - length).copy_(body.narrow(layout.dim, length - 1, 1))
    grouped = work.view(layout.grouped_shape)
    scale, zero = _group_params(grouped.amin(layout.reduce_dim, keepdim=True), grouped.amax(layout.reduce_dim, keepdim=True), bits)
    scale32 = scale.float()
    inverse = torch.where(scale32 > 0, scale32.reciprocal(), torch.zeros_like(scale32))
    grouped.sub_(zero.float() - 0.5 * scale32).mul_(inverse)  # now (x − zero)/scale + ½, in [½, qmax + ½]
    codes = torch.empty(-(-count // 8) * 8, dtype=torch.uint8, device=device)
    codes[:count].view(body_shape).copy_(real)  # the float → uint8 cast truncates: ⌊·⌋
    codes[count:].zero_()
    packed = _pack_words(codes, bits)[: packed_size(count, bits)]
    return QuantizedTensor(packed, scale.squeeze(layout.reduce_dim).contiguous(), zero.squeeze(layout.reduce_dim).contiguous(),
                           bits, group, axis, tuple(tensor.shape), tensor.dtype, sink)


KVTensor = Union[torch.Tensor, QuantizedTensor]


def as_tensor(value: KVTensor) -> torch.Tensor:
    """A plain tensor: ``value`` itself, or its dequantization."""
    return value.dequantize() if isinstance(value, QuantizedTensor) else value


# --- whole messages ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVQuantConfig:
    """How :func:`quantize_message` quantizes a message (uniform widths; per-layer widths are passed separately).

    Defaults follow KIVI (keys per channel, values per token, ``G = 32``) with the sink token kept unquantized.
    """

    key_bits: int = 4
    value_bits: int = 4
    group_size: int = 32
    key_axis: Axis = "channel"
    value_axis: Axis = "token"
    keep_sink: int = 1  # leading context tokens kept unquantized in every selected layer (0: quantize everything)

    def __post_init__(self) -> None:
        _check_bits(self.key_bits)
        _check_bits(self.value_bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise QuantizationError(f"group_size must be a positive int, got {self.group_size!r}")
        for name in ("key_axis", "value_axis"):
            if getattr(self, name) not in AXES:
                raise QuantizationError(f"{name} must be one of {AXES}, got {getattr(self, name)!r}")
        if isinstance(self.keep_sink, bool) or not isinstance(self.keep_sink, int) or self.keep_sink < 0:
            raise QuantizationError(f"keep_sink must be a non-negative int, got {self.keep_sink!r}")


QKVCOMM_CONFIG = KVQuantConfig(key_bits=6, value_bits=6, key_axis="tensor", value_axis="tensor", keep_sink=0)
"""The Q-KVComm paper's quantizer (QKVCOMM.md §3.2): one (scale, zero) per K or V tensor, no sink; widths come from
:func:`rank_rule_bits`, the same for K and V."""


def _raw(value: KVTensor, what: str) -> torch.Tensor:
    if isinstance(value, QuantizedTensor):
        raise QuantizationError(f"{what} is already quantized")
    return value


def _per_layer(layers: Sequence[int], given: Mapping[int, int] | None, default: int, what: str) -> dict[int, int]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(layers))
    if unknown:
        raise QuantizationError(f"{what} names layers {unknown} that the message does not carry (it has {list(layers)})")
    return {layer: _check_bits(given.get(layer, default)) for layer in layers}


def quantize_message(message: KVMessage, config: KVQuantConfig | None = None, key_bits: Mapping[int, int] | None = None,
                     value_bits: Mapping[int, int] | None = None) -> KVMessage:
    """A copy of ``message`` whose ``keys``/``values`` are :class:`QuantizedTensor` (sink-only layers stay as they are).

    Parameters
    ----------
    message : KVMessage
        Unquantized; ``keys[l]``/``values[l]`` are ``[1, kv_heads, C, head_dim]``.
    config : KVQuantConfig, optional
        Axes, group size, sink and default widths.
    key_bits, value_bits : Mapping[int, int], optional
        Per-layer widths ``{layer: bits}``; layers left out use ``config.key_bits`` / ``config.value_bits``.
    """
    config = config or KVQuantConfig()
    key_widths = _per_layer(message.layers, key_bits, config.key_bits, "key_bits")
    value_widths = _per_layer(message.layers, value_bits, config.value_bits, "value_bits")
    keep = min(config.keep_sink, message.context_length)
    keys = {layer: quantize(_raw(message.keys[layer], f"keys[{layer}]"), key_widths[layer], config.group_size,
                            config.key_axis, keep) for layer in message.layers}
    values = {layer: quantize(_raw(message.values[layer], f"values[{layer}]"), value_widths[layer], config.group_size,
                              config.value_axis, keep) for layer in message.layers}
    quantized = replace(message, keys=keys, values=values, sink_keys=dict(message.sink_keys),
                        sink_values=dict(message.sink_values))
    logger.debug("quantized %d layers: %d → %d bytes", len(message.layers), message.nbytes, quantized.nbytes)
    return quantized


def dequantize_message(message: KVMessage) -> KVMessage:
    """A copy of ``message`` with every :class:`QuantizedTensor` replaced by its dequantization."""
    return replace(message, keys={layer: as_tensor(value) for layer, value in message.keys.items()},
                   values={layer: as_tensor(value) for layer, value in message.values.items()},
                   sink_keys=dict(message.sink_keys), sink_values=dict(message.sink_values))
