"""KVComm-S (paper App. M): KVComm whose non-selected layers see the sink right before the receiver's tokens.

The reference code runs non-selected layers in a second position frame (sink at 0, receiver tokens from 1). Attention
scores under RoPE depend only on relative positions, so the same scores come from one position stream (receiver
positions from ``|C|`` at every layer) with the stored sink key re-rotated from position 0 to ``|C| - 1`` (``ANCHORS.md``
§2 item 9). With ``n`` sink tokens the sinks move from ``0..n-1`` to ``|C|-n .. |C|-1`` (shift ``Δ = |C| - n``), which
matches a shift-back frame where the receiver starts at position ``n``. Sink values, selected layers and every
receiver-receiver distance are unchanged. The sent message is never modified: the receiver re-rotates a copy.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from kvcomm.message import KVMessage
from kvcomm.methods.base import MethodOutput
from kvcomm.methods.kvcomm import KVComm
from kvcomm.models import LoadedModel
from kvcomm.rope import rerotate_keys
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)


def shift_sinks(message: KVMessage, receiver: LoadedModel) -> KVMessage:
    """A copy of ``message`` whose sink keys ``[1, kv_heads, n, head_dim]`` sit at positions ``|C|-n .. |C|-1``.

    Uses the receiver's rotary module (sender and receiver RoPE are equal for a compatible pair). Tensors of selected
    layers and sink values are shared with ``message``, not copied.
    """
    delta = message.context_length - message.sink_tokens
    if delta == 0 or not message.sink_keys:
        return message
    shifted = {layer: rerotate_keys(receiver, keys, delta) for layer, keys in message.sink_keys.items()}
    logger.debug("KVComm-S: re-rotated the sink keys of %d layers by %d positions", len(shifted), delta)
    return dataclasses.replace(message, sink_keys=shifted)


@dataclass
class KVCommS(KVComm):
    """KVComm with optional shift-back of non-selected layers (``shift_back=True``: KVComm-S; ``False``: KVComm).

    With every layer selected, or ``sink_tokens=0``, there is no sink to move and the result equals KVComm.
    """

    name: str = "kvcomm_s"
    shift_back: bool = False

    def receive(self, message: KVMessage, example: Example) -> MethodOutput:
        """Receiver side: re-rotate the sink keys (when ``shift_back``) and answer as KVComm."""
        if self.shift_back:
            message = shift_sinks(message, self.receiver)
        return super().receive(message, example)
