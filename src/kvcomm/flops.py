"""Analytic forward FLOPs of a decoder-only transformer (spec §10), counted per side of a communication.

One forward pass of ``n`` new tokens on a model with ``L`` layers, where layer ``l`` already holds ``p_l`` past keys
(the cache), costs

* **linear parts** ``2 · P_lin · n`` with ``P_lin = L · (d·H·h + 2·d·H_kv·h + H·h·d + m·d·I)`` the weights of the
  q/k/v/o projections and of the MLP (``m = 3`` matrices for a gated MLP such as SwiGLU, ``2`` otherwise), biases
  ignored;
* **attention** ``Σ_l 4 · H · h · K_l`` where ``K_l = n·p_l + n(n+1)/2`` is the number of (query, key) pairs that
  are attended under the causal mask (``2·h`` for ``q·k`` and ``2·h`` for the weighted sum of values, per query head);
* **lm_head** ``2 · d · V`` per position whose logits are kept (1 for a prefill through ``generate``, for the
  sender's context prefill and for every decode step).

Embedding look-ups, norms, RoPE, softmax and activations are not counted (lower order). Generation is one prefill
of the prompt followed by one single-token step per further token: step ``i`` (0-based) attends to
``p_l + prompt + i + 1`` keys at layer ``l``. ``d`` = hidden size, ``H``/``H_kv`` = query/KV heads, ``h`` = head
dim, ``I`` = MLP width, ``V`` = vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcomm.errors import KVCommError

# model types whose MLP is a plain up/down pair (2 matrices); every other supported family is gated (3)
UNGATED_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode"})


@dataclass(frozen=True)
class ModelDims:
    """The sizes the FLOPs formulas need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    mlp_matrices: int = 3

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "mlp_matrices"):
            if int(getattr(self, name)) < 1:
                raise KVCommError(f"model dimension {name} must be >= 1, got {getattr(self, name)}")

    @property
    def attention_params(self) -> int:
        """Weights of q, k, v and o in one layer."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * q_width + 2 * self.hidden_size * kv_width + q_width * self.hidden_size

    @property
    def mlp_params(self) -> int:
        """Weights of the MLP in one layer."""
        return self.mlp_matrices * self.hidden_size * self.intermediate_size

    @property
    def linear_params(self) -> int:
        """``P_lin``: q/k/v/o and MLP weights of all layers (embeddings and lm_head excluded)."""
        return self.num_layers * (self.attention_params + self.mlp_params)

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @classmethod
    def from_config(cls, config: object) -> "ModelDims":
        """From a transformers config (the text config of a multimodal one)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        try:
            hidden = int(config.hidden_size)
            heads = int(config.num_attention_heads)
            head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
            intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                               or 4 * hidden)
            model_type = str(getattr(config, "model_type", ""))
            return cls(num_layers=int(config.num_hidden_layers), hidden_size=hidden, num_heads=heads,
                       num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim,
                       intermediate_size=intermediate, vocab_size=int(config.vocab_size),
                       mlp_matrices=2 if model_type in UNGATED_MLP else 3)
        except AttributeError as error:
            raise KVCommError(f"cannot read the model sizes for FLOPs from {type(config).__name__}: {error}") from error


def attended_pairs(new_tokens: int, past_keys: int) -> int:
    """(query, key) pairs of ``new_tokens`` causal queries after ``past_keys`` cached keys: ``n·p + n(n+1)/2``."""
    if new_tokens < 0 or past_keys < 0:
        raise KVCommError(f"token counts must be >= 0, got new={new_tokens}, past={past_keys}")
    return new_tokens * past_keys + new_tokens * (new_tokens + 1) // 2


def _per_layer(past_keys: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(past_keys, int):
        return [past_keys] * num_layers
    values = [int(value) for value in past_keys]
    if len(values) != num_layers:
        raise KVCommError(f"past_keys has {len(values)} entries for a model with {num_layers} layers")
    return values


def forward_flops(dims: ModelDims, new_tokens: int, past_keys: int | Sequence[int] = 0, logits_kept: int = 1) -> int:
    """FLOPs of one forward pass over ``new_tokens`` tokens.

    ``past_keys``: keys already in the cache, one number for every layer or one per layer (KVComm: ``|C|`` at shared
    layers, the sink count elsewhere). ``logits_kept``: positions projected through the lm_head.
    """
    if new_tokens == 0:
        return 0
    past = _per_layer(past_keys, dims.num_layers)
    linear = 2 * dims.linear_params * new_tokens
    attention = 4 * dims.num_heads * dims.head_dim * sum(attended_pairs(new_tokens, p) for p in past)
    return linear + attention + 2 * dims.lm_head_params * min(logits_kept, new_tokens)


def generation_flops(dims: ModelDims, prompt_tokens: int, decode_steps: int, past_keys: int | Sequence[int] = 0,
                     prefill_logits: int = 1) -> int:
    """FLOPs of a prefill of ``prompt_tokens`` then ``decode_steps`` single-token steps (each keeps one logit row).

    Step ``i`` sees ``p_l + prompt_tokens + i`` cached keys at layer ``l`` plus itself.
    """
    if decode_steps < 0:
        raise KVCommError(f"decode_steps must be >= 0, got {decode_steps}")
    past = _per_layer(past_keys, dims.num_layers)
    total = forward_flops(dims, prompt_tokens, past, prefill_logits)
    if decode_steps == 0:
        return total
    linear = 2 * (dims.linear_params + dims.lm_head_params) * decode_steps
    # Σ_i (p + prompt + i + 1) over i = 0 .. steps-1, per layer
    keys = sum(decode_steps * (p + prompt_tokens + 1) + decode_steps * (decode_steps - 1) // 2 for p in past)
    return total + linear + 4 * dims.num_heads * dims.head_dim * keys


def decode_steps(generated_tokens: int, budget: int, ignore_eos: bool = False) -> int:
    """Single-token forward passes after the prefill that produced ``generated_tokens`` (EOS cut off) out of a
    ``budget``.

    Stopped by EOS (``generated < budget``): the EOS was produced by one more step, so ``generated`` steps; stopped by
    the budget: ``budget - 1`` steps (the last token is never fed back). ``ignore_eos`` always uses the budget.
    """
    if budget < 1:
        return 0
    if ignore_eos or generated_tokens >= budget:
        return budget - 1
    return max(generated_tokens, 0)
