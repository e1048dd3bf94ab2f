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
finished and propagated through once per attempt, and readiness is counters of
ended upstreams per task (as :class:`graphlib.TopologicalSorter` counts them), which
its trigger rule (:mod:`orchestrator.trigger_rules`) reads.
Memory: a few flat lists indexed by task number and the graph's arrays, shared
with the run's spec; stories are kept compactly (:mod:`orchestrator.story`).
"""
from __future__ import annotations

import random as _random
from array import array
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

from orchestrator.actions import Action, Dispatch, ExpandMap, RunFinished, ScheduleRetry, StopTask, Transition
from orchestrator import rerun as rerun_moves
from orchestrator.children import Children, add_children, child_ended, on_expanded
from orchestrator.dag import Graph, analyse, in_graph_order
from orchestrator.retry_policy import RetrySpec, failure_types, is_skip, not_retried, retry_delay
from orchestrator.invariants import check
from orchestrator.story import NUMBER, TASK, Stories
from orchestrator.trigger_rules import TriggerRule, Verdict, verdict
from shared.errors import InvalidTransition, UnknownTaskError
from shared.events import Event, MapExpanded, RetryDue, RunCancelled, TaskFailed, TaskStarted, TaskSucceeded
from shared.states import TERMINAL_STATES, FailureKind, RunState, TaskState

P, Q, R, W, S, F, C, K = (TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING,
                          TaskState.SUCCESS, TaskState.FAILURE, TaskState.CANCELLED, TaskState.SKIPPED)


class TaskSpec(RetrySpec, Protocol):
    """What the scheduler needs to know of a task (a :class:`~orchestrator.task.Task` fits)."""

    # Read-only members (properties): a Task's list[str] then fits Sequence[str].
    @property
    def name(self) -> str: ...

    @property
    def dependencies(self) -> Sequence[str]: ...

    @property
    def trigger_rule(self) -> TriggerRule: ...

    @property
    def map_over(self) -> Sequence[str]: ...


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

    Readiness: per task, how many of its upstream edges ended ``success``,
    ``failure`` and ``skipped``; each time an upstream of a pending task ends, its
    trigger rule (:mod:`orchestrator.trigger_rules`) decides whether it runs, waits,
    is skipped or fails. Ends propagate through a worklist, not recursion, so a
    failure at the head of a 100,000-task chain settles it in one loop.
    """

    def __init__(self, specs: Iterable[TaskSpec], graph: Optional[Graph] = None,
                 random: Optional[Callable[[], float]] = None) -> None:
        """``graph``, if given, must be :func:`orchestrator.dag.analyse` of the same specs. ``random``
        draws the ``retry_jitter`` of retry delays (in ``[0, 1)``; :func:`random.random` if not given)."""
        specs = list(specs)
        if graph is None:
            graph = analyse({s.name: s for s in specs})
        n = len(graph)
        self._names = graph.names
        self._index = graph.index
        self._specs: list[TaskSpec] = in_graph_order(specs, graph)
        self._state: list[TaskState] = [P] * n
        self._attempt: list[int] = [0] * n
        self._base: list[int] = [0] * n
        """Attempts made before the task's latest rerun: numbers keep growing for the whole run,
        each rerun gives a fresh budget of ``max_retries + 1`` attempts above this."""
        self._error: dict[int, str] = {}
        self._dependents, self._dependents_start = graph.dependents, graph.dependents_start  # read, never changed
        self._total = graph.indegree  # read, never changed
        self._ok, self._bad, self._skip = (array("i", bytes(4 * n)) for _ in range(3))
        """Per task, its upstream edges that ended success / failure / skipped."""
        self._rules = {i: spec.trigger_rule for i, spec in enumerate(self._specs)
                       if spec.trigger_rule is not TriggerRule.ALL_SUCCESS}
        self._settled: list[int] = []
        self._culprit: dict[int, int] = {}
        """For a task that failed upstream: the task whose own failure it goes back to."""
        """Tasks that just ended success, failure or skipped, whose dependents are still to be told."""
        self._random = random or _random.random
        self._graph_size = n
        self._mapped = {i for i, spec in enumerate(self._specs) if spec.map_over}
        self._children = Children()
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
        maps: Sequence[tuple[str, int, int]] = (),
    ) -> tuple["Scheduler", list[Action]]:
        """A started scheduler in the state a persisted run left (``name -> (state, attempt, error[, base])``,
        see :class:`Restored`).

        Used to resume a run whose coordinator died. Tasks missing from
        ``records`` are pending. Returns the actions that bring a state which a
        crash could leave inconsistent back in line: a pending task whose trigger
        rule is met is queued, one whose rule can no longer be met is skipped or
        fails. Queued, running and retrying tasks stay as they are: their outcomes
        (or retry timers, which the caller re-arms) are still to come. ``maps``: the
        expansions of mapped tasks the run recorded, ``(task, first child number, count)``
        in the order they happened; their children's records are in ``records`` by name.
        A mapped task that was queued and not expanded yet is asked to expand again.
        """
        scheduler = cls(specs, graph)
        scheduler._started = True
        for name, first, count in maps:
            add_children(scheduler, scheduler._number(name), first, count)
        for name, record in records.items():
            i = scheduler._index.get(name)
            if i is not None:
                scheduler._restore_task(i, Restored(*record), at)
        states = scheduler._state
        for i, state in enumerate(states[:scheduler._graph_size]):
            counter = scheduler._counter_of(state)
            if counter is not None:
                for dependent in scheduler._dependents_of(i):
                    counter[dependent] += 1
        actions: list[Action] = []
        for child, task in scheduler._children.parent.items():
            if states[child] in TERMINAL_STATES and states[child] is not C:
                scheduler._settled.append(child)  # counted by _drain; ends its mapped task if it was the last
        for i in range(len(states)):
            if states[i] is P:
                scheduler._decide(i, at, actions, None)
            elif states[i] is Q and i in scheduler._mapped and not scheduler._children.expanded(i):
                actions.append(ExpandMap(scheduler._names[i], scheduler._attempt[i]))
        scheduler._drain(at, actions)
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
        rules = self._rules
        for i, upstreams in enumerate(self._total):
            if upstreams == 0 or i in rules:
                self._decide(i, at, actions, None)
        self._drain(at, actions)
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
            self._drain(event.at, actions)
        self._check_finished(event.at, actions)
        return actions

    def handle_all(self, events: Iterable[Event]) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            actions.extend(self.handle(event))
        return actions

    def rerun(self, tasks: Iterable[str] = (), at: float = 0.0) -> list[Action]:
        """Start a finished run again from where it failed: :func:`orchestrator.rerun.rerun`."""
        return rerun_moves.rerun(self, tasks, at)

    def _is_current(self, i: int, event: TaskStarted | TaskSucceeded | TaskFailed, allowed: frozenset) -> bool:
        if event.attempt == self._attempt[i] and self._state[i] in allowed:
            return True
        self._ignored(i, event)
        return False

    def _ignored(self, i: int, event: TaskStarted | TaskSucceeded | TaskFailed | RetryDue | MapExpanded) -> None:
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
        """Retry, fail for good, or skip (the task raised ``Skip``): :mod:`orchestrator.retry_policy`."""
        if not self._is_current(i, event, _ACTIVE):
            return
        types = failure_types(event.kind, event.types)
        if is_skip(types):
            self._error[i] = "skipped: " + event.error.partition(": ")[2] if ": " in event.error else "skipped"
            self._move(i, K, event.at, actions, "raised Skip")
            return
        self._error[i] = event.error
        spec = self._specs[i]
        if self._attempt[i] - self._base[i] <= spec.max_retries:
            why = not_retried(spec, types)
            if why is None:
                self._move(i, W, event.at, actions, "failed", kind=event.kind)
                return
            self._error[i] = f"{event.error} (not retried: {why})"
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
        if i in self._mapped and self._children.expanded(i):  # a rerun: its children run again, not a new map
            self._move(i, R, at, actions, "its children run again")
        elif i in self._mapped:
            actions.append(ExpandMap(self._names[i], self._attempt[i]))
        else:
            actions.append(Dispatch(self._names[i], self._attempt[i]))

    def _nothing(self, i: int, at: float, actions: list[Action]) -> None:
        pass

    def _schedule_retry(self, i: int, at: float, actions: list[Action]) -> None:
        attempt = self._attempt[i]
        delay = retry_delay(self._specs[i], attempt - self._base[i], self._random)
        actions.append(ScheduleRetry(self._names[i], attempt + 1, at + delay))

    def _settle(self, i: int, at: float, actions: list[Action]) -> None:
        """Task ``i`` ended success, failure or skipped: its dependents are told by :meth:`_drain`."""
        self._settled.append(i)

    def _counter_of(self, state: TaskState) -> Optional[array]:
        """The per-task count that an upstream in ``state`` adds to, if it ended so."""
        return self._ok if state is S else self._bad if state is F else self._skip if state is K else None

    def _drain(self, at: float, actions: list[Action]) -> None:
        """Tell the dependents of every task that ended since the last call, deciding each pending one
        by its trigger rule; the tasks that end by that are told on in the same loop."""
        settled, state = self._settled, self._state
        while settled:
            i = settled.pop()
            if i in self._children.parent:
                child_ended(self, i, at, actions)
                continue
            counter = self._counter_of(state[i])
            if counter is None:
                continue
            for dependent in self._dependents_of(i):
                counter[dependent] += 1
                if state[dependent] is P:
                    self._decide(dependent, at, actions, i)

    def _decide(self, i: int, at: float, actions: list[Action], because_of: Optional[int]) -> None:
        """Queue, skip or fail pending task ``i`` if its trigger rule says so now (else it waits)."""
        rule = self._rules.get(i)
        if rule is None:  # all_success, nearly every task: the verdict without a call
            bad, skip = self._bad[i], self._skip[i]
            decided = (Verdict.FAIL if bad else Verdict.SKIP if skip else
                       Verdict.RUN if self._ok[i] == self._total[i] else Verdict.WAIT)
        else:
            decided = verdict(rule, self._total[i], self._ok[i], self._bad[i], self._skip[i])
        if decided is Verdict.RUN:
            if because_of is None:
                self._move(i, Q, at, actions, "start" if self._started else "ready")
            else:
                self._move(i, Q, at, actions, "{} ended", because_of=because_of)
        elif decided is Verdict.FAIL:
            culprit = self._culprit[i] = self._failed_upstream(i)
            self._error[i] = f"upstream task {self._names[culprit]!r} failed"
            self._move(i, F, at, actions, "upstream task {!r} failed", FailureKind.UPSTREAM, culprit)
        elif decided is Verdict.SKIP:
            why = "an upstream task was skipped" if rule is None else f"trigger rule {rule.value} cannot be met"
            self._error[i] = f"skipped: {why}"
            self._move(i, K, at, actions, f"skipped: {why} ({{}} ended)" if because_of is not None
                       else f"skipped: {why}", because_of=because_of)

    def _failed_upstream(self, i: int) -> int:
        """The task whose failure an upstream failure of ``i`` goes back to: the first failed upstream's
        own culprit, or that upstream itself (messages name the task that really failed, as before)."""
        for name in self._specs[i].dependencies:
            j = self._index[name]
            if self._state[j] is F:
                return self._culprit.get(j, j)
        raise AssertionError(f"{self._names[i]} failed upstream without a failed upstream")

    def _stop(self, i: int, at: float, actions: list[Action]) -> None:
        actions.append(StopTask(self._names[i], self._attempt[i]))

    def _check_finished(self, at: float, actions: list[Action]) -> None:
        if self._unfinished == 0 and not self._finish_reported:
            self._finish_reported = True
            actions.append(RunFinished(self.run_state, at))

    # ---------------------------------------------------------------- checking
    def validate_state(self) -> None:
        """Check every invariant; raise AssertionError naming the first broken one. For tests
        (:func:`orchestrator.invariants.check`)."""
        check(self)


_QUEUED = frozenset({Q})
_ACTIVE = frozenset({Q, R})

TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[[Scheduler, int, float, list], None]] = {
    (P, Q): Scheduler._queue,  # its trigger rule is met
    (P, F): Scheduler._settle,  # an upstream failed and its rule needed it not to
    (P, K): Scheduler._settle,  # its rule can no longer be met, no failure to blame
    (P, C): Scheduler._nothing,
    (Q, R): Scheduler._nothing,
    (Q, S): Scheduler._settle,  # a report of success may come without a separate start report
    (Q, W): Scheduler._schedule_retry,  # e.g. the worker could not import the task
    (Q, F): Scheduler._settle,
    (Q, K): Scheduler._settle,  # it raised Skip
    (Q, C): Scheduler._stop,
    (R, S): Scheduler._settle,
    (R, W): Scheduler._schedule_retry,
    (R, F): Scheduler._settle,
    (R, K): Scheduler._settle,
    (R, C): Scheduler._stop,
    (W, Q): Scheduler._queue,
    (W, C): Scheduler._nothing,
    (S, P): rerun_moves.unsucceed,  # a rerun named the task, or a task upstream of it
    (F, P): rerun_moves.unfail,  # a rerun: failed, or failed upstream
    (K, P): rerun_moves.unskip,  # a rerun of a task downstream of a rerun one
    (C, P): rerun_moves.reset,  # a rerun of a cancelled run
}
"""Every legal move of a task. A move into success, failure or skipped only records the task as
ended; :meth:`Scheduler._drain` then decides its dependents by their trigger rules, in a loop (no
recursion down a long chain). The only moves out of a final state are back to ``pending``, made
by :meth:`Scheduler.rerun`."""

_EVENT_HANDLERS: dict[type, Callable[[Scheduler, int, Any, list[Action]], None]] = {
    MapExpanded: on_expanded,
    TaskStarted: Scheduler._on_started,
    TaskSucceeded: Scheduler._on_succeeded,
    TaskFailed: Scheduler._on_failed,
    RetryDue: Scheduler._on_retry_due,
}
