"""``Task``: one node of a workflow, its definition and what its run made of it."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from shared.errors import InvalidTaskError
from shared.refs import import_reference, is_reference
from shared.states import TaskState


class Task:
    """A unit of work and its dependencies.

    ``func`` is a callable or an import reference ``"package.module:function"``.
    ``max_retries=N`` allows up to N+1 attempts; the delay before retry k is
    ``retry_delay * retry_backoff**(k-1)``. ``timeout`` (seconds) bounds each
    attempt. ``queue`` names the worker queue it runs on in distributed mode.

    After (and during) a run: ``state``, ``result``, ``error`` (one readable
    line with the exception type), ``traceback``, ``attempts`` (attempts
    started), ``started_at`` / ``finished_at`` (epoch seconds), ``duration``,
    ``worker`` (who ran the latest attempt), ``retry_at`` (while retrying) and
    ``log`` (what the latest attempt printed and logged, read when asked).
    """

    def __init__(
        self,
        name: str,
        func: Union[Callable[..., Any], str],
        dependencies: Iterable[str] = (),
        max_retries: int = 0,
        retry_delay: float = 0.0,
        timeout: Optional[float] = None,
        *,
        args: Iterable[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        retry_backoff: float = 1.0,
        queue: str = "default",
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidTaskError(str(name), "the name must be a non-empty string")
        self.name = name
        if isinstance(func, str):
            if not is_reference(func):
                raise InvalidTaskError(name, f"func {func!r} is not of the form 'package.module:function'")
        elif not callable(func):
            raise InvalidTaskError(name, f"func must be a callable or 'package.module:function', not {func!r}")
        self.func = func
        if isinstance(dependencies, str):
            dependencies = [dependencies]
        self.dependencies: list[str] = list(dependencies)
        for dep in self.dependencies:
            if not isinstance(dep, str):
                raise InvalidTaskError(name, f"dependencies must be task names, not {dep!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidTaskError(name, f"max_retries must be an integer >= 0, not {max_retries!r}")
        self.max_retries = max_retries
        self.retry_delay = _non_negative(name, "retry_delay", retry_delay)
        self.retry_backoff = _non_negative(name, "retry_backoff", retry_backoff)
        if timeout is not None and (_non_negative(name, "timeout", timeout) == 0):
            raise InvalidTaskError(name, "timeout must be > 0 seconds, or None for no timeout")
        self.timeout = None if timeout is None else float(timeout)
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        if not isinstance(queue, str) or not queue:
            raise InvalidTaskError(name, f"queue must be a non-empty string, not {queue!r}")
        self.queue = queue
        self.reset()

    def reset(self) -> None:
        """Forget the outcome of any earlier run (called at the start of each run)."""
        self.state: TaskState = TaskState.PENDING
        self.result: Any = None
        self.error: Optional[str] = None
        self.traceback: Optional[str] = None
        self.attempts = 0
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.worker: Optional[str] = None
        self.retry_at: Optional[float] = None
        self.log_reader: Optional[Callable[[str, int], str]] = None
        """Reads ``(task, attempt)``'s log from where the run keeps it; set by the run."""

    @property
    def log(self) -> str:
        """The log of the latest attempt (print() output, stderr, ``logging`` records and the
        traceback of a failure); ``""`` before any attempt, or if it printed nothing."""
        if not self.attempts or self.log_reader is None:
            return ""
        return self.log_reader(self.name, self.attempts)

    @property
    def duration(self) -> Optional[float]:
        """Seconds from the first start to the end, once both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def resolve(self) -> Callable[..., Any]:
        """The callable to run: ``func`` itself, or the function its reference names."""
        return import_reference(self.func) if isinstance(self.func, str) else self.func

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, state={self.state.value!r}, attempts={self.attempts})"


def _non_negative(task: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidTaskError(task, f"{what} must be a finite number >= 0, not {value!r}")
    return float(value)
