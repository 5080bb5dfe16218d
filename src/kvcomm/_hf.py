"""The one module that touches transformers internals.

Everything kvcomm needs from transformers 5.x beyond ``from_pretrained`` and ``generate`` lives here, each piece
with its own test in ``tests/test_hf_compat.py``:

* :class:`HiddenPrefixLayer` — a dynamic cache layer for a *non-selected* layer: it stores only the sender tokens that
  were actually sent (zero, or the one attention-sink token) but reports the full sender length from
  ``get_seq_length`` / ``get_mask_sizes``, so positions and the shared mask stay those of ``[context ; query]``.
* :class:`ReceiverCache` — a ``DynamicCache`` built from an explicit list of layers.
* ``kvcomm_attention`` — an attention function registered in ``AttentionInterface`` under :data:`ATTENTION_NAME`
  (with the stock SDPA mask builder registered under the same name in ``AttentionMaskInterface``). When a layer holds
  fewer keys than the mask has columns (a hidden-prefix layer) it keeps the mask's *last* ``key_len`` columns. Every
  sender column is visible to every receiver row, so the kept sink column(s) take the values of any sender column,
  and the receiver columns keep their causal pattern. Otherwise it is stock SDPA.
* Calibration capture: inside :func:`capture_context_attention`, prefill calls (more than one query token) compute
  the attention probabilities explicitly (fp32 softmax, causal mask) and record, per layer, the mean over heads and
  query rows of the probability mass on the sender's context columns ``1 .. |C|-1`` (the sink column 0 excluded).
* AC and KVComm-S helpers (decoder layer list, hidden states, a temporary last-token pre-hook, the rotary module's
  cos/sin) — in their own section at the end, tested in ``tests/test_hf_compat_extra.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from kvcomm.errors import KVCommError

ATTENTION_NAME = "kvcomm_sdpa"


class HiddenPrefixLayer(DynamicLayer):
    """Cache layer whose first ``hidden_tokens`` positions exist for positions and masks but hold no K/V.

    Stored ``keys``/``values``: ``[batch, kv_heads, kept_prefix + own_tokens, head_dim]``. The layer reports
    ``kept_prefix + hidden_tokens + own_tokens`` as its length, so a receiver token gets the same position at every
    layer whether the layer received the sender's KV or not.
    """

    def __init__(self, hidden_tokens: int) -> None:
        super().__init__()
        if hidden_tokens < 0:
            raise ValueError(f"hidden_tokens must be >= 0, got {hidden_tokens}")
        self.hidden_tokens = hidden_tokens

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.hidden_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class ReceiverCache(DynamicCache):
    """A dynamic cache whose per-layer objects are given explicitly (one per decoder layer)."""

    def __init__(self, layers: Sequence[DynamicLayer]) -> None:
        Cache.__init__(self, layers=list(layers))


def full_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A plain dynamic layer pre-filled with ``keys``/``values`` of shape ``[batch, kv_heads, seq, head_dim]``."""
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values  # no copy: the receiver's first update concatenates into new tensors
    return layer


def hidden_prefix_layer(
    context_length: int, sink_keys: torch.Tensor | None = None, sink_values: torch.Tensor | None = None
) -> HiddenPrefixLayer:
    """A layer that hides the sender context except the optional sink token(s) ``[batch, kv_heads, n_sink, head_dim]``."""
    kept = 0 if sink_keys is None else sink_keys.shape[-2]
    layer = HiddenPrefixLayer(hidden_tokens=context_length - kept)
    if sink_keys is not None and sink_values is not None and kept > 0:
        layer.lazy_initialization(sink_keys, sink_values)
        layer.keys, layer.values = sink_keys, sink_values
    return layer


def cache_layer_kv(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values held by one layer of a cache: ``[batch, kv_heads, seq, head_dim]`` each."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def cache_num_layers(cache: Cache) -> int:
    return len(cache.layers)


# ----------------------------------------------------------------------------------------------------------------
# Calibration capture


@dataclass
class AttentionCapture:
    """Per-layer attention mass on the sender context, recorded during receiver prefills.

    ``mass[layer]`` is a list with one float per recorded prefill call: the mean over heads and query rows of the
    summed probability on key columns ``first_context_column .. context_length-1``.
    """

    first_context_column: int = 1
    mass: dict[int, list[float]] = field(default_factory=dict)


_ACTIVE_CAPTURE: contextvars.ContextVar[AttentionCapture | None] = contextvars.ContextVar(
    "kvcomm_attention_capture", default=None
)


@contextlib.contextmanager
def capture_context_attention(exclude_sink: bool = True) -> Iterator[AttentionCapture]:
    """Record the attention mass on sender columns for the receiver prefills run inside this block."""
    capture = AttentionCapture(first_context_column=1 if exclude_sink else 0)
    token = _ACTIVE_CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE_CAPTURE.reset(token)


def _explicit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    capture: AttentionCapture,
) -> torch.Tensor:
    """Attention with explicit fp32 probabilities; records the sender-column mass. Returns ``[B, q, H, d]``."""
    groups = query.shape[1] // key.shape[1]
    key_full = key.repeat_interleave(groups, dim=1)
    value_full = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), key_full.float().transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    else:
        # bottom-right aligned causal mask
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        cols = torch.arange(k_len, device=query.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    context_length = k_len - q_len  # receiver prefill: keys = [sender context ; receiver prompt]
    first = capture.first_context_column
    mass = probs[..., first:context_length].sum(-1).mean().item() if context_length > first else 0.0
    capture.mass.setdefault(int(module.layer_idx), []).append(float(mass))
    out = torch.matmul(probs.to(value_full.dtype), value_full)
    return out.transpose(1, 2).contiguous()


def kvcomm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA that understands hidden-prefix layers (see module docstring).

    query ``[B, H, q, d]``, key/value ``[B, kv_heads, k, d]``, attention_mask ``[B, 1, q, >=k]`` or None.
    """
    key_len = key.shape[-2]
    if attention_mask is not None and attention_mask.shape[-1] > key_len:
        attention_mask = attention_mask[..., -key_len:]
    capture = _ACTIVE_CAPTURE.get()
    if capture is not None and query.shape[2] > 1 and key_len > query.shape[2]:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _explicit_attention(module, query, key, value, attention_mask, scale, capture), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register_attention() -> str:
    """Register the kvcomm attention and mask functions (idempotent); returns the implementation name."""
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, kvcomm_attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION_NAME


def use_kvcomm_attention(model: torch.nn.Module) -> None:
    """Switch a loaded model to the kvcomm attention implementation."""
    model.set_attn_implementation(register_attention())


def attention_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def layer_types(config: object) -> list[str]:
    """Attention type of each decoder layer (``full_attention`` when the config does not say)."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text_config, "layer_types", None)
    if types is None:
        return ["full_attention"] * int(text_config.num_hidden_layers)
    return list(types)


# ----------------------------------------------------------------------------------------------------------------
# Additions for AC and KVComm-S (each with its own test in tests/test_hf_compat_extra.py):
#
# * :func:`decoder_layers` — the decoder's layer list (``model.get_decoder().layers``);
# * :func:`hidden_states_at` — ``output_hidden_states=True``: entry 0 is the embeddings, entry k the input of layer k;
# * :func:`last_token_injection` — a temporary forward pre-hook on one decoder layer that rewrites the last
#   position's hidden vector of multi-token (prefill) calls; removed in ``finally``;
# * :func:`rotary_cos_sin` — cos/sin of the model's own rotary module (``model.get_decoder().rotary_emb``).


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.get_decoder().layers``), one per ``layer_idx``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise KVCommError(f"{type(model).__name__}: cannot find the decoder layer list (expected decoder.layers)")
    return layers


@torch.no_grad()
def hidden_states_at(model: torch.nn.Module, input_ids: torch.Tensor, index: int) -> torch.Tensor:
    """Hidden states ``[1, n, hidden]`` of one prefill over ``input_ids`` ``[1, n]`` at ``index``.

    ``index`` 0 is the embedding output and ``index`` k (``0 <= k < L``) the input of decoder layer k.
    """
    num_layers = len(decoder_layers(model))
    if not 0 <= index < num_layers:
        raise KVCommError(f"hidden-state index {index} is out of range 0..{num_layers - 1}")
    device = next(model.parameters()).device
    output = model(input_ids=input_ids.to(device), output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return output.hidden_states[index]


@contextlib.contextmanager
def last_token_injection(
    model: torch.nn.Module, layer_idx: int, combine: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Inside the block, calls with more than one token replace the last position's input of layer ``layer_idx``.

    ``combine`` maps the last position's hidden vector ``b`` ``[batch, hidden]`` to its replacement (same shape).
    Single-token calls (decode steps) are untouched. The pre-hook is removed on exit, also on error.
    """
    layers = decoder_layers(model)
    if not 0 <= layer_idx < len(layers):
        raise KVCommError(f"layer {layer_idx} is out of range 0..{len(layers) - 1}")

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = len(args) > 0
        hidden = args[0] if positional else kwargs["hidden_states"]
        if hidden.shape[-2] <= 1:
            return None
        hidden = hidden.clone()
        hidden[:, -1, :] = combine(hidden[:, -1, :]).to(hidden.dtype)
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def rotary_cos_sin(model: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``/``sin`` ``[n, rotary_dim]`` of the model's rotary module at ``positions`` ``[n]``.

    The module's ``attention_scaling`` (≠ 1 for YaRN-style RoPE) is divided out, so the result is a pure rotation.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise KVCommError(f"{type(model).__name__} has no decoder.rotary_emb module; RoPE re-rotation needs one")
    device = next(model.parameters()).device
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, positions.to(device).long().view(1, -1))
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    return cos[0].float() / scaling, sin[0].float() / scaling
