"""Retry policies: whether a failed attempt is retried, and after how long.

Pure functions of a task's settings and what the attempt reported, with the random
source passed in (for ``retry_jitter``), so the scheduler stays free of I/O and
clock and the tests can pin every draw.

- ``retry_on``: only exceptions of these classes (and their subclasses) are
  retried. An attempt reports the classes of what it raised (``types``, most
  derived first), so the check needs no import on the coordinator. A timeout
  counts as :class:`~shared.errors.TaskTimeout`, a dead work process or a lost
  worker as :class:`~shared.errors.WorkerCrash`.
- ``raise Fail(...)`` fails the task for good; ``raise Skip(...)`` ends it skipped.
- The delay before retry k is ``retry_delay * retry_backoff**(k-1)``, capped at
  ``max_retry_delay``, then spread up to ``retry_jitter`` above it: a retry never
  comes earlier than its delay.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from shared.errors import Fail, MapError, Skip, TaskTimeout, WorkerCrash, class_refs
from shared.states import FailureKind

FAIL_REF = class_refs(Fail)[0]
SKIP_REF = class_refs(Skip)[0]
MAP_ERROR_REF = class_refs(MapError)[0]
_KIND_TYPES = {
    FailureKind.TIMEOUT: class_refs(TaskTimeout),
    FailureKind.CRASHED: class_refs(WorkerCrash),
    FailureKind.LOST: class_refs(WorkerCrash),
}


class RetrySpec(Protocol):
    # Read-only members (properties): the scheduler only reads them, and Task's retry_on_refs is a property.
    @property
    def max_retries(self) -> int: ...

    @property
    def retry_delay(self) -> float: ...

    @property
    def retry_backoff(self) -> float: ...

    @property
    def retry_jitter(self) -> float: ...

    @property
    def max_retry_delay(self) -> Optional[float]: ...

    @property
    def retry_on_refs(self) -> Optional[tuple[str, ...]]: ...


def failure_types(kind: FailureKind, types: Sequence[str]) -> Sequence[str]:
    """The exception classes an attempt failed with: those it reported, else those its kind stands for."""
    return types or _KIND_TYPES.get(kind, ())


def is_skip(types: Sequence[str]) -> bool:
    return SKIP_REF in types


def not_retried(spec: RetrySpec, types: Sequence[str]) -> Optional[str]:
    """Why an attempt that failed with ``types`` is not retried although retries are left, or ``None``."""
    if FAIL_REF in types:
        return "the task raised Fail"
    if MAP_ERROR_REF in types:
        return "its input cannot be mapped"
    allowed = spec.retry_on_refs
    if allowed is not None and not set(types) & set(allowed):
        name = types[0].rpartition(":")[2] if types else "an error of unknown type"
        return f"{name} is not in retry_on"
    return None


def retry_delay(spec: RetrySpec, failed_attempt: int, random: Optional[Callable[[], float]] = None) -> float:
    """Delay before the retry that follows ``failed_attempt`` (1-based, counted from the task's latest
    rerun, if any): ``delay * backoff**(k-1)``, capped at ``max_retry_delay``, times ``1 + jitter * random()``."""
    delay = spec.retry_delay * spec.retry_backoff ** (failed_attempt - 1)
    if spec.max_retry_delay is not None:
        delay = min(delay, spec.max_retry_delay)
    jitter = spec.retry_jitter
    if jitter and random is not None:
        delay *= 1.0 + jitter * random()
    return delay
