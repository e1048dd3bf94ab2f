"""Every move of every task of a run, for debugging: the scheduler's per-task story.

A story entry is ``(cause, start, finish, at)``. The scheduler records one for
each task about three times a run (queued, running, success), so a list of
tuples per task costs ~350 bytes a task, 35 MB for 100,000 tasks. Here the
entries are rows of parallel arrays, about 26 bytes each, linked per task
(each row points to the task's previous one), and a cause that names another
task or a number is kept as a template and that argument, and only turned
into text when a story is read.
"""
from __future__ import annotations

from array import array
from typing import Any, Optional, Sequence

from shared.states import TaskState

_STATES = tuple(TaskState)
_CODES = {state: code for code, state in enumerate(_STATES)}

_INT_LIMIT = 2 ** 31
"""What fits one entry of an ``array("i")``."""

TEXT, NUMBER, TASK = 0, 1, 2
"""How a cause is written: as it is, or as a template filled with a number or a task's name."""


class Stories:
    """The stories of tasks ``0..size-1``; ``names`` turn task numbers in causes back into names."""

    def __init__(self, size: int, names: Sequence[str]) -> None:
        self._names = names
        self._latest = array("i", [-1]) * size
        self._previous = array("i")
        self._cause = array("I")
        self._argument = array("i")
        """The number filling a row's template (0 for a plain cause): no int object per row."""
        self._large: dict[int, int] = {}
        """row -> its number where it does not fit the array (a forged event's attempt)."""
        self._start = bytearray()
        self._finish = bytearray()
        self._at = array("d")
        self._templates: list[tuple[str, int]] = []
        self._codes: dict[tuple[str, int], int] = {}

    def grow(self, names: Sequence[str], count: int) -> None:
        """Room for ``count`` more tasks (a mapped task's children); ``names`` now names them all."""
        self._names = names
        self._latest.extend(array("i", [-1]) * count)

    def add(self, task: int, cause: str, start: TaskState, finish: TaskState, at: float,
            argument: Optional[int] = None, kind: int = TEXT) -> None:
        """Record a move of ``task``. With ``kind`` NUMBER or TASK, ``cause`` is a
        ``str.format`` template with one field, filled with ``argument`` or with the
        name of task number ``argument`` when the story is read."""
        key = (cause, kind)
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = len(self._templates)
            self._templates.append(key)
        self._previous.append(self._latest[task])
        self._latest[task] = len(self._at)
        self._cause.append(code)
        if argument is not None and not -_INT_LIMIT <= argument < _INT_LIMIT:
            self._large[len(self._argument)] = argument
            argument = 0
        self._argument.append(argument or 0)
        self._start.append(_CODES[start])
        self._finish.append(_CODES[finish])
        self._at.append(at)

    def of(self, task: int) -> list[tuple[str, TaskState, TaskState, float]]:
        """``task``'s story, oldest first."""
        rows = []
        row = self._latest[task]
        while row >= 0:
            rows.append(row)
            row = self._previous[row]
        return [self._entry(row) for row in reversed(rows)]

    def _entry(self, row: int) -> tuple[str, TaskState, TaskState, float]:
        template, kind = self._templates[self._cause[row]]
        argument: Any = self._large.get(row, self._argument[row])
        if kind == TASK:
            argument = self._names[argument]
        cause = template if kind == TEXT else template.format(argument)
        return cause, _STATES[self._start[row]], _STATES[self._finish[row]], self._at[row]
