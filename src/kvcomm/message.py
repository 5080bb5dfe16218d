"""The KV message: what a sender shares with a receiver, and how the receiver turns it into a cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvcomm import _hf
from kvcomm.depth import nearest_sender_layer, receiver_sources
from kvcomm.errors import LayerSelectionError, PromptError
from kvcomm.models import Fingerprint, LoadedModel, check_compatible
from kvcomm.quant import KVTensor, QuantizedTensor, as_tensor


@dataclass
class KVMessage:
    """Post-RoPE keys and values of the sender's selected layers.

    ``keys[l]`` / ``values[l]``: ``[1, kv_heads, context_length, head_dim]`` for every selected layer ``l``, with RoPE
    positions ``0 .. context_length-1``. ``sink_keys[l]`` / ``sink_values[l]``: ``[1, kv_heads, sink_tokens, head_dim]``
    for every non-selected layer (empty dicts when ``sink_tokens == 0``). ``keys``/``values`` entries may also be
    :class:`~kvcomm.quant.QuantizedTensor` (see :func:`kvcomm.quant.quantize_message`).
    """

    layers: tuple[int, ...]
    keys: dict[int, KVTensor]
    values: dict[int, KVTensor]
    sink_keys: dict[int, torch.Tensor]
    sink_values: dict[int, torch.Tensor]
    context_length: int
    sink_tokens: int
    fingerprint: Fingerprint

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor in the message at its dtype (packed codes + scales + zeros + sink when quantized)."""
        tensors = [*self.keys.values(), *self.values.values(), *self.sink_keys.values(), *self.sink_values.values()]
        return sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for t in tensors)

    def restrict(self, layers: tuple[int, ...] | list[int], sink_tokens: int = 1) -> "KVMessage":
        """This message cut down to ``layers`` (a subset of :attr:`layers`); every other layer it holds keeps only
        its first ``sink_tokens`` positions as a sink. Sends nothing new: one sender prefill serves many selections."""
        chosen = tuple(sorted(set(int(layer) for layer in layers)))
        missing = [layer for layer in chosen if layer not in self.keys]
        if missing:
            raise LayerSelectionError(f"layers {missing} are not in this message (it holds {list(self.layers)})")
        if not 0 <= sink_tokens <= self.context_length:
            raise LayerSelectionError(f"sink_tokens must be in [0, {self.context_length}], got {sink_tokens}")
        if self.sink_keys and sink_tokens != self.sink_tokens:
            raise LayerSelectionError(f"this message already keeps {self.sink_tokens} sink token(s); got {sink_tokens}")
        dropped = [layer for layer in self.layers if layer not in chosen]
        kept = dropped if sink_tokens else []
        sinks = {layer: (as_tensor(self.keys[layer])[..., :sink_tokens, :],
                         as_tensor(self.values[layer])[..., :sink_tokens, :]) for layer in kept}
        return dataclasses.replace(
            self, layers=chosen, keys={layer: self.keys[layer] for layer in chosen},
            values={layer: self.values[layer] for layer in chosen},
            sink_keys={**self.sink_keys, **{layer: pair[0] for layer, pair in sinks.items()}},
            sink_values={**self.sink_values, **{layer: pair[1] for layer, pair in sinks.items()}},
            sink_tokens=sink_tokens if dropped else self.sink_tokens)


def validate_layers(layers: list[int] | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Sorted unique layer indices, each in ``[0, num_layers)``; raises :class:`LayerSelectionError` otherwise."""
    chosen = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise LayerSelectionError(f"layer indices {bad} are out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    return tuple(chosen)


def check_window(model: LoadedModel, total_tokens: int, what: str) -> None:
    if total_tokens > model.max_positions:
        raise PromptError(
            f"{what} needs {total_tokens} positions but {model.name} allows {model.max_positions}; "
            "shorten the context or lower max_new_tokens"
        )


@torch.no_grad()
def encode_context(
    sender: LoadedModel, context_ids: torch.Tensor, layers: list[int] | tuple[int, ...], sink_tokens: int = 1
) -> KVMessage:
    """Prefill the sender once over ``context_ids`` ``[1, C]`` and package the KV of ``layers``."""
    chosen = validate_layers(layers, sender.num_layers)
    context_length = int(context_ids.shape[-1])
    if context_length == 0:
        raise PromptError("the sender's context is empty")
    if not 0 <= sink_tokens <= context_length:
        raise LayerSelectionError(f"sink_tokens must be in [0, {context_length}], got {sink_tokens}")
    check_window(sender, context_length, "the sender's context")
    # logits_to_keep=1: the sender never needs the vocabulary projection of its context (saves |C|·vocab floats)
    output = sender.model(input_ids=context_ids.to(sender.device), use_cache=True, logits_to_keep=1)
    cache = output.cache
    keys, values, sink_keys, sink_values = {}, {}, {}, {}
    for layer in range(sender.num_layers):
        layer_keys, layer_values = _hf.cache_layer_kv(cache, layer)
        if layer in chosen:
            keys[layer], values[layer] = layer_keys, layer_values
        elif sink_tokens > 0:
            sink_keys[layer] = layer_keys[..., :sink_tokens, :].clone()
            sink_values[layer] = layer_values[..., :sink_tokens, :].clone()
    return KVMessage(chosen, keys, values, sink_keys, sink_values, context_length, sink_tokens, sender.fingerprint)


def map_depth(message: KVMessage, receiver: Fingerprint) -> KVMessage:
    """The message re-indexed for a receiver of another depth (layers paired by relative depth).

    Each selected sender layer ``l`` lands on receiver layer ``round((l + 0.5)·L_r/L_s − 0.5)``; when several land
    on one receiver layer the nearest in relative depth is kept (:func:`kvcomm.depth.receiver_sources`). Every other
    receiver layer ``j`` gets the sink of the sender layer nearest to it. Tensors are shared, not copied; the
    result's fingerprint is the sender's with the receiver's depth. The same message is returned for equal depths.
    """
    check_compatible(message.fingerprint, receiver, allow_depth=True)
    sender_layers, receiver_layers = message.fingerprint.num_layers, receiver.num_layers
    if sender_layers == receiver_layers:
        return message
    sources = receiver_sources(message.layers, sender_layers, receiver_layers)
    sink_keys: dict[int, torch.Tensor] = {}
    sink_values: dict[int, torch.Tensor] = {}
    if message.sink_tokens:
        for layer in range(receiver_layers):
            if layer in sources:
                continue
            source = nearest_sender_layer(layer, sender_layers, receiver_layers)
            if source in message.sink_keys:
                sink_keys[layer], sink_values[layer] = message.sink_keys[source], message.sink_values[source]
            else:  # the nearest sender layer was sent in full: its first tokens are the sink
                sink = message.sink_tokens
                sink_keys[layer] = as_tensor(message.keys[source])[..., :sink, :]
                sink_values[layer] = as_tensor(message.values[source])[..., :sink, :]
    return dataclasses.replace(
        message, layers=tuple(sources), keys={j: message.keys[l] for j, l in sources.items()},
        values={j: message.values[l] for j, l in sources.items()}, sink_keys=sink_keys, sink_values=sink_values,
        fingerprint=dataclasses.replace(message.fingerprint, num_layers=receiver_layers),
    )


def receiver_cache(message: KVMessage, receiver: LoadedModel, cross_depth: bool = False) -> _hf.ReceiverCache:
    """A cache for ``receiver`` holding the message: full KV at selected layers, only the sink elsewhere.

    Every layer reports ``message.context_length`` tokens, so the receiver's positions start at ``|C|`` everywhere.
    ``cross_depth``: a message from a model of another depth is first re-indexed with :func:`map_depth`.
    """
    if cross_depth:
        message = map_depth(message, receiver.fingerprint)
    check_compatible(message.fingerprint, receiver.fingerprint)
    device, dtype = receiver.device, receiver.dtype
    layers = []
    for layer in range(receiver.num_layers):
        if layer in message.keys:
            layers.append(_hf.full_layer(as_tensor(message.keys[layer]).to(device, dtype),
                                         as_tensor(message.values[layer]).to(device, dtype)))
        elif layer in message.sink_keys:
            layers.append(_hf.hidden_prefix_layer(
                message.context_length,
                message.sink_keys[layer].to(device, dtype),
                message.sink_values[layer].to(device, dtype),
            ))
        else:
            layers.append(_hf.hidden_prefix_layer(message.context_length))
    return _hf.ReceiverCache(layers)
