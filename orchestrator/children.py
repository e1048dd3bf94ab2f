"""The children of mapped tasks, as the scheduler counts them.

A mapped task expands at run time into ``count`` children, numbered after the
graph's tasks (``first .. first + count - 1``), which have no dependencies and no
dependents: each one's end is counted here instead, and when the last child of a
mapped task ends the mapped task ends (success, or failure if a child failed for
good). Pure bookkeeping; the scheduler makes every move.
"""
from __future__ import annotations

from typing import Optional


class Children:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self._range: dict[int, range] = {}
        self._open: dict[int, int] = {}
        self._failed: dict[int, list[int]] = {}

    def add(self, task: int, first: int, count: int) -> range:
        """Record that mapped task ``task`` expanded into children ``first .. first + count - 1``."""
        children = range(first, first + count)
        self._range[task] = children
        self._open[task] = count
        self._failed[task] = []
        for child in children:
            self.parent[child] = task
        return children

    def of(self, task: int) -> range:
        return self._range.get(task, range(0))

    def expanded(self, task: int) -> bool:
        return task in self._range

    def ended(self, child: int, failed: bool) -> Optional[int]:
        """Count the end of ``child``; its mapped task if that was the last child to end."""
        task = self.parent[child]
        self._open[task] -= 1
        if failed:
            self._failed[task].append(child)
        return task if self._open[task] == 0 else None

    def reopened(self, child: int, failed: bool) -> None:
        """Undo :meth:`ended` for a child a rerun runs again."""
        task = self.parent[child]
        self._open[task] += 1
        if failed:
            self._failed[task].remove(child)

    def open(self, task: int) -> int:
        return self._open.get(task, 0)

    def failed(self, task: int) -> list[int]:
        return self._failed.get(task, [])
