"""Task items and the task interface."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomm.errors import PromptError, TaskError
from kvcomm.prompts import MATH_INSTRUCTION, MATH_TEMPLATE, QA_INSTRUCTION, QA_TEMPLATE, template_messages


@dataclass(frozen=True)
class Example:
    """One item: what the sender sees (``context``), what the receiver is asked (``question``), and the gold answers.

    ``messages`` holds the four user messages of the paper's templates (``sender``, ``receiver``, ``skyline``,
    ``baseline``). ``answer_prefix`` is appended after the receiver's generation prompt (also for Skyline/Baseline).
    ``template`` (``"qa"`` or ``"math"``) and ``instruction`` say how ``messages`` were built, so that a changed context
    (e.g. a truncated one, :meth:`with_context`) rebuilds them the same way.
    """

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    messages: dict[str, str]
    max_new_tokens: int = 48
    answer_prefix: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    template: str = QA_TEMPLATE
    instruction: str = QA_INSTRUCTION

    def __post_init__(self) -> None:
        if not self.context.strip():
            raise PromptError(f"item {self.id!r}: the context is empty")
        if not self.question.strip():
            raise PromptError(f"item {self.id!r}: the question is empty")

    @classmethod
    def qa(
        cls,
        context: str,
        question: str,
        answers: list[str] | tuple[str, ...] = (),
        id: str = "item",
        max_new_tokens: int = 48,
        answer_prefix: str = "",
        instruction: str = QA_INSTRUCTION,
    ) -> "Example":
        """An item with the paper's QA templates."""
        return cls(id=id, context=context, question=question, answers=tuple(answers),
                   messages=template_messages(QA_TEMPLATE, context, question, instruction),
                   max_new_tokens=max_new_tokens, answer_prefix=answer_prefix, template=QA_TEMPLATE,
                   instruction=instruction)

    @classmethod
    def math(
        cls,
        hint: str,
        problem: str,
        answers: list[str] | tuple[str, ...] = (),
        id: str = "item",
        max_new_tokens: int = 256,
        instruction: str = MATH_INSTRUCTION,
    ) -> "Example":
        """An item with the paper's TMATH templates: the sender gets ``Hint: {hint}``, the receiver the problem."""
        return cls(id=id, context=hint, question=problem, answers=tuple(answers),
                   messages=template_messages(MATH_TEMPLATE, hint, problem, instruction),
                   max_new_tokens=max_new_tokens, template=MATH_TEMPLATE, instruction=instruction)

    def with_answer_prefix(self, prefix: str) -> "Example":
        """A copy whose answer prefix is ``prefix`` followed by the item's own prefix (if any)."""
        joined = (prefix.rstrip() + " " + self.answer_prefix).strip() if self.answer_prefix else prefix
        return dataclasses.replace(self, answer_prefix=joined)

    def with_context(self, context: str, **extra: Any) -> "Example":
        """A copy with a new ``context`` whose four messages are rebuilt from the item's template and instruction;
        ``extra`` entries are added to (a copy of) ``self.extra``."""
        messages = template_messages(self.template, context, self.question, self.instruction)
        return dataclasses.replace(self, context=context, messages=messages, extra={**self.extra, **extra})


@dataclass(frozen=True)
class TaskSplit:
    """Test items and a disjoint pool of calibration items."""

    test: list[Example]
    calibration: list[Example]

    def __post_init__(self) -> None:
        overlap = {e.id for e in self.test} & {e.id for e in self.calibration}
        if overlap:
            raise TaskError(f"calibration items overlap test items: {sorted(overlap)[:5]}")


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, each checked for ``required`` fields; clear errors name the file and line."""
    if not path.is_file():
        raise TaskError(f"data file not found: {path} (expected a JSON-lines file with fields {', '.join(required)})")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            missing = [name for name in required if name not in row]
            if missing:
                raise TaskError(f"{path}:{number}: missing field(s) {missing}; expected fields {list(required)}")
            rows.append(row)
    if not rows:
        raise TaskError(f"{path} holds no records")
    return rows
