"""Prompt templates of the KVComm paper (exact strings) and chat-template tokenisation."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kvcomm.errors import PromptError

QA_INSTRUCTION = "Directly answer the question based on the context passage, no explanation is needed."
MATH_INSTRUCTION = "Answer the math problem step by step."

SKYLINE_TEMPLATE = "Instruction: {instruction} Context: {context} Question: {question}"
BASELINE_TEMPLATE = "Instruction: {instruction} Question: {question}"
SENDER_TEMPLATE = "Instruction: {instruction} Context: {context}"
RECEIVER_TEMPLATE = "Instruction: {instruction} Question: {question}"


def role_messages(context: str, question: str, instruction: str = QA_INSTRUCTION) -> dict[str, str]:
    """The four user messages of one item: ``sender``, ``receiver``, ``skyline``, ``baseline``."""
    return {
        "sender": SENDER_TEMPLATE.format(instruction=instruction, context=context),
        "receiver": RECEIVER_TEMPLATE.format(instruction=instruction, question=question),
        "skyline": SKYLINE_TEMPLATE.format(instruction=instruction, context=context, question=question),
        "baseline": BASELINE_TEMPLATE.format(instruction=instruction, question=question),
    }


MATH_SKYLINE_TEMPLATE = "Instruction: {instruction} Hint: {hint} Question: {question}"
MATH_SENDER_TEMPLATE = "Instruction: {instruction} Hint: {hint}"

QA_TEMPLATE = "qa"
MATH_TEMPLATE = "math"


def math_role_messages(hint: str, question: str, instruction: str = MATH_INSTRUCTION) -> dict[str, str]:
    """The four user messages of a TMATH item (spec §6): the sender and Skyline see ``Hint: {hint}``; the receiver
    and Baseline messages are the QA ones (``Instruction: … Question: …``)."""
    return {
        "sender": MATH_SENDER_TEMPLATE.format(instruction=instruction, hint=hint),
        "receiver": RECEIVER_TEMPLATE.format(instruction=instruction, question=question),
        "skyline": MATH_SKYLINE_TEMPLATE.format(instruction=instruction, hint=hint, question=question),
        "baseline": BASELINE_TEMPLATE.format(instruction=instruction, question=question),
    }


def template_messages(template: str, context: str, question: str, instruction: str) -> dict[str, str]:
    """The four role messages of ``template`` (``"qa"`` or ``"math"``) for one item."""
    if template == QA_TEMPLATE:
        return role_messages(context, question, instruction)
    if template == MATH_TEMPLATE:
        return math_role_messages(context, question, instruction)
    raise PromptError(f"unknown prompt template {template!r}; choose {QA_TEMPLATE!r} or {MATH_TEMPLATE!r}")


def chat_text(tokenizer: PreTrainedTokenizerBase, message: str, answer_prefix: str = "") -> str:
    """``message`` as one user turn with the generation prompt, followed by ``answer_prefix``."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
    else:  # base models without a chat template (tiny test models): BOS + message + newline
        text = (tokenizer.bos_token or "") + message + "\n"
    return text + answer_prefix


def chat_ids(tokenizer: PreTrainedTokenizerBase, message: str, answer_prefix: str = "") -> torch.Tensor:
    """Token ids ``[1, n]`` of :func:`chat_text` (special tokens come from the template, none are added)."""
    text = chat_text(tokenizer, message, answer_prefix)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def with_side_text(message: str, side_text: str) -> str:
    """Insert ``side_text`` (e.g. key facts) before the message's last ``Question:`` (appended when there is none)."""
    if not side_text:
        return message
    marker = " Question: "
    index = message.rfind(marker)
    if index < 0:
        return f"{message} {side_text}"
    return f"{message[:index]} {side_text}{message[index:]}"


# --- NLD / CIPHER (spec §6) ---------------------------------------------------------------------------------------

SUMMARY_INSTRUCTION = "Summarize the following content concisely with one sentence."
CODE_INSTRUCTION = "Complete ONLY THE NEXT LINE of the code snippet based on the context."

SENDER_AWARE_QA_INSTRUCTION = (
    "Summarize the context passage in a concise way, as it will be used by another agent to answer the question."
)
SENDER_AWARE_MATH_INSTRUCTION = (
    "Summarize the hint in a concise way, as it will be used by another agent to answer the question."
)
SENDER_AWARE_SUMMARY_INSTRUCTION = (
    "Summarize the content in a concise way, as it will be used by another agent to understand the content."
)
SENDER_AWARE_CODE_INSTRUCTION = (
    "Summarize the code snippet in a concise way, as it will be used by another agent to complete the code."
)
# task instruction -> the sender-aware ("summarise for another agent") instruction that replaces it
SENDER_AWARE_INSTRUCTIONS = {
    QA_INSTRUCTION: SENDER_AWARE_QA_INSTRUCTION,
    MATH_INSTRUCTION: SENDER_AWARE_MATH_INSTRUCTION,
    SUMMARY_INSTRUCTION: SENDER_AWARE_SUMMARY_INSTRUCTION,
    CODE_INSTRUCTION: SENDER_AWARE_CODE_INSTRUCTION,
}

REFINE_TEMPLATE = (
    "{prompt}\nYour previous answer:\n{self_answer}\nOther agents' answers (for your consideration):\n{others}\n"
    "If needed, revise your answer. Your new answer is:"
)
