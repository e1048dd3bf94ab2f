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


# ------------------------------------------------ the scheduler's moves for mapped tasks
def on_expanded(s: "Scheduler", i: int, event: MapExpanded, actions: list[Action]) -> None:
    """A mapped task's children are known: dispatch them all (none: it succeeds with ``[]``)."""
    if event.attempt != s._attempt[i] or s._state[i] is not Q or s._children.expanded(i):
        s._ignored(i, event)
        return
    first = len(s._names)
    children = add_children(s, i, first, event.count)
    actions.append(MapChildren(s._names[i], first, tuple(s._names[c] for c in children)))
    if not children:
        s._move(i, S, event.at, actions, "mapped over nothing")
        return
    s._move(i, R, event.at, actions, f"expanded into {event.count} children")
    for child in children:
        s._move(child, Q, event.at, actions, "mapped from {}", because_of=i)

def add_children(s: "Scheduler", i: int, first: int, count: int) -> range:
    """Make room for ``count`` pending children of mapped task ``i``, numbered from ``first`` (the next
    free number: expansions are replayed in the order they happened)."""
    if first != len(s._names):
        raise ValueError(f"children of {s._names[i]!r} numbered from {first}, expected {len(s._names)}")
    if len(s._names) == s._graph_size:  # the first expansion: stop sharing the graph's name tables
        s._names, s._index = list(s._names), dict(s._index)
        s._total = array("i", s._total)
    parent = s._specs[i]
    for k in range(count):
        name = child_name(s._names[i], k)
        s._index[name] = len(s._names)
        s._names.append(name)
        s._specs.append(_ChildSpec(name, parent))
    s._state.extend([P] * count)
    s._attempt.extend([0] * count)
    s._base.extend([0] * count)
    for counts in (s._ok, s._bad, s._skip, s._total):
        counts.extend(array("i", bytes(4 * count)))
    s._counts[P] += count
    s._unfinished += count
    s._stories.grow(s._names, count)
    return s._children.add(i, first, count)

def child_ended(s: "Scheduler", child: int, at: float, actions: list[Action]) -> None:
    """Count a child's end; after the last one, its mapped task succeeds, or fails if a child failed."""
    task = s._children.ended(child, s._state[child] is F)
    if task is None or s._state[task] is not R:
        return
    failed = s._children.failed(task)
    if not failed:
        s._move(task, S, at, actions, "all its children ended")
        return
    first = min(failed)
    s._error[task] = (f"{len(failed)} of {len(s._children.of(task))} mapped children failed "
                         f"(first: {s._names[first]}: {s._error.get(first, 'failed')})")
    s._move(task, F, at, actions, "a child failed")
