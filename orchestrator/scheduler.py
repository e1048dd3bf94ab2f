"""The pure scheduler: a state machine over the tasks of one run.

Events go in (:mod:`shared.events`), actions come out (:mod:`orchestrator.actions`);
there is no I/O and no clock here, so every backend shares these semantics and
the tests can drive it with plain values.

Every legal move of a task is in :data:`TRANSITIONS`, a table of
``(start, finish) -> handler``; any other move raises :class:`InvalidTransition`.
Reports that do not fit the current attempt (a late result from a superseded
attempt, a duplicate, a report for a finished task) are ignored and written to
the task's story, never applied: only the current attempt can commit.

Cost: ``start`` and a whole run of events are O(V + E): each task is queued,
finished and propagated through once per attempt, and readiness is a counter
of unfinished dependencies per task, as in :class:`graphlib.TopologicalSorter`.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

from orchestrator.dag import Graph, analyse
from orchestrator.actions import Action, Dispatch, RunFinished, ScheduleRetry, StopTask, Transition
from shared.errors import InvalidTransition, UnknownTaskError
from shared.events import Event, RetryDue, RunCancelled, TaskFailed, TaskStarted, TaskSucceeded
from shared.states import TERMINAL_STATES, FailureKind, RunState, TaskState

P, Q, R, W, S, F, C = (
    TaskState.PENDING,
    TaskState.QUEUED,
    TaskState.RUNNING,
    TaskState.RETRYING,
    TaskState.SUCCESS,
    TaskState.FAILURE,
    TaskState.CANCELLED,
)


class TaskSpec(Protocol):
    """What the scheduler needs to know of a task (a :class:`~orchestrator.task.Task` fits)."""

    name: str
    dependencies: Sequence[str]
    max_retries: int
    retry_delay: float
    retry_backoff: float


def retry_delay(spec: TaskSpec, failed_attempt: int) -> float:
    """Delay before the retry that follows ``failed_attempt`` (1-based): ``delay * backoff**(k-1)``."""
    return spec.retry_delay * spec.retry_backoff ** (failed_attempt - 1)


class Scheduler:
    """Holds the state of every task of one run and decides every move.

    The DAG is validated here unless the caller passes the :class:`Graph` its
    own validation made.
    """

    def __init__(self, specs: Iterable[TaskSpec], graph: Optional[Graph] = None) -> None:
        """``graph``, if given, must be :func:`orchestrator.dag.analyse` of the same specs."""
        self._specs: dict[str, TaskSpec] = {s.name: s for s in specs}
        self._state: dict[str, TaskState] = dict.fromkeys(self._specs, P)
        self._attempt: dict[str, int] = dict.fromkeys(self._specs, 0)
        self._error: dict[str, str] = {}
        graph = graph or analyse(self._specs)
        self._dependents: Mapping[str, list[str]] = graph.dependents  # read, never changed
        self._waiting_on: dict[str, int] = dict(graph.indegree)
        self._unfinished = len(self._specs)
        self._counts: Counter[TaskState] = Counter({P: len(self._specs)})
        self._stories: dict[str, list[tuple]] = {}
        self._started = False
        self._finish_reported = False
        self.cancelled_by: Optional[str] = None
        self.cancelled_at: Optional[float] = None

    @classmethod
    def restore(
        cls,
        specs: Iterable[TaskSpec],
        records: Mapping[str, tuple[TaskState, int, Optional[str]]],
        at: float,
        graph: Optional[Graph] = None,
    ) -> tuple["Scheduler", list[Action]]:
        """A started scheduler in the state a persisted run left (``name -> (state, attempt, error)``).

        Used to resume a run whose coordinator died. Tasks missing from
        ``records`` are pending. Returns the actions that bring a state which a
        crash could leave inconsistent back in line: a pending task whose
        dependencies all succeeded is queued, one with a failed dependency fails.
        Queued, running and retrying tasks stay as they are: their outcomes (or
        retry timers, which the caller re-arms) are still to come.
        """
        scheduler = cls(specs, graph)
        scheduler._started = True
        for name, (state, attempt, error) in records.items():
            if name not in scheduler._state:
                continue
            scheduler._counts[P] -= 1
            scheduler._counts[state] += 1
            scheduler._state[name] = state
            scheduler._attempt[name] = attempt
            if error:
                scheduler._error[name] = error
            if state in TERMINAL_STATES:
                scheduler._unfinished -= 1
            scheduler._stories.setdefault(name, []).append(("restored", state, state, at))
        for name, state in scheduler._state.items():
            if state is S:
                for dependent in scheduler._dependents[name]:
                    scheduler._waiting_on[dependent] -= 1
        actions: list[Action] = []
        for name, state in scheduler._state.items():
            if state is F:
                scheduler._fail_downstream(name, at, actions)
        for name, state in list(scheduler._state.items()):
            if state is P and scheduler._waiting_on[name] == 0:
                scheduler._move(name, Q, at, actions, "restored with all dependencies done")
        scheduler._check_finished(at, actions)
        return scheduler, actions

    # ----------------------------------------------------------------- queries
    def state(self, task: str) -> TaskState:
        try:
            return self._state[task]
        except KeyError:
            raise UnknownTaskError(task) from None

    def attempts(self, task: str) -> int:
        """Attempts dispatched so far (the current attempt's number)."""
        return self._attempt[task]

    def error(self, task: str) -> Optional[str]:
        return self._error.get(task)

    def counts(self) -> dict[TaskState, int]:
        return {state: n for state, n in self._counts.items() if n}

    @property
    def started(self) -> bool:
        return self._started

    @property
    def finished(self) -> bool:
        return self._started and self._unfinished == 0

    @property
    def run_state(self) -> RunState:
        if not self.finished:
            return RunState.RUNNING
        if self._counts[C]:
            return RunState.CANCELLED
        if self._counts[F]:
            return RunState.FAILURE
        return RunState.SUCCESS

    def story(self, task: str) -> list[tuple]:
        """``(cause, start, finish, at)`` for every move (or ignored report) of ``task``, oldest first."""
        return list(self._stories.get(task, ()))

    # ------------------------------------------------------------------ events
    def start(self, at: float) -> list[Action]:
        """Queue every task without dependencies. Call once, before any event."""
        if self._started:
            raise RuntimeError("Scheduler.start() called twice")
        self._started = True
        actions: list[Action] = []
        for name, waiting in self._waiting_on.items():
            if waiting == 0:
                self._move(name, Q, at, actions, "start")
        self._check_finished(at, actions)
        return actions

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return what must happen because of it."""
        if not self._started:
            raise RuntimeError("Scheduler.handle() before start()")
        actions: list[Action] = []
        if isinstance(event, RunCancelled):
            self._cancel(event, actions)
        else:
            if event.task not in self._state:
                raise UnknownTaskError(event.task)
            handler = _EVENT_HANDLERS[type(event)]
            handler(self, event, actions)
        self._check_finished(event.at, actions)
        return actions

    def handle_all(self, events: Iterable[Event]) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            actions.extend(self.handle(event))
        return actions

    def _is_current(self, event: TaskStarted | TaskSucceeded | TaskFailed, allowed: frozenset) -> bool:
        name = event.task
        if event.attempt == self._attempt[name] and self._state[name] in allowed:
            return True
        self._stories.setdefault(name, []).append(
            (f"ignored {type(event).__name__}(attempt {event.attempt})", self._state[name], self._state[name], event.at)
        )
        return False

    def _on_started(self, event: TaskStarted, actions: list[Action]) -> None:
        if self._is_current(event, _QUEUED):
            self._move(event.task, R, event.at, actions, "started")

    def _on_succeeded(self, event: TaskSucceeded, actions: list[Action]) -> None:
        if self._is_current(event, _ACTIVE):
            self._move(event.task, S, event.at, actions, "succeeded")

    def _on_failed(self, event: TaskFailed, actions: list[Action]) -> None:
        if not self._is_current(event, _ACTIVE):
            return
        name = event.task
        self._error[name] = event.error
        if self._attempt[name] <= self._specs[name].max_retries:
            self._move(name, W, event.at, actions, "failed", kind=event.kind)
        else:
            self._move(name, F, event.at, actions, "failed", kind=event.kind)

    def _on_retry_due(self, event: RetryDue, actions: list[Action]) -> None:
        name = event.task
        if self._state[name] is W and event.attempt == self._attempt[name] + 1:
            self._move(name, Q, event.at, actions, "retry due")
        else:
            self._stories.setdefault(name, []).append(
                (f"ignored RetryDue(attempt {event.attempt})", self._state[name], self._state[name], event.at)
            )

    def _cancel(self, event: RunCancelled, actions: list[Action]) -> None:
        if self.cancelled_by is None and self._unfinished:
            self.cancelled_by = event.by
            self.cancelled_at = event.at
        for name, state in self._state.items():
            if state not in TERMINAL_STATES:
                self._error[name] = f"cancelled by {event.by}"
                self._move(name, C, event.at, actions, "cancelled", kind=FailureKind.CANCELLED)

    # ------------------------------------------------------------- transitions
    def _move(
        self,
        name: str,
        finish: TaskState,
        at: float,
        actions: list[Action],
        cause: str,
        kind: Optional[FailureKind] = None,
    ) -> None:
        start = self._state[name]
        handler = TRANSITIONS.get((start, finish))
        if handler is None:
            raise InvalidTransition(name, start, finish, self.story(name))
        self._state[name] = finish
        self._counts[start] -= 1
        self._counts[finish] += 1
        if finish in TERMINAL_STATES:
            self._unfinished -= 1
        if finish is S:
            self._error.pop(name, None)
        self._stories.setdefault(name, []).append((cause, start, finish, at))
        attempt = self._attempt[name] + (1 if finish is Q else 0)
        actions.append(Transition(name, start, finish, attempt, at, self._error.get(name), kind))
        handler(self, name, at, actions)

    def _queue(self, name: str, at: float, actions: list[Action]) -> None:
        self._attempt[name] += 1
        actions.append(Dispatch(name, self._attempt[name]))

    def _nothing(self, name: str, at: float, actions: list[Action]) -> None:
        pass

    def _succeed(self, name: str, at: float, actions: list[Action]) -> None:
        for dependent in self._dependents[name]:
            self._waiting_on[dependent] -= 1
            if self._waiting_on[dependent] == 0 and self._state[dependent] is P:
                self._move(dependent, Q, at, actions, f"{name} succeeded")

    def _schedule_retry(self, name: str, at: float, actions: list[Action]) -> None:
        attempt = self._attempt[name]
        actions.append(ScheduleRetry(name, attempt + 1, at + retry_delay(self._specs[name], attempt)))

    def _fail_downstream(self, name: str, at: float, actions: list[Action]) -> None:
        """Fail every pending transitive dependent of ``name``, naming ``name`` as the cause."""
        message = f"upstream task {name!r} failed"
        stack = list(self._dependents[name])
        while stack:
            dependent = stack.pop()
            if self._state[dependent] is not P:
                continue
            self._error[dependent] = message
            self._state[dependent] = F
            self._counts[P] -= 1
            self._counts[F] += 1
            self._unfinished -= 1
            self._stories.setdefault(dependent, []).append((message, P, F, at))
            actions.append(Transition(dependent, P, F, self._attempt[dependent], at, message, FailureKind.UPSTREAM))
            stack.extend(self._dependents[dependent])

    def _stop(self, name: str, at: float, actions: list[Action]) -> None:
        actions.append(StopTask(name, self._attempt[name]))

    def _check_finished(self, at: float, actions: list[Action]) -> None:
        if self._unfinished == 0 and not self._finish_reported:
            self._finish_reported = True
            actions.append(RunFinished(self.run_state, at))

    # ---------------------------------------------------------------- checking
    def validate_state(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one. For tests."""
        counts: Counter[TaskState] = Counter(self._state.values())
        assert +counts == +self._counts, f"counts {self._counts} != actual {counts}"
        unfinished = sum(1 for s in self._state.values() if s not in TERMINAL_STATES)
        assert unfinished == self._unfinished, f"unfinished {self._unfinished} != actual {unfinished}"
        for name, spec in self._specs.items():
            state = self._state[name]
            deps = set(spec.dependencies)
            not_done = sum(1 for d in deps if self._state[d] is not S)
            assert not_done == self._waiting_on[name], f"{name}: waiting_on {self._waiting_on[name]} != {not_done}"
            if state in (Q, R, W, S):
                assert not_done == 0, f"{name} is {state} before all its dependencies succeeded"
            assert self._attempt[name] <= spec.max_retries + 1, f"{name}: {self._attempt[name]} attempts"
            if state is P:
                assert self._attempt[name] == 0, f"{name} pending after an attempt"


_QUEUED = frozenset({Q})
_ACTIVE = frozenset({Q, R})

TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[[Scheduler, str, float, list], None]] = {
    (P, Q): Scheduler._queue,
    (P, C): Scheduler._nothing,
    (Q, R): Scheduler._nothing,
    (Q, S): Scheduler._succeed,  # a report of success may come without a separate start report
    (Q, W): Scheduler._schedule_retry,  # e.g. the worker could not import the task
    (Q, F): Scheduler._fail_downstream,
    (Q, C): Scheduler._stop,
    (R, S): Scheduler._succeed,
    (R, W): Scheduler._schedule_retry,
    (R, F): Scheduler._fail_downstream,
    (R, C): Scheduler._stop,
    (W, Q): Scheduler._queue,
    (W, C): Scheduler._nothing,
}
"""Every legal move of a task. ``pending -> failure`` (an upstream failed) is made only by
``_fail_downstream``, which walks the descendants itself instead of recursing."""

_EVENT_HANDLERS = {
    TaskStarted: Scheduler._on_started,
    TaskSucceeded: Scheduler._on_succeeded,
    TaskFailed: Scheduler._on_failed,
    RetryDue: Scheduler._on_retry_due,
}
