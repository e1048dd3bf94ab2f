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


def _no_params() -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TaskContext:
    run_id: str
    task: str
    attempt: int
    fetch_result: Callable[[str], Any]
    fetch_params: Callable[[], dict[str, Any]] = _no_params
    """Returns a fresh copy of the run's parameters (read lazily: a task that never asks costs nothing)."""

    @property
    def params(self) -> dict[str, Any]:
        """The parameters the run was submitted with (``orch submit --param``, ``run(params=...)``)."""
        return self.fetch_params()


_current: contextvars.ContextVar[Optional[TaskContext]] = contextvars.ContextVar("orch_task", default=None)


def current() -> Optional[TaskContext]:
    """The run, task and attempt number this process is executing now (``None`` outside a task).

    Exported as ``orchestrator.current_task``: a task can read
    ``current_task().attempt`` to behave differently on a retry, and
    ``current_task().params`` for the run's parameters.
    """
    return _current.get()


@contextlib.contextmanager
def running(context: TaskContext) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)
