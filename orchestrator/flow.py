"""``@task`` and ``@flow``: a workflow written as calls, results passed as arguments.

Inside a ``@flow`` function, calling a ``@task`` runs nothing: it records a
:class:`~orchestrator.task.Task` in the flow's :class:`~orchestrator.workflow.Workflow`
and returns a :class:`TaskHandle`. A handle passed to another task (also inside
lists, tuples, sets and dict values) becomes a dependency, and an
:class:`~shared.upstream.Upstream` record in that argument's place, which the
attempt replaces by the upstream's result when it runs. The graph is plain data
once the flow function returns, so everything that takes a ``Workflow`` (both
backends, ``orch submit``/``validate``/``graph``) takes a flow's.

Outside a flow, a ``@task`` is its plain function: ``extract("2026-12-01")`` calls it
(what a worker does when it imports the task by reference, and what a unit test does).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass, field, replace as with_fields
from typing import Any, Callable, Mapping, Optional, TypeVar, overload

from orchestrator.task import Task
from orchestrator.workflow import Workflow
from shared import codec
from shared.errors import DuplicateTaskError, FlowError
from shared.upstream import Mapped, Upstream, replace

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What a ``@task`` sets on each :class:`Task` it records; :meth:`TaskFunction.with_options` overrides."""

    name: Optional[str] = None
    queue: str = "default"
    max_retries: int = 0
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    timeout: Optional[float] = None
    trigger_rule: str = "all_success"
    retry_on: Any = None
    retry_jitter: float = 0.0
    max_retry_delay: Optional[float] = None


@dataclass(frozen=True, eq=False)
class TaskHandle:
    """The future result of task ``name`` of one build of a flow. Pass it to other tasks; its value is
    not known while the flow is built, so it cannot be tested, indexed or iterated."""

    name: str
    build: "_Build" = field(repr=False)

    def _unknown(self, *_: Any) -> Any:
        raise FlowError(f"the result of task {self.name!r} is not known while the flow is built: pass the "
                        "handle to another task as an argument and use the value there")

    __bool__ = __iter__ = __len__ = __getitem__ = _unknown


class TaskFunction:
    """A function made a task by ``@task``. Call it inside a ``@flow`` to record a task (returns a
    :class:`TaskHandle`); call it anywhere else to run the plain function."""

    # Set by functools.update_wrapper in __init__ (declared for the type checker).
    __wrapped__: Callable[..., Any]
    __name__: str
    __qualname__: str

    def __init__(self, func: Callable[..., Any], options: TaskOptions) -> None:
        functools.update_wrapper(self, func)  # __module__, __qualname__, __wrapped__: workers import it by name
        self.options = options

    def with_options(self, **overrides: Any) -> "TaskFunction":
        """The same task with other options for the calls made through it: any option of ``@task``."""
        unknown = set(overrides) - set(TaskOptions.__dataclass_fields__)
        if unknown:
            raise FlowError(f"with_options() of task {self.__name__!r} got unknown option(s) "
                            f"{', '.join(sorted(unknown))} (known: {', '.join(TaskOptions.__dataclass_fields__)})")
        return TaskFunction(self.__wrapped__, with_fields(self.options, **overrides))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        build = _current_build.get()
        if build is None:
            replace((args, kwargs), _no_handle_outside_a_flow)
            return self.__wrapped__(*args, **kwargs)
        return build.record(self, args, kwargs)

    def map(self, *args: Any, **kwargs: Any) -> "TaskHandle":
        """Inside a flow: one task that expands, when it runs, into a child per item of each handle
        given as an argument (several handles are zipped; their results must have the same length).
        Other arguments go unchanged to every child. Its result is the list of its children's results."""
        build = _current_build.get()
        if build is None:
            raise FlowError(f"{self.__name__}.map() records a mapped task: call it inside a @flow function")
        return build.record(self, args, kwargs, mapped=True)

    def __repr__(self) -> str:
        return f"<task {self.__module__}:{self.__qualname__}>"


@overload
def task(func: F) -> TaskFunction: ...
@overload  # noqa: E302
def task(*, name: Optional[str] = None, queue: str = "default", max_retries: int = 0, retry_delay: float = 0.0,
         retry_backoff: float = 1.0, timeout: Optional[float] = None, trigger_rule: str = "all_success",
         retry_on: Any = None, retry_jitter: float = 0.0,
         max_retry_delay: Optional[float] = None) -> Callable[[F], TaskFunction]: ...


def task(func: Optional[Callable[..., Any]] = None, **options: Any) -> Any:
    """Make ``func`` a task: ``@task`` or ``@task(max_retries=3, retry_delay=1.0, timeout=30, queue="io")``;
    the options are those of :class:`~orchestrator.task.Task` (and ``name``).

    The function must live at module level of an importable module, as for the classic ``Task``: workers
    import it by its name.
    """
    settings = TaskOptions(**options)
    if func is None:
        return lambda f: TaskFunction(f, settings)
    return TaskFunction(func, settings)


class Flow:
    """A function made a flow by ``@flow``: :meth:`build` records its tasks into a :class:`Workflow`,
    :meth:`run` builds and runs it. The function's parameters are the flow's parameters."""

    __wrapped__: Callable[..., Any]  # set by functools.update_wrapper in __init__

    def __init__(self, func: Callable[..., Any], name: Optional[str] = None) -> None:
        # update_wrapper only copies attributes; typeshed wants a callable, and a Flow is built, not called.
        functools.update_wrapper(self, func)  # type: ignore[arg-type]
        self.name = name or func.__name__
        self.signature = inspect.signature(func)

    def build(self, **params: Any) -> Workflow:
        """A new :class:`Workflow` named after the flow, holding the tasks the flow function records
        when called with ``params`` (its defaults fill in the rest)."""
        bound = self._bind(params)
        build = _Build(Workflow(self.name))
        token = _current_build.set(build)
        try:
            self.__wrapped__(*bound.args, **bound.kwargs)
        finally:
            _current_build.reset(token)
            build.closed = True
        return build.workflow

    def run(self, *, redis_url: Optional[str] = None, max_workers: Optional[int] = None,
            **params: Any) -> dict[str, Any]:
        """Build with ``params`` and run: embedded, or on workers given ``redis_url``. The parameters
        are the run's too (recorded with it, ``current_task().params`` in every task). Returns
        ``{task: result}`` of the tasks that succeeded, as :meth:`Workflow.run` does."""
        workflow = self.build(**params)
        self.last_workflow = workflow
        return workflow.run(max_workers, redis_url=redis_url, params=params)

    def _bind(self, params: Mapping[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(**params)
        except TypeError as exc:
            names = ", ".join(self.signature.parameters) or "none"
            raise FlowError(f"flow {self.name!r}: {exc} (its parameters: {names})") from None
        bound.apply_defaults()
        return bound

    def __repr__(self) -> str:
        return f"<flow {self.name!r}>"


def flow(func: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None) -> Any:
    """Make ``func`` a flow: ``@flow`` or ``@flow(name="etl")``."""
    if func is None:
        return lambda f: Flow(f, name)
    return Flow(func, name)


class _Build:
    """One call of a flow function: the workflow being filled and the names given so far."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow
        self.closed = False

    def record(self, function: TaskFunction, args: tuple, kwargs: dict, mapped: bool = False) -> TaskHandle:
        options = function.options
        name = options.name or self._free_name(function.__name__)
        if name in self.workflow:
            raise DuplicateTaskError(name)
        dependencies: list[str] = []

        def upstream(value: Any) -> Any:
            if not isinstance(value, TaskHandle):
                return value
            if value.build is not self:
                where = "a flow that already returned" if value.build.closed else "another flow"
                raise FlowError(f"task {name!r} is given the handle of task {value.name!r} from {where}; "
                                "pass handles only to tasks of the same flow, while it is built")
            if value.name not in dependencies:
                dependencies.append(value.name)
            return Upstream(value.name)

        if mapped:
            if not any(isinstance(value, TaskHandle) for value in (*args, *kwargs.values())):
                raise FlowError(f"{function.__name__}.map() needs a task handle to map over among its arguments")
            args = tuple(Mapped(upstream(v).task) if isinstance(v, TaskHandle) else v for v in args)
            kwargs = {k: Mapped(upstream(v).task) if isinstance(v, TaskHandle) else v for k, v in kwargs.items()}
        args, kwargs = replace((tuple(args), dict(kwargs)), upstream)
        codec.encode((args, kwargs), f"an argument of task {name!r}")
        self.workflow.add_task(Task(
            name, function.__wrapped__, dependencies, max_retries=options.max_retries,
            retry_delay=options.retry_delay, timeout=options.timeout, args=args, kwargs=kwargs,
            retry_backoff=options.retry_backoff, queue=options.queue, trigger_rule=options.trigger_rule,
            retry_on=options.retry_on, retry_jitter=options.retry_jitter, max_retry_delay=options.max_retry_delay))
        return TaskHandle(name, self)

    def _free_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``, ... for the second and later calls."""
        name, n = base, 1
        while name in self.workflow:
            n += 1
            name = f"{base}-{n}"
        return name


_current_build: contextvars.ContextVar[Optional[_Build]] = contextvars.ContextVar("orch_flow_build", default=None)


def _no_handle_outside_a_flow(value: Any) -> Any:
    if isinstance(value, TaskHandle):
        raise FlowError(f"the handle of task {value.name!r} is used after its flow returned: handles are "
                        "arguments for tasks called inside the same flow")
    return value
