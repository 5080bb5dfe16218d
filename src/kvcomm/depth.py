"""Pairing layers of models of different depth by relative depth (KVComm's proportional layer map).

A sender with ``L_s`` layers and a receiver with ``L_r`` layers are paired by where a layer sits in its stack:
sender layer ``l`` goes to receiver layer ``round((l + 0.5)·L_r/L_s − 0.5)``, and receiver layer ``j`` reads from
sender layer ``round((j + 0.5)·L_s/L_r − 0.5)``. Both are the identity when the depths are equal.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction

from kvcomm.errors import LayerSelectionError


def layer_map(layer: int, sender_layers: int, receiver_layers: int) -> int:
    """Receiver layer for sender ``layer``: ``round((l + 0.5)·L_r/L_s − 0.5)`` (KVComm's proportional map).

    Computed exactly in rationals; ties round to the even layer (Python's ``round``). The identity when
    ``L_s == L_r``.
    """
    if sender_layers < 1 or receiver_layers < 1:
        raise LayerSelectionError(f"model depths must be >= 1, got sender {sender_layers}, receiver {receiver_layers}")
    if not 0 <= layer < sender_layers:
        raise LayerSelectionError(f"layer {layer} is out of range for a {sender_layers}-layer sender")
    position = (Fraction(layer) + Fraction(1, 2)) * Fraction(receiver_layers, sender_layers) - Fraction(1, 2)
    return min(max(round(position), 0), receiver_layers - 1)


def layer_mapping(layers: Iterable[int], sender_layers: int, receiver_layers: int) -> dict[int, int]:
    """``{sender layer: receiver layer}`` by :func:`layer_map` for every layer of ``layers``."""
    return {int(layer): layer_map(int(layer), sender_layers, receiver_layers) for layer in sorted(set(layers))}


def _depth_distance(sender_layer: int, sender_layers: int, receiver_layer: int, receiver_layers: int) -> Fraction:
    return abs((Fraction(sender_layer) + Fraction(1, 2)) / sender_layers
               - (Fraction(receiver_layer) + Fraction(1, 2)) / receiver_layers)


def receiver_sources(selected: Iterable[int], sender_layers: int, receiver_layers: int) -> dict[int, int]:
    """``{receiver layer: sender layer}`` for the receiver layers that get a selected sender layer's full KV.

    Every selected sender layer goes to :func:`layer_map`; when several land on one receiver layer (a deeper sender),
    the one nearest in relative depth wins (the lower index on a tie), so each receiver layer reads one sender layer.
    """
    best: dict[int, int] = {}
    for layer in sorted(set(int(layer) for layer in selected)):
        target = layer_map(layer, sender_layers, receiver_layers)
        if target not in best or (_depth_distance(layer, sender_layers, target, receiver_layers)
                                  < _depth_distance(best[target], sender_layers, target, receiver_layers)):
            best[target] = layer
    return dict(sorted(best.items()))


def nearest_sender_layer(receiver_layer: int, sender_layers: int, receiver_layers: int) -> int:
    """Sender layer nearest in relative depth to ``receiver_layer`` (the inverse proportional map)."""
    return layer_map(receiver_layer, receiver_layers, sender_layers)
