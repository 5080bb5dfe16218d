"""Wire format v1: exact round trips, exact size, safetensors compatibility, and a WireFormatError for every kind of
bad payload."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from kvcomm import wire
from kvcomm.errors import KVCommError, WireFormatError
from kvcomm.message import KVMessage, encode_context, receiver_cache
from kvcomm.quant import KVQuantConfig, QuantizedTensor, as_tensor, quantize, quantize_message
from tests.test_quant import FINGERPRINT, make_message


def assert_same_message(decoded: KVMessage, original: KVMessage) -> None:
    assert decoded.layers == original.layers
    assert (decoded.context_length, decoded.sink_tokens) == (original.context_length, original.sink_tokens)
    assert decoded.fingerprint == original.fingerprint
    for part in ("keys", "values", "sink_keys", "sink_values"):
        mine, theirs = getattr(decoded, part), getattr(original, part)
        assert mine.keys() == theirs.keys()
        for layer in theirs:
            assert type(mine[layer]) is type(theirs[layer])
            if isinstance(theirs[layer], QuantizedTensor):
                q, r = mine[layer], theirs[layer]
                assert (q.bits, q.group_size, q.axis, q.shape, q.dtype, q.keep) == (r.bits, r.group_size, r.axis, r.shape, r.dtype, r.keep)
            a, b = as_tensor(mine[layer]), as_tensor(theirs[layer])
            assert a.dtype == b.dtype and torch.equal(a, b)


def quantized_message() -> KVMessage:
    message = make_message(layers=(0, 1, 3), context=11, dtype=torch.float16)
    return quantize_message(message, KVQuantConfig(group_size=4), key_bits={0: 2, 1: 3, 3: 6}, value_bits={0: 8, 1: 4, 3: 2})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sink", [True, False])
def test_unquantized_round_trip_is_exact(dtype, sink):
    message = make_message(dtype=dtype)
    if not sink:
        message = KVMessage(message.layers, message.keys, message.values, {}, {}, message.context_length, 0, FINGERPRINT)
    payload = wire.encode(message)
    assert isinstance(payload, bytes) and len(payload) == wire.encoded_size(message)
    decoded = wire.decode(payload)
    assert_same_message(decoded, message)
    decoded.keys[0].add_(1)  # decoded tensors are writable and independent of the payload
    assert_same_message(wire.decode(payload), message)


def test_quantized_round_trip_matches_pre_encode_dequantization():
    message = quantized_message()
    payload = wire.encode(message)
    assert len(payload) == wire.encoded_size(message)
    decoded = wire.decode(payload)
    assert_same_message(decoded, message)
    assert decoded.nbytes == message.nbytes


def test_mixed_and_per_tensor_entries_round_trip():
    message = make_message(layers=(0, 2), dtype=torch.bfloat16)
    message.keys[2] = quantize(message.keys[2], 4, axis="tensor")  # per-tensor preset, no sink
    message.values[2] = quantize(message.values[2], 3, 64, "token", keep_first_tokens=9)  # all tokens kept
    payload = wire.encode(message)
    assert len(payload) == wire.encoded_size(message)
    assert_same_message(wire.decode(payload), message)


def test_payload_is_standard_safetensors():
    message = quantized_message()
    payload = wire.encode(message)
    header_length = struct.unpack("<Q", payload[:8])[0]
    metadata = json.loads(payload[8:8 + header_length])["__metadata__"]
    assert set(metadata) == {"kvcomm"}
    header = json.loads(metadata["kvcomm"])
    assert header["format"] == wire.FORMAT and header["version"] == 1 and len(header["checksum"]["crc32"]) == 8
    assert header["keys"]["1"] == {"kind": "quantized", "bits": 3, "group_size": 4, "axis": "channel", "keep": 1,
                                   "dtype": "float16", "shape": [1, 2, 11, 16]}
    loaded = safetensors.torch.load(payload)
    assert torch.equal(loaded["keys.1.packed"], message.keys[1].packed)
    assert torch.equal(loaded["sink_values.2"], message.sink_values[2])
    _, tensors = wire._describe(message)
    assert safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata) == payload


def test_write_and_read(tmp_path):
    message = quantized_message()
    path = tmp_path / "message.kv"
    assert wire.write(message, path) == wire.encoded_size(message)
    assert path.read_bytes() == wire.encode(message)
    assert [p.name for p in tmp_path.iterdir()] == ["message.kv"]
    assert_same_message(wire.read(path), message)


def test_decoded_message_drives_the_receiver(tiny):
    context = torch.tensor([[0, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
    query = torch.tensor([[87, 104, 111, 63]])
    message = quantize_message(encode_context(tiny, context, (0, 2)), KVQuantConfig(key_bits=4, value_bits=2, group_size=4))
    decoded = wire.decode(wire.encode(message))

    def logits(shared):
        mask = torch.ones(1, shared.context_length + query.shape[-1], dtype=torch.long)
        with torch.no_grad():
            return tiny.model(input_ids=query, attention_mask=mask, cache=receiver_cache(shared, tiny)).logits

    assert torch.equal(logits(decoded), logits(message))


# --- bad payloads -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True])
def test_every_flipped_byte_is_detected(quantized):
    message = quantized_message() if quantized else make_message(context=5, head_dim=8, dtype=torch.float16)
    payload = wire.encode(message)
    for position in range(len(payload)):
        corrupted = bytearray(payload)
        corrupted[position] ^= 0x01 if position % 2 else 0x80
        with pytest.raises(WireFormatError):
            wire.decode(bytes(corrupted))


def test_corrupted_tensor_data_reports_a_checksum_mismatch():
    payload = bytearray(wire.encode(quantized_message()))
    payload[-3] ^= 0xFF
    with pytest.raises(WireFormatError, match="checksum"):
        wire.decode(bytes(payload))


def test_truncated_payloads_are_rejected():
    payload = wire.encode(quantized_message())
    header_end = 8 + struct.unpack("<Q", payload[:8])[0]
    for length in (0, 3, 8, 20, header_end - 1, header_end, header_end + 5, len(payload) - 1):
        with pytest.raises(WireFormatError, match="truncated"):
            wire.decode(payload[:length])
    with pytest.raises(WireFormatError, match="trailing"):
        wire.decode(payload + b"\0")


def test_wrong_version_is_rejected(monkeypatch):
    message = make_message()
    monkeypatch.setattr(wire, "VERSION", 2)
    payload = wire.encode(message)
    monkeypatch.setattr(wire, "VERSION", 1)
    with pytest.raises(WireFormatError, match="version 2"):
        wire.decode(payload)


def test_garbage_and_foreign_payloads_are_rejected():
    generator = torch.Generator().manual_seed(0)
    garbage = [b"", b"hello world", bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).tolist()),
               struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 4) + b"[1] ", struct.pack("<Q", 2**62) + b"x" * 16,
               safetensors.torch.save({"keys.0": torch.zeros(3)}),
               safetensors.torch.save({"keys.0": torch.zeros(3)}, {"kvcomm": json.dumps({"format": "other"})})]
    for payload in garbage:
        with pytest.raises(WireFormatError):
            wire.decode(payload)
    for not_bytes in (None, 123, "text"):
        with pytest.raises(WireFormatError):
            wire.decode(not_bytes)  # type: ignore[arg-type]
    assert issubclass(WireFormatError, KVCommError)


def _forge(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """A payload with a valid checksum for an arbitrary (inconsistent) header: structure must still be validated."""
    header = dict(header)
    header.pop("checksum", None)
    buffers = [wire._raw_bytes(tensors[name]) for name in sorted(tensors)]
    header["checksum"] = {"crc32": wire._checksum(header, buffers)}
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                  {"kvcomm": wire._canonical(header).decode()})


def test_consistently_checksummed_but_malformed_messages_are_rejected():
    message = quantized_message()
    header, tensors = wire._describe(message)
    assert_same_message(wire.decode(_forge(header, tensors)), message)  # the forging itself is faithful
    cases = []
    cases.append((dict(header, context_length=12), tensors))
    cases.append((header, dict(tensors, extra=torch.zeros(1))))
    cases.append((header, {k: v for k, v in tensors.items() if k != "keys.0.scales"}))
    cases.append((dict(header, keys=dict(header["keys"], **{"1": dict(header["keys"]["1"], bits=4)})), tensors))
    cases.append((dict(header, layers=[0, 1]), tensors))
    cases.append((dict(header, fingerprint={"model_id": "x"}), tensors))
    cases.append((dict(header, sink_tokens=99), tensors))
    cases.append((header, dict(tensors, **{"keys.0.scales": tensors["keys.0.scales"].float()})))
    for bad_header, bad_tensors in cases:
        with pytest.raises(WireFormatError):
            wire.decode(_forge(bad_header, bad_tensors))


def test_unencodable_messages_raise():
    message = make_message()
    message.keys[0] = message.keys[0].double()
    with pytest.raises(WireFormatError):
        wire.encode(message)
    with pytest.raises(WireFormatError):
        wire.encode("not a message")  # type: ignore[arg-type]
