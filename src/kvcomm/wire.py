"""Wire format version 1: a :class:`~kvcomm.message.KVMessage` as one safetensors payload (``ANCHORS.md`` §4).

Layout (standard safetensors, readable by ``safetensors.torch.load``; never pickle): an 8-byte little-endian header
length, a JSON header padded with spaces to a multiple of 8 bytes, then the tensor bytes, ordered by element size
(largest first) and name, exactly as ``safetensors.torch.save`` orders them. Tensors:

* ``keys.{l}`` / ``values.{l}``: raw fp16/bf16/fp32 ``[1, kv_heads, C, head_dim]``; or, when quantized,
  ``keys.{l}.packed`` (uint8 codes), ``keys.{l}.scales`` / ``keys.{l}.zeros`` (fp16) and ``keys.{l}.sink`` (the
  unquantized leading tokens, when kept);
* ``sink_keys.{l}`` / ``sink_values.{l}``: the sink tokens of non-selected layers.

The safetensors metadata holds one entry, ``"kvcomm"``: canonical JSON (sorted keys, no spaces, ASCII) with
``format``, ``version``, the sender ``fingerprint``, ``layers``, ``context_length``, ``sink_tokens``, per-layer
``keys``/``values`` descriptions (raw: dtype and shape; quantized: bits, group size, axis, sink length, original
dtype and shape), the ``sink_keys``/``sink_values`` shapes, and ``checksum``: the CRC-32 of the canonical JSON
without the checksum followed by every tensor's bytes in name order (CRC-32 detects every burst error up to 32 bits
and runs at several GB/s; it guards against corruption, not tampering — authenticate the transport for that). Any flipped byte therefore fails decoding
(``WireFormatError``), whether it lands in the header or in the tensor data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy
import torch

from kvcomm.errors import WireFormatError
from kvcomm.message import KVMessage
from kvcomm.models import Fingerprint
from kvcomm.quant import AXES, QuantizedTensor

logger = logging.getLogger(__name__)

FORMAT = "kvcomm.kv-message"
VERSION = 1
METADATA_KEY = "kvcomm"
MAX_HEADER_BYTES = 100_000_000

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
_FROM_CODE = {code: dtype for dtype, code in _CODES.items()}
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FROM_NAME = {name: dtype for dtype, name in _NAMES.items()}

Buffer = Union[bytes, bytearray, memoryview]


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _raw_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer, without copying a CPU contiguous tensor."""
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    return flat.view(torch.uint8).numpy()


# --- message → header + tensors ---------------------------------------------------------------------------------------

def _describe(message: KVMessage) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header (without checksum) and the named tensors of ``message``."""
    if not isinstance(message, KVMessage):
        raise WireFormatError(f"can only encode a KVMessage, got {type(message).__name__}")
    header: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "fingerprint": message.fingerprint.to_dict(),
        "layers": [int(layer) for layer in message.layers], "context_length": int(message.context_length),
        "sink_tokens": int(message.sink_tokens),
    }
    tensors: dict[str, torch.Tensor] = {}
    for part in ("keys", "values"):
        entries = header[part] = {}
        for layer, value in sorted(getattr(message, part).items()):
            name = f"{part}.{int(layer)}"
            if isinstance(value, QuantizedTensor):
                entries[str(layer)] = {"kind": "quantized", "bits": value.bits, "group_size": value.group_size,
                                       "axis": value.axis, "keep": value.keep, "dtype": _dtype_name(value.dtype),
                                       "shape": list(value.shape)}
                tensors[f"{name}.packed"], tensors[f"{name}.scales"] = value.packed, value.scales
                tensors[f"{name}.zeros"] = value.zeros
                if value.sink is not None:
                    tensors[f"{name}.sink"] = value.sink
            elif isinstance(value, torch.Tensor):
                entries[str(layer)] = {"kind": "raw", "dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
                tensors[name] = value
            else:
                raise WireFormatError(f"{name} is a {type(value).__name__}, not a tensor or QuantizedTensor")
    for part in ("sink_keys", "sink_values"):
        entries = header[part] = {}
        for layer, value in sorted(getattr(message, part).items()):
            entries[str(layer)] = {"dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
            tensors[f"{part}.{int(layer)}"] = value
    _check_header(header)
    return header, tensors


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise WireFormatError(f"wire format v{VERSION} carries fp16, bf16 or fp32 KV, not {dtype}")
    return _NAMES[dtype]


def _checksum(header: dict[str, Any], buffers: Sequence[Any]) -> str:
    value = zlib.crc32(_canonical(header))
    for buffer in buffers:
        value = zlib.crc32(buffer, value)
    return f"{value:08x}"


def _container(metadata: str, tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The safetensors header (8-byte length + padded JSON) and the tensor names in data order."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata}}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _parts(message: KVMessage) -> list[Any]:
    header, tensors = _describe(message)
    buffers = {name: _raw_bytes(tensor) for name, tensor in tensors.items()}
    header["checksum"] = {"crc32": _checksum(header, [buffers[name] for name in sorted(buffers)])}
    prefix, order = _container(_canonical(header).decode("ascii"), tensors)
    return [prefix, *(buffers[name] for name in order)]


def encode(message: KVMessage) -> bytes:
    """Serialise ``message`` (raw or quantized entries) to wire-format-v1 bytes; tensors may live on any device."""
    return b"".join(_parts(message))


def encoded_size(message: KVMessage) -> int:
    """The exact length of :func:`encode`'s output, computed from shapes and dtypes without touching tensor data."""
    header, tensors = _describe(message)
    header["checksum"] = {"crc32": "0" * 8}  # always 8 hex characters
    prefix, _ = _container(_canonical(header).decode("ascii"), tensors)
    return len(prefix) + sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def write(message: KVMessage, path: str | os.PathLike[str]) -> int:
    """Write ``message`` to ``path`` atomically (temporary file + rename); returns the bytes written."""
    path = Path(path)
    parts = _parts(message)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            for part in parts:
                handle.write(part)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    size = sum(memoryview(part).nbytes for part in parts)
    logger.debug("wrote a %d-layer message (%d bytes) to %s", len(message.layers), size, path)
    return size


# --- bytes → message ------------------------------------------------------------------------------------------------

def decode(data: Buffer) -> KVMessage:
    """Parse wire-format-v1 bytes into a :class:`KVMessage` (CPU tensors, independent of ``data``).

    Raises
    ------
    WireFormatError
        For anything but a complete, uncorrupted version-1 message; nothing is returned half-built.
    """
    return _decode(data, owned=False)


def read(path: str | os.PathLike[str]) -> KVMessage:
    """Read a message written by :func:`write` (``OSError`` if the file cannot be read)."""
    path = Path(path)
    buffer = bytearray(path.stat().st_size)
    with open(path, "rb") as handle:
        got = handle.readinto(buffer)
    if got != len(buffer):
        raise WireFormatError(f"{path}: read {got} of {len(buffer)} bytes (the file changed while reading)")
    return _decode(buffer, owned=True)


def _decode(data: Buffer, owned: bool) -> KVMessage:
    try:
        return _parse(data, owned)
    except WireFormatError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # any other failure (bad types, shapes, QuantizationError, ...) is a malformed payload
        raise WireFormatError(f"malformed kvcomm message: {type(error).__name__}: {error}") from error


def _fail(condition: bool, reason: str) -> None:
    if condition:
        raise WireFormatError(reason)


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _parse(data: Buffer, owned: bool) -> KVMessage:
    try:
        view = memoryview(data).cast("B")
    except TypeError as error:
        raise WireFormatError(f"expected bytes, got {type(data).__name__}") from error
    _fail(len(view) < 8, f"truncated: {len(view)} bytes, a message starts with an 8-byte header length")
    size = int.from_bytes(view[:8], "little")
    _fail(size > MAX_HEADER_BYTES, f"not a kvcomm message: header length {size} is implausible")
    _fail(8 + size > len(view), f"truncated: the header needs {size} bytes, only {len(view) - 8} follow")
    try:
        container = json.loads(bytes(view[8:8 + size]))
    except (UnicodeDecodeError, ValueError) as error:
        raise WireFormatError(f"not a kvcomm message: the header is not JSON ({error})") from error
    _fail(not isinstance(container, dict), "not a kvcomm message: the header is not a JSON object")
    metadata = container.pop("__metadata__", None)
    _fail(not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str),
          f"not a kvcomm message: no '{METADATA_KEY}' metadata in the safetensors header")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise WireFormatError(f"malformed kvcomm header: {error}") from error
    _fail(not isinstance(header, dict) or header.get("format") != FORMAT,
          f"not a kvcomm message: format is {header.get('format') if isinstance(header, dict) else None!r}, expected {FORMAT!r}")
    _fail(header.get("version") != VERSION,
          f"unsupported wire format version {header.get('version')!r}; this kvcomm reads version {VERSION}")
    region = view[8 + size:]
    spans = _spans(container, len(region))
    checksum = header.pop("checksum", None)
    _fail(not isinstance(checksum, dict) or not isinstance(checksum.get("crc32"), str), "the header has no crc32 checksum")
    actual = _checksum(header, [region[spans[name][0]:spans[name][1]] for name in sorted(spans)])
    _fail(actual != checksum["crc32"], "checksum mismatch: the message was corrupted in transit or storage")
    _check_header(header)
    tensors = {}
    if owned:  # zero-copy views of a buffer nobody else holds (read())
        storage = torch.frombuffer(data, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)
        for name, (begin, end) in spans.items():
            entry = container[name]
            tensors[name] = storage[8 + size + begin:8 + size + end].view(_FROM_CODE[entry["dtype"]]).view(entry["shape"])
    else:  # one copy per tensor: tensors must not alias (possibly read-only) caller memory
        for name, (begin, end) in spans.items():
            entry = container[name]
            tensor = torch.empty(entry["shape"], dtype=_FROM_CODE[entry["dtype"]])
            if end > begin:
                tensor.view(-1).view(torch.uint8).numpy()[:] = numpy.frombuffer(region, numpy.uint8, end - begin, begin)
            tensors[name] = tensor
    return _build(header, tensors)


def _spans(container: dict[str, Any], available: int) -> dict[str, tuple[int, int]]:
    """Validated ``{name: (begin, end)}``: known dtypes, sizes matching shapes, contiguous and covering the data."""
    spans = {}
    for name, entry in container.items():
        _fail(not isinstance(entry, dict), f"tensor {name!r}: malformed entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        _fail(dtype not in _FROM_CODE, f"tensor {name!r}: unsupported dtype {dtype!r}")
        _fail(not isinstance(shape, list) or not all(_is_int(s) for s in shape), f"tensor {name!r}: bad shape {shape!r}")
        _fail(not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets),
              f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * _FROM_CODE[dtype].itemsize
        _fail(end - begin != expected, f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
        spans[name] = (begin, end)
    position = 0
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        _fail(begin != position, f"tensor {name!r}: data starts at {begin}, expected {position} (gap or overlap)")
        position = end
    _fail(position > available, f"truncated: tensor data needs {position} bytes, only {available} present")
    _fail(position < available, f"malformed: {available - position} trailing bytes after the tensor data")
    return spans


def _check_header(header: dict[str, Any]) -> None:
    """Types and consistency of the kvcomm header (shapes against context length and sink tokens)."""
    layers, context, sink = header.get("layers"), header.get("context_length"), header.get("sink_tokens")
    _fail(not isinstance(layers, list) or not all(_is_int(layer) for layer in layers) or layers != sorted(set(layers)),
          f"layers must be sorted unique non-negative ints, got {layers!r}")
    _fail(not _is_int(context), f"context_length must be a non-negative int, got {context!r}")
    _fail(not _is_int(sink) or sink > context, f"sink_tokens must be an int in [0, context_length], got {sink!r}")
    fingerprint = header.get("fingerprint")
    _fail(not isinstance(fingerprint, dict) or set(fingerprint) != set(Fingerprint.__dataclass_fields__)
          or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in fingerprint.values()),
          "the fingerprint is missing fields or has non-string, non-integer values")
    for part in ("keys", "values", "sink_keys", "sink_values"):
        entries = header.get(part)
        _fail(not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()),
              f"{part} must be an object of per-layer entries")
        for key, entry in entries.items():
            _fail(not key.isdigit() or str(int(key)) != key, f"{part}: bad layer key {key!r}")
            shape = entry.get("shape")
            _fail(entry.get("dtype") not in _FROM_NAME, f"{part}[{key}]: unsupported dtype {entry.get('dtype')!r}")
            _fail(not isinstance(shape, list) or len(shape) != 4 or not all(_is_int(s) for s in shape),
                  f"{part}[{key}]: shape must be 4 non-negative ints, got {shape!r}")
            tokens = context if part in ("keys", "values") else sink
            _fail(shape[2] != tokens, f"{part}[{key}]: {shape[2]} tokens, expected {tokens}")
            if part in ("keys", "values"):
                kind = entry.get("kind")
                _fail(kind not in ("raw", "quantized"), f"{part}[{key}]: unknown kind {kind!r}")
                if kind == "quantized":
                    _fail(not all(_is_int(entry.get(field)) for field in ("bits", "group_size", "keep"))
                          or entry.get("axis") not in AXES, f"{part}[{key}]: malformed quantization entry")
    _fail(sorted(int(k) for k in header["keys"]) != layers or sorted(int(k) for k in header["values"]) != layers,
          "keys and values must describe exactly the listed layers")
    _fail(sorted(header["sink_keys"]) != sorted(header["sink_values"]), "sink_keys and sink_values name different layers")
    _fail(bool({int(k) for k in header["sink_keys"]} & set(layers)), "a layer is both selected and sink-only")


def _build(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> KVMessage:
    """The message described by a checked header, from tensors whose names, dtypes and shapes must match it."""
    used: set[str] = set()

    def take(name: str, dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
        _fail(name not in tensors, f"tensor {name!r} is missing")
        tensor = tensors[name]
        _fail(tensor.dtype != dtype or (shape is not None and list(tensor.shape) != list(shape)),
              f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape or [])}")
        used.add(name)
        return tensor

    parts: dict[str, dict[int, Any]] = {}
    for part in ("keys", "values"):
        parts[part] = {}
        for key, entry in header[part].items():
            name, dtype = f"{part}.{key}", _FROM_NAME[entry["dtype"]]
            if entry["kind"] == "raw":
                parts[part][int(key)] = take(name, dtype, entry["shape"])
            else:
                sink = take(f"{name}.sink", dtype) if entry["keep"] else None
                parts[part][int(key)] = QuantizedTensor(
                    take(f"{name}.packed", torch.uint8), take(f"{name}.scales", torch.float16),
                    take(f"{name}.zeros", torch.float16), entry["bits"], entry["group_size"], entry["axis"],
                    tuple(entry["shape"]), dtype, sink)
    for part in ("sink_keys", "sink_values"):
        parts[part] = {int(key): take(f"{part}.{key}", _FROM_NAME[entry["dtype"]], entry["shape"])
                       for key, entry in header[part].items()}
    extra = sorted(set(tensors) - used)
    _fail(bool(extra), f"unexpected tensors {extra}")
    return KVMessage(tuple(header["layers"]), parts["keys"], parts["values"], parts["sink_keys"], parts["sink_values"],
                     header["context_length"], header["sink_tokens"], Fingerprint.from_dict(header["fingerprint"]))
