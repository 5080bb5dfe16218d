"""RoPE re-rotation of stored keys.

RoPE rotates each pair of key dimensions by an angle proportional to the position, so rotations compose additively:
rotating a key computed at position ``p`` by ``Δ`` positions gives the key the model would have computed at ``p + Δ``
(``R(p + Δ) = R(Δ)·R(p)``). The cos/sin come from the model's own rotary module (:func:`kvcomm._hf.rotary_cos_sin`),
so default, linear, Llama-3 and YaRN frequency schedules are all honoured. The pairing is the "rotate half"
convention of Llama, Qwen2, Mistral and Gemma (dimension ``i`` pairs with ``i + r/2`` over the first ``r`` rotary
dimensions; any remaining dimensions are left as they are). Dynamic-NTK RoPE, whose frequencies depend on the
sequence length, does not compose exactly.
"""

from __future__ import annotations

import torch

from kvcomm import _hf
from kvcomm.errors import KVCommError
from kvcomm.models import LoadedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (split in two halves)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., n, head_dim]`` by ``cos``/``sin`` ``[n, r]`` (or ``[1, r]``), ``r <= head_dim`` and even.

    Only the first ``r`` dimensions are rotated. The arithmetic is fp32; the result has ``x``'s dtype.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim > x.shape[-1] or rotary_dim % 2:
        raise KVCommError(f"rotary dimension {rotary_dim} does not fit head dimension {x.shape[-1]}")
    values = x.float()
    rotated, passed = values[..., :rotary_dim], values[..., rotary_dim:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((rotated, passed), dim=-1).to(x.dtype)


def rerotate_keys(model: LoadedModel, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Post-RoPE ``keys`` ``[batch, kv_heads, n, head_dim]`` moved by ``delta`` positions (may be negative).

    Each key at position ``p`` becomes the key at ``p + delta``; ``delta == 0`` returns ``keys`` unchanged.
    """
    if delta == 0:
        return keys
    cos, sin = _hf.rotary_cos_sin(model.model, torch.tensor([delta]))
    return apply_rotation(keys, cos.to(keys.device), sin.to(keys.device))
