"""Which run the current process is executing a task for, if any.

A worker sets this around each attempt so that ``Workflow.get_task_result``
inside a task can read the upstream result of *this* run from Redis instead
of from the (empty) ``Workflow`` object the worker imported.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional


@dataclass(frozen=True)
class TaskContext:
    run_id: str
    task: str
    attempt: int
    fetch_result: Callable[[str], Any]


_current: contextvars.ContextVar[Optional[TaskContext]] = contextvars.ContextVar("orch_task", default=None)


def current() -> Optional[TaskContext]:
    """The run, task and attempt number this process is executing now (``None`` outside a task).

    Exported as ``orchestrator.current_task``: a task can read
    ``current_task().attempt`` to behave differently on a retry.
    """
    return _current.get()


@contextlib.contextmanager
def running(context: TaskContext) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)
