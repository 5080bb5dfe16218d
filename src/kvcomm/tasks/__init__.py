"""Task registry: ``get_task(name)`` gives a :class:`Task` whose ``load(data_dir)`` returns test and calibration items.

The eight tasks of the paper (``KVCOMM.md`` §7.1), the two-sender splits of HotpotQA, MuSiQue and 2WikiMQA
(``*_2senders``, §7.4, :mod:`kvcomm.tasks.multi`) and the built-in ``demo``. ``metric`` is the primary metric (a key
of :data:`kvcomm.metrics.METRICS`): the paper's binary ``f1_match`` for the QA tasks, ``rouge_l_recall`` for TMATH.
``truncate`` mirrors the reference's ``truncate_input`` (long inputs are cut in the middle with
:func:`kvcomm.tasks.truncate.truncate_example`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcomm.errors import TaskError
from kvcomm.tasks import demo, longform, multi, paper, tmath
from kvcomm.tasks.base import Example, TaskSplit
from kvcomm.tasks.truncate import truncate_example


@dataclass(frozen=True)
class Task:
    """A named task: its loader, its primary metric, whether it needs ``--data-dir`` and whether long inputs are
    truncated (the reference's ``truncate_input``); ``senders``: how many senders' contexts each item carries."""

    name: str
    metric: str
    loader: Callable[[Path | str | None], TaskSplit]
    needs_data: bool = True
    truncate: bool = False
    senders: int = 1  # >= 2: items carry one context per sender in extra["contexts"]

    def load(self, data_dir: Path | str | None = None) -> TaskSplit:
        """Test and calibration items; ``data_dir`` is a folder, an upstream file or ``hf:[id]`` (kept as text)."""
        if data_dir is None:
            return self.loader(None)
        text = str(data_dir)
        return self.loader(text if text.startswith("hf:") else Path(data_dir))


TASKS: dict[str, Task] = {
    "demo": Task("demo", "contains", demo.load, needs_data=False),
    "countries": Task("countries", "f1_match", paper.load_countries),
    "tipsheets": Task("tipsheets", "f1_match", paper.load_tipsheets),
    "hotpotqa": Task("hotpotqa", "f1_match", paper.load_hotpotqa, truncate=True),
    "qasper": Task("qasper", "f1_match", longform.load_qasper, truncate=True),
    "musique": Task("musique", "f1_match", longform.load_musique, truncate=True),
    "multifieldqa_en": Task("multifieldqa_en", "f1_match", longform.load_multifieldqa_en, truncate=True),
    "twowikimqa": Task("twowikimqa", "f1_match", longform.load_twowikimqa, truncate=True),
    "tmath": Task("tmath", "rouge_l_recall", tmath.load_tmath, truncate=True),
    # items whose supporting facts / passages are split in halves for two senders (extra["contexts"], spec §7.4)
    "hotpotqa_2senders": Task("hotpotqa_2senders", "f1_match", multi.load_hotpotqa_two_senders, truncate=True,
                             senders=2),
    "musique_2senders": Task("musique_2senders", "f1_match", multi.load_musique_two_senders, truncate=True,
                             senders=2),
    "twowikimqa_2senders": Task("twowikimqa_2senders", "f1_match", multi.load_twowikimqa_two_senders, truncate=True,
                             senders=2),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["Example", "Task", "TaskSplit", "TASKS", "get_task", "truncate_example"]
