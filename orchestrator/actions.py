"""Actions: what the scheduler asks its driver to do (or to record).

The scheduler returns these from every call; it never performs I/O itself.
A driver carries out ``Dispatch``, ``ScheduleRetry`` and ``StopTask`` with its
backend, persists each ``Transition``, ends the run on ``RunFinished`` and reopens it on
``RunRerun``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from shared.states import FailureKind, RunState, TaskState


@dataclass(frozen=True, slots=True)
class Transition:
    """``task`` moved from ``start`` to ``finish``; ``attempt`` is its current attempt number."""

    task: str
    start: TaskState
    finish: TaskState
    attempt: int
    at: float
    error: Optional[str] = None
    kind: Optional[FailureKind] = None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start attempt ``attempt`` of ``task`` on a worker."""

    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class ScheduleRetry:
    """Report ``RetryDue(task, attempt)`` once the coordinator's clock reaches ``at``."""

    task: str
    attempt: int
    at: float


@dataclass(frozen=True, slots=True)
class StopTask:
    """Attempt ``attempt`` of ``task`` must not run (on) any more: dequeue or kill it."""

    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class RunFinished:
    state: RunState
    at: float


@dataclass(frozen=True, slots=True)
class RunRerun:
    """A finished run starts again from failure (``Scheduler.rerun``): the driver reopens it
    (running again, not final, kept past its retention) before carrying out the moves that follow."""

    at: float


@dataclass(frozen=True, slots=True)
class ExpandMap:
    """Mapped task ``task`` may start: work out its children from its upstreams' results and report
    ``MapExpanded(task, attempt, count)`` (or a ``TaskFailed`` if its input cannot be mapped)."""

    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class MapChildren:
    """Mapped task ``task`` expanded into ``children`` (their names, in item order), numbered from ``first``
    on: the driver keeps them with the run before the children's dispatches that follow."""

    task: str
    first: int
    children: tuple[str, ...]


Action = Union[Transition, Dispatch, ScheduleRetry, StopTask, RunFinished, RunRerun, ExpandMap, MapChildren]
