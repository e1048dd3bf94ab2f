"""The pure scheduler: a state machine over the tasks of one run.

Events go in (:mod:`shared.events`), actions come out (:mod:`orchestrator.actions`);
there is no I/O and no clock here, so every backend shares these semantics and
the tests can drive it with plain values.

Every legal move of a task is in :data:`TRANSITIONS`, a table of
``(start, finish) -> handler``; any other move raises :class:`InvalidTransition`.
Reports that do not fit the current attempt (a late result from a superseded
attempt, a duplicate, a report for a finished task) are ignored and written to
the task's story, never applied: only the current attempt can commit.
A finished run can be started again from where it failed (:meth:`Scheduler.rerun`):
the only moves out of a final state, back to pending.

Cost: ``start`` and a whole run of events are O(V + E): each task is queued,
finished and propagated through once per attempt, and readiness is a counter
of unfinished dependencies per task, as in :class:`graphlib.TopologicalSorter`.
Memory: a few flat lists indexed by task number and the graph's arrays, shared
with the run's spec; stories are kept compactly (:mod:`orchestrator.story`).
"""
from __future__ import annotations

from array import array
from collections import Counter
from operator import attrgetter
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

from orchestrator.actions import Action, Dispatch, RunFinished, RunRerun, ScheduleRetry, StopTask, Transition
from orchestrator.dag import Graph, analyse
from orchestrator.story import NUMBER, TASK, Stories
from shared.errors import InvalidTransition, NothingToRerunError, UnknownTaskError
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
    """Delay before the retry that follows ``failed_attempt`` (1-based, counted from the task's
    latest rerun, if any): ``delay * backoff**(k-1)``."""
    return spec.retry_delay * spec.retry_backoff ** (failed_attempt - 1)


class Restored(NamedTuple):
    """A task as a persisted run left it (:meth:`Scheduler.restore`). ``base``: the attempts it had
    made before the run's latest rerun (0 if never rerun); its budget counts from there."""

    state: TaskState
    attempt: int
    error: Optional[str]
    base: int = 0


class Scheduler:
    """Holds the state of every task of one run and decides every move.

    The DAG is validated here unless the caller passes the :class:`Graph` its
    own validation made. Inside, a task is its number in the graph (its
    position among the specs) and its state is a slot of a few flat lists, so
    a 100,000-task run costs a few MB here; names go in and come out.
    """

    def __init__(self, specs: Iterable[TaskSpec], graph: Optional[Graph] = None) -> None:
        """``graph``, if given, must be :func:`orchestrator.dag.analyse` of the same specs."""
        specs = list(specs)
        if graph is None:
            graph = analyse({s.name: s for s in specs})
        n = len(graph)
        self._names = graph.names
        self._index = graph.index
        self._specs: list[TaskSpec] = _in_graph_order(specs, graph)
        self._state: list[TaskState] = [P] * n
        self._attempt: list[int] = [0] * n
        self._base: list[int] = [0] * n
        """Attempts made before the task's latest rerun: numbers keep growing for the whole run,
        each rerun gives a fresh budget of ``max_retries + 1`` attempts above this."""
        self._error: dict[int, str] = {}
        self._dependents, self._dependents_start = graph.dependents, graph.dependents_start  # read, never changed
        self._waiting_on = array("i", graph.indegree)
        self._unfinished = n
        self._counts: Counter[TaskState] = Counter({P: n})
        self._stories = Stories(n, graph.names)
        self._started = False
        self._finish_reported = False
        self.cancelled_by: Optional[str] = None
        self.cancelled_at: Optional[float] = None

    @classmethod
    def restore(
        cls,
        specs: Iterable[TaskSpec],
        records: Mapping[str, tuple],
        at: float,
        graph: Optional[Graph] = None,
    ) -> tuple["Scheduler", list[Action]]:
        """A started scheduler in the state a persisted run left (``name -> (state, attempt, error[, base])``,
        see :class:`Restored`).

        Used to resume a run whose coordinator died. Tasks missing from
        ``records`` are pending. Returns the actions that bring a state which a
        crash could leave inconsistent back in line: a pending task whose
        dependencies all succeeded is queued, one with a failed dependency fails.
        Queued, running and retrying tasks stay as they are: their outcomes (or
        retry timers, which the caller re-arms) are still to come.
        """
        scheduler = cls(specs, graph)
        scheduler._started = True
        for name, record in records.items():
            i = scheduler._index.get(name)
            if i is not None:
                scheduler._restore_task(i, Restored(*record), at)
        states, waiting = scheduler._state, scheduler._waiting_on
        for i, state in enumerate(states):
            if state is S:
                for dependent in scheduler._dependents_of(i):
                    waiting[dependent] -= 1
        actions: list[Action] = []
        for i, state in enumerate(states):
            if state is F:
                scheduler._fail_downstream(i, at, actions)
        for i in range(len(states)):
            if states[i] is P and waiting[i] == 0:
                scheduler._move(i, Q, at, actions, "restored with all dependencies done")
        scheduler._check_finished(at, actions)
        return scheduler, actions

    def _restore_task(self, i: int, record: Restored, at: float) -> None:
        state = record.state
        self._counts[P] -= 1
        self._counts[state] += 1
        self._state[i] = state
        self._attempt[i] = record.attempt
        self._base[i] = min(record.base, record.attempt)
        if record.error:
            self._error[i] = record.error
        if state in TERMINAL_STATES:
            self._unfinished -= 1
        self._stories.add(i, "restored", state, state, at)

    # ----------------------------------------------------------------- queries
    def _number(self, task: str) -> int:
        try:
            return self._index[task]
        except KeyError:
            raise UnknownTaskError(task) from None

    def state(self, task: str) -> TaskState:
        return self._state[self._number(task)]

    def attempts(self, task: str) -> int:
        """Attempts dispatched so far in the whole run (the current attempt's number)."""
        return self._attempt[self._number(task)]

    def attempt_base(self, task: str) -> int:
        """Attempts ``task`` had made before the run's latest rerun that reran it (0 if none)."""
        return self._base[self._number(task)]

    def error(self, task: str) -> Optional[str]:
        i = self._index.get(task)
        return None if i is None else self._error.get(i)

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
        i = self._index.get(task)
        return [] if i is None else self._stories.of(i)

    def _dependents_of(self, i: int) -> array:
        return self._dependents[self._dependents_start[i]:self._dependents_start[i + 1]]

    # ------------------------------------------------------------------ events
    def start(self, at: float) -> list[Action]:
        """Queue every task without dependencies. Call once, before any event."""
        if self._started:
            raise RuntimeError("Scheduler.start() called twice")
        self._started = True
        actions: list[Action] = []
        for i, waiting in enumerate(self._waiting_on):
            if waiting == 0:
                self._move(i, Q, at, actions, "start")
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
            i = self._index.get(event.task)
            if i is None:
                raise UnknownTaskError(event.task)
            handler = _EVENT_HANDLERS[type(event)]
            handler(self, i, event, actions)
        self._check_finished(event.at, actions)
        return actions

    def handle_all(self, events: Iterable[Event]) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            actions.extend(self.handle(event))
        return actions

    def rerun(self, tasks: Iterable[str] = (), at: float = 0.0) -> list[Action]:
        """Start a finished run again from where it failed; return what must happen.

        Reruns every task that did not succeed (failed, upstream-failed, cancelled), every
        task named in ``tasks`` even if it succeeded, and everything downstream of those.
        The other succeeded tasks keep their results and never run again. Each rerun task
        goes back to pending with a fresh budget of ``max_retries + 1`` attempts; attempt
        numbers keep growing. Raises :class:`UnknownTaskError` for a name not in the run,
        :class:`NothingToRerunError` if that set is empty, ``RuntimeError`` if the run has
        not finished; in every case nothing changed.
        """
        if not self.finished:
            raise RuntimeError("Scheduler.rerun() before the run finished")
        named = {self._number(task) for task in ([tasks] if isinstance(tasks, str) else tasks)}
        rerun = self._downstream_closure(named | {i for i, state in enumerate(self._state) if state is not S})
        if not rerun:
            raise NothingToRerunError()
        actions: list[Action] = [RunRerun(at)]
        self._finish_reported = False
        self.cancelled_by = self.cancelled_at = None
        for i in rerun:
            self._move(i, P, at, actions, "rerun")
        for i in rerun:
            if self._waiting_on[i] == 0:
                self._move(i, Q, at, actions, "rerun with all dependencies done")
        self._check_finished(at, actions)
        return actions

    def _downstream_closure(self, seeds: set[int]) -> list[int]:
        """``seeds`` and all their transitive dependents, in task-number order."""
        seen = set(seeds)
        stack = list(seeds)
        while stack:
            for dependent in self._dependents_of(stack.pop()):
                if dependent not in seen:
                    seen.add(dependent)
                    stack.append(dependent)
        return sorted(seen)

    def _is_current(self, i: int, event: TaskStarted | TaskSucceeded | TaskFailed, allowed: frozenset) -> bool:
        if event.attempt == self._attempt[i] and self._state[i] in allowed:
            return True
        self._ignored(i, event)
        return False

    def _ignored(self, i: int, event: TaskStarted | TaskSucceeded | TaskFailed | RetryDue) -> None:
        state = self._state[i]
        self._stories.add(i, f"ignored {type(event).__name__}(attempt {{}})", state, state, event.at,
                          event.attempt, NUMBER)

    def _on_started(self, i: int, event: TaskStarted, actions: list[Action]) -> None:
        if self._is_current(i, event, _QUEUED):
            self._move(i, R, event.at, actions, "started")

    def _on_succeeded(self, i: int, event: TaskSucceeded, actions: list[Action]) -> None:
        if self._is_current(i, event, _ACTIVE):
            self._move(i, S, event.at, actions, "succeeded")

    def _on_failed(self, i: int, event: TaskFailed, actions: list[Action]) -> None:
        if not self._is_current(i, event, _ACTIVE):
            return
        self._error[i] = event.error
        if self._attempt[i] - self._base[i] <= self._specs[i].max_retries:
            self._move(i, W, event.at, actions, "failed", kind=event.kind)
        else:
            self._move(i, F, event.at, actions, "failed", kind=event.kind)

    def _on_retry_due(self, i: int, event: RetryDue, actions: list[Action]) -> None:
        if self._state[i] is W and event.attempt == self._attempt[i] + 1:
            self._move(i, Q, event.at, actions, "retry due")
        else:
            self._ignored(i, event)

    def _cancel(self, event: RunCancelled, actions: list[Action]) -> None:
        if self.cancelled_by is None and self._unfinished:
            self.cancelled_by = event.by
            self.cancelled_at = event.at
        for i, state in enumerate(self._state):
            if state not in TERMINAL_STATES:
                self._error[i] = f"cancelled by {event.by}"
                self._move(i, C, event.at, actions, "cancelled", kind=FailureKind.CANCELLED)

    # ------------------------------------------------------------- transitions
    def _move(
        self,
        i: int,
        finish: TaskState,
        at: float,
        actions: list[Action],
        cause: str,
        kind: Optional[FailureKind] = None,
        because_of: Optional[int] = None,
    ) -> None:
        """Move task ``i`` to ``finish`` through :data:`TRANSITIONS`. ``cause`` goes to its story,
        filled with the name of task ``because_of`` if given."""
        start = self._state[i]
        handler = TRANSITIONS.get((start, finish))
        if handler is None:
            raise InvalidTransition(self._names[i], start, finish, self._stories.of(i))
        self._state[i] = finish
        self._counts[start] -= 1
        self._counts[finish] += 1
        if finish in TERMINAL_STATES:
            self._unfinished -= 1
        elif start in TERMINAL_STATES:
            self._unfinished += 1
        if finish is S or finish is P:
            self._error.pop(i, None)
        if because_of is None:
            self._stories.add(i, cause, start, finish, at)
        else:
            self._stories.add(i, cause, start, finish, at, because_of, TASK)
        attempt = self._attempt[i] + (1 if finish is Q else 0)
        actions.append(Transition(self._names[i], start, finish, attempt, at, self._error.get(i), kind))
        handler(self, i, at, actions)

    def _queue(self, i: int, at: float, actions: list[Action]) -> None:
        self._attempt[i] += 1
        actions.append(Dispatch(self._names[i], self._attempt[i]))

    def _nothing(self, i: int, at: float, actions: list[Action]) -> None:
        pass

    def _succeed(self, i: int, at: float, actions: list[Action]) -> None:
        waiting, state = self._waiting_on, self._state
        for dependent in self._dependents_of(i):
            waiting[dependent] -= 1
            if waiting[dependent] == 0 and state[dependent] is P:
                self._move(dependent, Q, at, actions, "{} succeeded", because_of=i)

    def _schedule_retry(self, i: int, at: float, actions: list[Action]) -> None:
        attempt = self._attempt[i]
        delay = retry_delay(self._specs[i], attempt - self._base[i])
        actions.append(ScheduleRetry(self._names[i], attempt + 1, at + delay))

    def _reset(self, i: int, at: float, actions: list[Action]) -> None:
        """A rerun from a failure or a cancel: a fresh attempt budget from the attempts made so far."""
        self._base[i] = self._attempt[i]

    def _unsucceed(self, i: int, at: float, actions: list[Action]) -> None:
        """A rerun of a task that had succeeded: its dependents wait for it again."""
        self._reset(i, at, actions)
        for dependent in self._dependents_of(i):
            self._waiting_on[dependent] += 1

    def _fail_downstream(self, i: int, at: float, actions: list[Action]) -> None:
        """Fail every pending transitive dependent of task ``i``, naming ``i`` as the cause."""
        message = f"upstream task {self._names[i]!r} failed"
        stack = list(self._dependents_of(i))
        while stack:
            dependent = stack.pop()
            if self._state[dependent] is not P:
                continue
            self._error[dependent] = message
            self._state[dependent] = F
            self._counts[P] -= 1
            self._counts[F] += 1
            self._unfinished -= 1
            self._stories.add(dependent, "upstream task {!r} failed", P, F, at, i, TASK)
            actions.append(Transition(self._names[dependent], P, F, self._attempt[dependent], at, message,
                                      FailureKind.UPSTREAM))
            stack.extend(self._dependents_of(dependent))

    def _stop(self, i: int, at: float, actions: list[Action]) -> None:
        actions.append(StopTask(self._names[i], self._attempt[i]))

    def _check_finished(self, at: float, actions: list[Action]) -> None:
        if self._unfinished == 0 and not self._finish_reported:
            self._finish_reported = True
            actions.append(RunFinished(self.run_state, at))

    # ---------------------------------------------------------------- checking
    def validate_state(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one. For tests."""
        counts: Counter[TaskState] = Counter(self._state)
        assert +counts == +self._counts, f"counts {self._counts} != actual {counts}"
        unfinished = sum(1 for s in self._state if s not in TERMINAL_STATES)
        assert unfinished == self._unfinished, f"unfinished {self._unfinished} != actual {unfinished}"
        for i, spec in enumerate(self._specs):
            name, state = self._names[i], self._state[i]
            assert spec.name == name, f"task {i} is {spec.name!r} in the specs, {name!r} in the graph"
            not_done = sum(1 for d in spec.dependencies if self._state[self._index[d]] is not S)  # repeats too
            assert not_done == self._waiting_on[i], f"{name}: waiting_on {self._waiting_on[i]} != {not_done}"
            if state in (Q, R, W, S):
                assert not_done == 0, f"{name} is {state} before all its dependencies succeeded"
            this_go = self._attempt[i] - self._base[i]
            assert 0 <= this_go <= spec.max_retries + 1, f"{name}: {this_go} attempts since its latest rerun"
            if state is P:
                assert this_go == 0, f"{name} pending after an attempt since its latest rerun"


def _in_graph_order(specs: list[TaskSpec], graph: Graph) -> list[TaskSpec]:
    """``specs`` indexed by task number (they normally come in that order already)."""
    if len(specs) != len(graph):
        raise ValueError(f"{len(specs)} task specs for a graph of {len(graph)} tasks")
    if list(map(attrgetter("name"), specs)) == graph.names:
        return specs
    ordered: list[Any] = [None] * len(specs)
    for spec in specs:
        ordered[graph.index[spec.name]] = spec
    return ordered


_QUEUED = frozenset({Q})
_ACTIVE = frozenset({Q, R})

TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[[Scheduler, int, float, list], None]] = {
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
    (S, P): Scheduler._unsucceed,  # a rerun named the task, or a task upstream of it
    (F, P): Scheduler._reset,  # a rerun: failed, or failed upstream
    (C, P): Scheduler._reset,  # a rerun of a cancelled run
}
"""Every legal move of a task. ``pending -> failure`` (an upstream failed) is made only by
``_fail_downstream``, which walks the descendants itself instead of recursing. The only moves
out of a final state are back to ``pending``, made by :meth:`Scheduler.rerun`."""

_EVENT_HANDLERS = {
    TaskStarted: Scheduler._on_started,
    TaskSucceeded: Scheduler._on_succeeded,
    TaskFailed: Scheduler._on_failed,
    RetryDue: Scheduler._on_retry_due,
}
