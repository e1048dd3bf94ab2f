"""Rerun from failure, as scheduler moves: which tasks run again, and what their rerun undoes.

:meth:`RerunMoves.rerun` is the scheduler's public call; the ``_un*`` handlers are the
moves out of a final state back to ``pending`` in its transition table, each taking back
what the task's end had counted for its dependents, and each giving the task a fresh
attempt budget (attempt numbers keep growing).
"""
from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Iterable

from orchestrator.actions import Action, RunRerun
from shared.errors import NothingToRerunError, WorkflowError
from shared.states import TaskState

if TYPE_CHECKING:
    from orchestrator.scheduler import Scheduler

P, F, C = TaskState.PENDING, TaskState.FAILURE, TaskState.CANCELLED
_RERUN = frozenset({F, C})
"""The final states a rerun from failure starts again by itself (skipped tasks only downstream of them)."""


def rerun(s: "Scheduler", tasks: Iterable[str] = (), at: float = 0.0) -> list[Action]:
    """Start a finished run again from where it failed; return what must happen.

    Reruns every task that failed (or failed upstream) or was cancelled, every task
    named in ``tasks`` even if it succeeded, and everything downstream of those.
    A task that was skipped is rerun only when it is downstream of a rerun task.
    The other succeeded tasks keep their results and never run again. Each rerun task
    goes back to pending with a fresh budget of ``max_retries + 1`` attempts; attempt
    numbers keep growing. Raises :class:`UnknownTaskError` for a name not in the run,
    :class:`NothingToRerunError` if that set is empty, ``RuntimeError`` if the run has
    not finished; in every case nothing changed.
    """
    if not s.finished:
        raise RuntimeError("Scheduler.rerun() before the run finished")
    named = {s._number(task) for task in ([tasks] if isinstance(tasks, str) else tasks)}
    rerun = downstream_closure(s, named | {i for i, state in enumerate(s._state) if state in _RERUN})
    if not rerun:
        raise NothingToRerunError()
    rerun = with_children(s, rerun, named)
    actions: list[Action] = [RunRerun(at)]
    s._finish_reported = False
    s.cancelled_by = s.cancelled_at = None
    for i in rerun:
        s._move(i, P, at, actions, "rerun")
    for i in rerun:
        if s._state[i] is P:
            s._decide(i, at, actions, None)
    s._drain(at, actions)
    s._check_finished(at, actions)
    return actions

def downstream_closure(s: "Scheduler", seeds: set[int]) -> list[int]:
    """``seeds`` and all their transitive dependents, in task-number order."""
    seen = set(seeds)
    stack = [i for i in seeds if i < s._graph_size]
    while stack:
        for dependent in s._dependents_of(stack.pop()):
            if dependent not in seen:
                seen.add(dependent)
                stack.append(dependent)
    return sorted(seen)

def with_children(s: "Scheduler", rerun: list[int], named: set[int]) -> list[int]:
    """``rerun`` and the children of the expanded mapped tasks in it that run again: all of them for a
    mapped task named, else those that failed or were cancelled (already in ``rerun``). A mapped task
    whose upstream runs again would need a new expansion: refused (nothing changed yet)."""
    out = set(rerun)
    for task in [i for i in rerun if s._children.expanded(i)]:
        upstream = next((d for d in s._specs[task].dependencies if s._index[d] in out), None)
        if upstream is not None:
            raise WorkflowError(f"a rerun of {upstream!r} would change the input of mapped task "
                                f"{s._names[task]!r}, which this version cannot expand again: rerun "
                                f"{s._names[task]!r} itself, or submit the workflow again")
        if task in named:
            out.update(s._children.of(task))
    return sorted(out)

def reset(s: "Scheduler", i: int, at: float, actions: list[Action]) -> None:
    """A rerun from a failure or a cancel: a fresh attempt budget from the attempts made so far."""
    s._base[i] = s._attempt[i]

def unsucceed(s: "Scheduler", i: int, at: float, actions: list[Action]) -> None:
    """A rerun of a task that had succeeded: its dependents no longer count it as ended."""
    uncount(s, i, s._ok)

def unfail(s: "Scheduler", i: int, at: float, actions: list[Action]) -> None:
    """A rerun of a task that had failed (or failed upstream)."""
    s._culprit.pop(i, None)
    uncount(s, i, s._bad)

def unskip(s: "Scheduler", i: int, at: float, actions: list[Action]) -> None:
    """A rerun of a task that had been skipped."""
    uncount(s, i, s._skip)

def uncount(s: "Scheduler", i: int, counter: array) -> None:
    s._base[i] = s._attempt[i]
    if i in s._children.parent:  # a child: its mapped task waits for it again
        s._children.reopen(i, counter is s._bad)
        return
    for dependent in s._dependents_of(i):
        counter[dependent] -= 1
