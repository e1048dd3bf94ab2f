"""The children of mapped tasks, as the scheduler counts them.

A mapped task expands at run time into ``count`` children, numbered after the
graph's tasks (``first .. first + count - 1``), which have no dependencies and no
dependents: each one's end is counted here instead, and when the last child of a
mapped task ends the mapped task ends (success, or failure if a child failed for
good). Pure bookkeeping; the scheduler makes every move.
"""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any, Optional, Sequence

from orchestrator.actions import Action, MapChildren
from orchestrator.mapping import child_name
from orchestrator.trigger_rules import TriggerRule
from shared.events import MapExpanded
from shared.states import TaskState

if TYPE_CHECKING:
    from orchestrator.scheduler import Scheduler, TaskSpec

P, Q, R, S, F = TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCESS, TaskState.FAILURE


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

    def reopen(self, child: int, failed: bool) -> None:
        """Undo :meth:`ended` for a child a rerun runs again."""
        task = self.parent[child]
        self._open[task] += 1
        if failed:
            self._failed[task].remove(child)

    def open(self, task: int) -> int:
        return self._open.get(task, 0)

    def failed(self, task: int) -> list[int]:
        return self._failed.get(task, [])


class _ChildSpec:
    """A child of a mapped task (``transform[3]``): no dependencies, its parent's retry policy."""

    __slots__ = ("name", "parent")
    dependencies: Sequence[str] = ()
    map_over: Sequence[str] = ()
    trigger_rule = TriggerRule.ALL_SUCCESS

    def __init__(self, name: str, parent: "TaskSpec") -> None:
        self.name, self.parent = name, parent

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.parent, attribute)


class MapMoves:
    """The scheduler's moves for mapped tasks: expand into children, end when the last child ends."""

    def _on_expanded(self: "Scheduler", i: int, event: MapExpanded, actions: list[Action]) -> None:
        """A mapped task's children are known: dispatch them all (none: it succeeds with ``[]``)."""
        if event.attempt != self._attempt[i] or self._state[i] is not Q or self._children.expanded(i):
            self._ignored(i, event)
            return
        first = len(self._names)
        children = self._add_children(i, first, event.count)
        actions.append(MapChildren(self._names[i], first, tuple(self._names[c] for c in children)))
        if not children:
            self._move(i, S, event.at, actions, "mapped over nothing")
            return
        self._move(i, R, event.at, actions, f"expanded into {event.count} children")
        for child in children:
            self._move(child, Q, event.at, actions, "mapped from {}", because_of=i)

    def _add_children(self: "Scheduler", i: int, first: int, count: int) -> range:
        """Make room for ``count`` pending children of mapped task ``i``, numbered from ``first`` (the next
        free number: expansions are replayed in the order they happened)."""
        if first != len(self._names):
            raise ValueError(f"children of {self._names[i]!r} numbered from {first}, expected {len(self._names)}")
        if len(self._names) == self._graph_size:  # the first expansion: stop sharing the graph's name tables
            self._names, self._index = list(self._names), dict(self._index)
            self._total = array("i", self._total)
        parent = self._specs[i]
        for k in range(count):
            name = child_name(self._names[i], k)
            self._index[name] = len(self._names)
            self._names.append(name)
            self._specs.append(_ChildSpec(name, parent))
        self._state.extend([P] * count)
        self._attempt.extend([0] * count)
        self._base.extend([0] * count)
        for counts in (self._ok, self._bad, self._skip, self._total):
            counts.extend(array("i", bytes(4 * count)))
        self._counts[P] += count
        self._unfinished += count
        self._stories.grow(self._names, count)
        return self._children.add(i, first, count)

    def _child_ended(self: "Scheduler", child: int, at: float, actions: list[Action]) -> None:
        """Count a child's end; after the last one, its mapped task succeeds, or fails if a child failed."""
        task = self._children.ended(child, self._state[child] is F)
        if task is None or self._state[task] is not R:
            return
        failed = self._children.failed(task)
        if not failed:
            self._move(task, S, at, actions, "all its children ended")
            return
        first = min(failed)
        self._error[task] = (f"{len(failed)} of {len(self._children.of(task))} mapped children failed "
                             f"(first: {self._names[first]}: {self._error.get(first, 'failed')})")
        self._move(task, F, at, actions, "a child failed")
