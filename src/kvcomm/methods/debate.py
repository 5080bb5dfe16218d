"""Pieces shared by the two debate baselines (NLD and CIPHER): the sender's prompt, the refine prompt, EOS ids."""

from __future__ import annotations

import logging

from kvcomm.prompts import QA_INSTRUCTION, REFINE_TEMPLATE, SENDER_AWARE_INSTRUCTIONS, SENDER_TEMPLATE
from kvcomm.tasks.base import Example

logger = logging.getLogger(__name__)

INSTRUCTION_MARKER = "Instruction: "


def sender_message(example: Example, sender_aware: bool = False) -> str:
    """The sender's user message of ``example``; with ``sender_aware`` its instruction is replaced by the matching
    "summarise ... as it will be used by another agent" instruction (spec §6).

    The task instruction is recognised at the start of the message (``Instruction: {instruction} ...``). A message
    whose instruction is not one of the paper's is rebuilt from the QA sender template with the QA sender-aware
    instruction and ``example.context`` (logged as a warning).
    """
    message = example.messages["sender"]
    if not sender_aware:
        return message
    for instruction, replacement in SENDER_AWARE_INSTRUCTIONS.items():
        prefix = INSTRUCTION_MARKER + instruction
        if message.startswith(prefix):
            return INSTRUCTION_MARKER + replacement + message[len(prefix):]
    logger.warning("item %r: unknown sender instruction; using the QA sender-aware instruction", example.id)
    return SENDER_TEMPLATE.format(instruction=SENDER_AWARE_INSTRUCTIONS[QA_INSTRUCTION], context=example.context)


def refine_message(prompt: str, self_answer: str, others: str) -> str:
    """The phase-2 user message (spec §6): the receiver's ``prompt``, its own draft and the other agent's text."""
    return REFINE_TEMPLATE.format(prompt=prompt, self_answer=self_answer, others=others)


def check_message_tokens(message_tokens: int) -> None:
    if message_tokens < 1:
        raise ValueError(f"message_tokens must be >= 1, got {message_tokens}")
