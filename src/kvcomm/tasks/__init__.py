"""Task registry: ``get_task(name)`` gives a :class:`Task` whose ``load(data_dir)`` returns test and calibration items."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcomm.errors import TaskError
from kvcomm.tasks import demo, paper
from kvcomm.tasks.base import Example, TaskSplit


@dataclass(frozen=True)
class Task:
    """A named task: its loader, its primary metric and whether it needs ``--data-dir``."""

    name: str
    metric: str
    loader: Callable[[Path | None], TaskSplit]
    needs_data: bool = True

    def load(self, data_dir: Path | str | None = None) -> TaskSplit:
        return self.loader(Path(data_dir) if data_dir is not None else None)


TASKS: dict[str, Task] = {
    "demo": Task("demo", "contains", demo.load, needs_data=False),
    "countries": Task("countries", "token_f1", paper.load_countries),
    "tipsheets": Task("tipsheets", "token_f1", paper.load_tipsheets),
    "hotpotqa": Task("hotpotqa", "token_f1", paper.load_hotpotqa),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["Example", "Task", "TaskSplit", "TASKS", "get_task"]
