"""Events: what happened to a task, fed into the scheduler.

Workers (through a backend) report ``TaskStarted`` / ``TaskSucceeded`` /
``TaskFailed``; the coordinator's own timers report ``RetryDue``; users report
``RunCancelled``. Every task event carries the attempt number it is about, so
that a late report from a superseded attempt can be recognised and ignored.
Times are seconds on the coordinator's clock, passed in, never read here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from shared.states import FailureKind


@dataclass(frozen=True, slots=True)
class TaskStarted:
    task: str
    attempt: int
    at: float
    worker: Optional[str] = None


@dataclass(frozen=True, slots=True)
class TaskSucceeded:
    task: str
    attempt: int
    at: float
    result: Any = field(default=None, compare=False, repr=False)
    started_at: Optional[float] = None


@dataclass(frozen=True, slots=True)
class TaskFailed:
    task: str
    attempt: int
    at: float
    error: str
    kind: FailureKind = FailureKind.ERROR
    traceback: Optional[str] = field(default=None, compare=False, repr=False)
    started_at: Optional[float] = None
    types: tuple[str, ...] = ()
    """The exception's class and its bases, as ``module:qualname`` (most derived first), when the task
    raised one: what ``retry_on``, ``Fail`` and ``Skip`` are checked against."""


@dataclass(frozen=True, slots=True)
class RetryDue:
    """The delay before ``attempt`` of ``task`` has passed."""

    task: str
    attempt: int
    at: float


@dataclass(frozen=True, slots=True)
class MapExpanded:
    """Attempt ``attempt`` of mapped task ``task`` expands into ``count`` children (the coordinator
    worked them out from the upstream results, answering ``ExpandMap``)."""

    task: str
    attempt: int
    at: float
    count: int


@dataclass(frozen=True, slots=True)
class RunCancelled:
    at: float
    by: str = "user"


TaskEvent = Union[TaskStarted, TaskSucceeded, TaskFailed, RetryDue, MapExpanded]
Event = Union[TaskStarted, TaskSucceeded, TaskFailed, RetryDue, MapExpanded, RunCancelled]
