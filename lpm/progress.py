"""Progress bars that also show in a log: a Rich bar on a terminal, plain lines anywhere else.

Rich draws nothing on a stream that is not a terminal until the bar stops, so a long run under ``nohup``,
in CI or piped to a file would be silent for its whole length. :func:`progress_bar` gives a Rich
:class:`~rich.progress.Progress` on a terminal and a :class:`LineProgress` otherwise: the same calls
(``with``, ``add_task``, ``update``), written as one line when a task starts, at most every ``every``
seconds while it runs, and when it completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn

__all__ = ["LineProgress", "progress_bar"]


@dataclass
class _Task:
    description: str
    total: float | None
    fields: dict[str, Any]
    started: float
    completed: float = 0.0
    printed: float = field(default=-1.0)  # when its last line was written
    done: bool = False


class LineProgress:
    """The part of :class:`rich.progress.Progress` lpm uses, as plain lines on ``console``: the task's
    description, completed/total, its ``unit`` field after the count and its other fields as ``name value``,
    and the time since it started."""

    def __init__(self, console: Console, every: float = 30.0, clock: Any = time.monotonic):
        self.console, self.every, self.clock = console, every, clock
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, dict(fields), self.clock()))
        self._line(self.tasks[-1])
        return len(self.tasks) - 1

    def update(
        self, task_id: int, *, completed: float | None = None, advance: float | None = None, **fields: Any
    ) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        task.fields.update(fields)
        finished = task.total is not None and task.completed >= task.total
        if finished and not task.done:
            task.done = True
            self._line(task)
        elif not finished and self.clock() - task.printed >= self.every:
            self._line(task)

    def _line(self, task: _Task) -> None:
        now = self.clock()
        task.printed = now
        done = f"{task.completed:g}" + ("" if task.total is None else f"/{task.total:g}")
        if task.fields.get("unit"):  # what is counted: "14/14 days"
            done += f" {task.fields['unit']}"
        extra = " ".join(f"{k} {v}" for k, v in task.fields.items() if k != "unit" and v not in ("", None))
        elapsed = int(now - task.started)
        text = (
            f"{task.description}: {done}{' ' + extra if extra else ''} [{elapsed // 60}:{elapsed % 60:02d}]"
        )
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def progress_bar(
    *columns: str | ProgressColumn, console: Console, transient: bool = False, every: float = 30.0
) -> Progress | LineProgress:
    """A Rich bar with ``columns`` on a terminal; elsewhere a :class:`LineProgress` (a line at most every
    ``every`` seconds per task, and one when it completes)."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return LineProgress(console, every=every)


def count_bar() -> Progress | LineProgress:
    """The bar of a counted piece of work on stderr: description, bar, done / total, the task's ``unit``
    field, time elapsed and left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return progress_bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
