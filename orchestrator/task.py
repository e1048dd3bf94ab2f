"""``Task``: one node of a workflow, its definition and what its run made of it."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from orchestrator.trigger_rules import TriggerRule, rule_of
from shared.errors import InvalidTaskError
from shared.upstream import Mapped, mapped_over
from shared.refs import import_reference, is_reference
from shared.states import TaskState


@dataclass(frozen=True)
class AttemptRecord:
    """How one attempt of a task ended: ``state`` is ``success``, ``failure`` (retried or not) or
    ``cancelled``; times are epoch seconds (``None`` when not known)."""

    attempt: int
    state: str
    error: Optional[str] = None
    worker: Optional[str] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None and k != "attempt"},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, attempt: int, text: Union[str, bytes]) -> "AttemptRecord":
        """Raises ``ValueError`` (or ``TypeError``) for a damaged record."""
        fields = json.loads(text)
        return cls(attempt, str(fields["state"]), fields.get("error"), fields.get("worker"),
                   fields.get("started_at"), fields.get("finished_at"))


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
    Across reruns from failure (``Workflow.retry``) attempt numbers keep growing:
    ``attempt_base`` is the number of attempts made before the latest rerun of the
    task, and ``history`` holds an :class:`AttemptRecord` for each earlier attempt
    (each failed one, and a succeeded one that a rerun superseded).

    Slotted: a coordinator holds one per task of a run (100,000 in a large DAG), and a
    per-instance ``__dict__`` would be most of their memory.
    """

    __slots__ = ("name", "func", "dependencies", "max_retries", "retry_delay", "retry_backoff", "timeout",
                 "args", "_kwargs", "queue", "state", "result", "error", "traceback", "attempts", "started_at",
                 "finished_at", "worker", "retry_at", "attempt_base", "history", "trigger_rule", "retry_on",
                 "retry_jitter", "max_retry_delay", "log_reader", "map_over", "map_parent", "__weakref__")

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
        trigger_rule: Union[TriggerRule, str] = TriggerRule.ALL_SUCCESS,
        retry_on: Union[None, type, str, Iterable[Union[type, str]]] = None,
        retry_jitter: float = 0.0,
        max_retry_delay: Optional[float] = None,
        map_over: Union[str, Iterable[str], None] = None,
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
        self._kwargs: Optional[dict[str, Any]] = dict(kwargs) if kwargs else None
        if map_over is not None:
            self._map_over(map_over)
        self.map_over = mapped_over(self.args, self.call_kwargs)
        """The upstream tasks this task maps over: one child per item of their results (zipped)."""
        self.map_parent: Optional[str] = None
        """For a child of a mapped task (``transform[3]``), the mapped task's name."""
        if not isinstance(queue, str) or not queue:
            raise InvalidTaskError(name, f"queue must be a non-empty string, not {queue!r}")
        self.queue = queue
        self.trigger_rule, self.retry_on, self.retry_jitter, self.max_retry_delay = _policy(
            name, trigger_rule, retry_on, retry_jitter, max_retry_delay)
        self.reset()

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``func``: the task's own dict (changes to it are kept).

        A task without any holds no dict until this is read (100,000 empty dicts are 6 MB of a
        large run's coordinator); orch's own code reads :attr:`call_kwargs`, which makes none."""
        if self._kwargs is None:
            self._kwargs = {}
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: dict[str, Any]) -> None:
        self._kwargs = value

    @property
    def call_kwargs(self) -> Mapping[str, Any]:
        """The keyword arguments for ``func``, read only, without making a dict for a task that has none."""
        return _NO_KWARGS if self._kwargs is None else self._kwargs

    def _map_over(self, names: Union[str, Iterable[str]]) -> None:
        """The classic API's ``map_over="extract"``: each child gets its item(s) as its first argument(s)."""
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise InvalidTaskError(self.name, f"map_over must name one or more upstream tasks, not {names!r}")
        self.dependencies += [name for name in names if name not in self.dependencies]
        self.args = (*map(Mapped, names), *self.args)

    def child(self, name: str, args: tuple, kwargs: dict) -> "Task":
        """Child ``name`` of this mapped task, with its own arguments and this task's settings."""
        made = Task(name, self.func, (), self.max_retries, self.retry_delay, self.timeout, args=args, kwargs=kwargs,
                    retry_backoff=self.retry_backoff, queue=self.queue, retry_on=self.retry_on,
                    retry_jitter=self.retry_jitter, max_retry_delay=self.max_retry_delay)
        made.map_parent = self.name
        return made

    @property
    def retry_on_refs(self) -> Optional[tuple[str, ...]]:
        """``retry_on`` as ``module:qualname`` names (what attempts report), or ``None`` if not set."""
        if self.retry_on is None:
            return None
        return tuple(item if isinstance(item, str) else f"{item.__module__}:{item.__qualname__}"
                     for item in self.retry_on)

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
        self.attempt_base = 0
        self.history: tuple[AttemptRecord, ...] = ()  # a tuple: no list per task of a large run
        self.log_reader: Optional[Callable[[str, int], str]] = None
        """Reads ``(task, attempt)``'s log from where the run keeps it; set by the run."""

    @property
    def log(self) -> str:
        """The log of the latest attempt (print() output, stderr, ``logging`` records and the
        traceback of a failure); ``""`` before any attempt, or if it printed nothing."""
        if not self.attempts or self.log_reader is None:
            return ""
        return self.log_reader(self.name, self.attempts)

    def take_outcome(self, other: "Task") -> None:
        """Take every field a run sets (those :meth:`reset` clears) from ``other``, the same task as
        loaded from a stored run."""
        for name in _OUTCOME_FIELDS:
            setattr(self, name, getattr(other, name))

    def rerun(self, attempt_base: int) -> None:
        """Back to pending for a rerun from failure: the outcome goes, the attempt count and history stay."""
        self.state = TaskState.PENDING
        self.result = self.error = self.traceback = None
        self.started_at = self.finished_at = self.worker = self.retry_at = None
        self.attempt_base = attempt_base

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


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})

_OUTCOME_FIELDS = ("state", "result", "error", "traceback", "attempts", "started_at", "finished_at", "worker",
                   "retry_at", "attempt_base", "history")


def _policy(task: str, trigger_rule: Any, retry_on: Any, retry_jitter: Any, max_retry_delay: Any
            ) -> tuple[TriggerRule, Optional[tuple[Union[type, str], ...]], float, Optional[float]]:
    """The trigger rule and retry policy of a task, checked: ``retry_on`` is exception classes (or
    their ``module:Qualname`` names, as a stored run has them), ``retry_jitter`` in 0..1."""
    try:
        rule = rule_of(trigger_rule)
    except ValueError as exc:
        raise InvalidTaskError(task, str(exc)) from None
    if retry_on is not None:
        retry_on = (retry_on,) if isinstance(retry_on, (type, str)) else tuple(retry_on)
        for item in retry_on:
            if not ((isinstance(item, type) and issubclass(item, BaseException))
                    or (isinstance(item, str) and is_reference(item))):
                raise InvalidTaskError(task, f"retry_on must hold exception classes, not {item!r}")
    jitter = _non_negative(task, "retry_jitter", retry_jitter)
    if jitter > 1:
        raise InvalidTaskError(task, f"retry_jitter must be between 0 and 1, not {retry_jitter!r}")
    cap = None if max_retry_delay is None else _non_negative(task, "max_retry_delay", max_retry_delay)
    return rule, retry_on, jitter, cap


def _non_negative(task: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidTaskError(task, f"{what} must be a finite number >= 0, not {value!r}")
    return float(value)
