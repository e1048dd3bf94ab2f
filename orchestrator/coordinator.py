"""The coordinator: drives the pure scheduler with a backend and a clock.

It is the imperative shell around :class:`~orchestrator.scheduler.Scheduler`:
it feeds the backend's events and its own retry timers in, and hands the
scheduler's actions to the backend as one :class:`Step` per batch of events,
so a backend that persists state can write each step in one round trip.
It also keeps the caller's :class:`~orchestrator.task.Task` objects current.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from orchestrator.actions import (Action, Dispatch, ExpandMap, MapChildren, RunFinished, RunRerun, ScheduleRetry,
                                  StopTask, Transition)
from orchestrator.mapping import children_arguments
from orchestrator.run_spec import children_payloads
from orchestrator.scheduler import Scheduler
from orchestrator.task import AttemptRecord, Task
from shared import codec
from shared.config import max_map_length, max_payload_bytes
from shared.errors import MapError, SerializationError, class_refs
from shared.events import Event, MapExpanded, RetryDue, RunCancelled, TaskFailed, TaskStarted, TaskSucceeded
from shared.states import ACTIVE_STATES, TERMINAL_STATES, FailureKind, RunState, TaskState

MAX_WAIT = 1.0
"""Longest single wait for events, so that timers and Ctrl-C are never starved."""


@dataclass
class Step:
    """Everything one batch of events changed, for the backend to carry out together."""

    transitions: list[Transition] = field(default_factory=list)
    results: dict[str, bytes] = field(default_factory=dict)
    dispatches: list[Dispatch] = field(default_factory=list)
    retries: list[ScheduleRetry] = field(default_factory=list)
    stops: list[StopTask] = field(default_factory=list)
    finished: Optional[RunFinished] = None
    tracebacks: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    cancelled_by: Optional[str] = None
    cancelled_at: Optional[float] = None
    children: list[tuple[str, int, list[Task], list[str]]] = field(default_factory=list)
    """Mapped tasks expanded in this step: ``(task, first child number, the children, their encoded
    arguments)``, to keep with the run before the children's dispatches."""
    rerun: Optional[RunRerun] = None
    """Set when the step starts a finished run again (the run is reopened before anything else)."""
    attempts: list[tuple[str, AttemptRecord]] = field(default_factory=list)
    """``(task, record)`` of the attempts that ended in this step (failed or cancelled), or that a rerun
    superseded (succeeded): the task's history, which a backend that persists keeps."""
    attempt_starts: dict[str, float] = field(default_factory=dict)
    """task -> when its attempt that ended in this step started, where known (what metrics time)."""

    def __bool__(self) -> bool:
        return bool(self.transitions or self.dispatches or self.stops or self.finished or self.rerun)

    def absorb(self, later: "Step") -> None:
        """Add ``later`` (the next step of the same run) to this one, so that one write carries both:
        its lists follow this step's, its entries replace this step's, its run-wide fields win."""
        for name in ("transitions", "dispatches", "retries", "stops", "children", "attempts"):
            getattr(self, name).extend(getattr(later, name))
        for name in ("results", "tracebacks", "attempt_starts"):
            getattr(self, name).update(getattr(later, name))
        self.counts = later.counts or self.counts
        self.finished = later.finished or self.finished
        self.rerun = later.rerun or self.rerun
        if later.cancelled_by:
            self.cancelled_by, self.cancelled_at = later.cancelled_by, later.cancelled_at


class Backend(Protocol):
    """Carries out steps and reports events. Local processes or Redis + RQ."""

    def carry_out(self, step: Step) -> None:
        """Start the dispatched attempts, stop the stopped ones, persist what the backend keeps."""

    def wait(self, timeout: float) -> Sequence[Event]:
        """Events that arrived, blocking up to ``timeout`` seconds for the first one."""

    def close(self) -> None:
        """Release every process and connection the backend holds."""


ProgressCallback = Callable[[Scheduler, Sequence[Transition]], None]


class RunInterrupted(KeyboardInterrupt):
    """An interrupt other than Ctrl-C (e.g. SIGTERM) that cancels the run; ``by`` is recorded."""

    def __init__(self, by: str) -> None:
        super().__init__(by)
        self.by = by


class Coordinator:
    """Runs one workflow run to its end with ``backend``.

    ``clock`` returns epoch seconds: retry times are absolute so that another
    coordinator reading the run state can honour them.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        on_progress: Optional[ProgressCallback] = None,
        scheduler: Optional[Scheduler] = None,
    ) -> None:
        self.tasks = tasks
        self.backend = backend
        self.clock = clock
        self.on_progress = on_progress
        self.scheduler = scheduler or Scheduler(tasks.values())
        self._timers: list[tuple[float, str, int]] = []
        self._values: dict[tuple[str, int], Any] = {}
        self._attempt_started: dict[str, float] = {}
        """task -> when its current attempt started (as far as this coordinator saw)."""
        self._own_events: list[Event] = []
        """Events this coordinator makes itself (a mapped task's expansion), handled in the next step."""
        self._expansions: dict[str, tuple[list[tuple[tuple, dict]], list[str]]] = {}
        """Mapped task -> its children's (args, kwargs) and encoded payloads, between ExpandMap and MapChildren."""
        self.interrupted = False

    def run(self) -> RunState:
        """Drive the run until every task is final. Ctrl-C cancels the run, then re-raises."""
        try:
            if not self.scheduler.started:
                self.apply(self.scheduler.start(self.clock()))
            while not self.scheduler.finished:
                self._step(self.backend.wait(self._wait_time()))
        except KeyboardInterrupt as exc:
            self.interrupted = True
            self.cancel(exc.by if isinstance(exc, RunInterrupted) else "Ctrl-C")
            raise
        return self.scheduler.run_state

    def cancel(self, by: str) -> None:
        """Cancel every unfinished task of the run and stop the attempts in flight."""
        self.apply(self.scheduler.handle(RunCancelled(self.clock(), by)))

    def arm_retry(self, task: str, attempt: int, at: float) -> None:
        """Report ``RetryDue(task, attempt)`` once the clock reaches ``at`` (also used on resume)."""
        heapq.heappush(self._timers, (at, task, attempt))

    def _wait_time(self) -> float:
        if self._own_events:
            return 0.0
        if not self._timers:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, self._timers[0][0] - self.clock()))

    def _step(self, events: Sequence[Event]) -> None:
        actions: list[Action] = []
        causes: list[Optional[Event]] = []
        if self._own_events:
            events, self._own_events = [*self._own_events, *events], []
        for event in events:
            event = self._decoded(event)
            produced = self.scheduler.handle(event)
            actions.extend(produced)
            causes.extend([event] * len(produced))
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, task, attempt = heapq.heappop(self._timers)
            actions.extend(self.scheduler.handle(RetryDue(task, attempt, now)))
        self.apply(actions, causes + [None] * (len(actions) - len(causes)))

    def _decoded(self, event: Event) -> Event:
        """A success whose result does not decode is a failed attempt (the bytes were damaged)."""
        if not isinstance(event, TaskSucceeded):
            return event
        try:
            self._values[(event.task, event.attempt)] = codec.decode(event.result)
        except SerializationError as exc:
            return TaskFailed(event.task, event.attempt, event.at, f"SerializationError: result of task "
                              f"{event.task!r} cannot be decoded: {exc}", started_at=event.started_at)
        return event

    def apply(self, actions: Sequence[Action], causes: Optional[Sequence[Optional[Event]]] = None) -> None:
        """Carry out ``actions`` (from the scheduler) as one step; ``causes[i]`` is the event behind ``actions[i]``."""
        causes = causes or [None] * len(actions)
        step = Step()
        for action, cause in zip(actions, causes):
            if isinstance(action, Transition):
                step.transitions.append(action)
                self._record(action, cause, step)
            elif isinstance(action, Dispatch):
                step.dispatches.append(action)
            elif isinstance(action, ScheduleRetry):
                step.retries.append(action)
                self.tasks[action.task].retry_at = action.at
                self.arm_retry(action.task, action.attempt, action.at)
            elif isinstance(action, StopTask):
                step.stops.append(action)
            elif isinstance(action, RunFinished):
                step.finished = action
            elif isinstance(action, RunRerun):
                step.rerun = action
            elif isinstance(action, ExpandMap):
                self._own_events.append(self._expand(action))
            elif isinstance(action, MapChildren):
                step.children.append((action.task, action.first, *self._make_children(action)))
        if step:
            step.counts = {state.value: n for state, n in self.scheduler.counts().items()}
            step.cancelled_by = self.scheduler.cancelled_by
            step.cancelled_at = self.scheduler.cancelled_at
            self.backend.carry_out(step)
            if self.on_progress and step.transitions:
                self.on_progress(self.scheduler, step.transitions)

    def _expand(self, action: ExpandMap) -> Event:
        """Work out a mapped task's children from its upstreams' results (:mod:`orchestrator.mapping`)."""
        task, now = self.tasks[action.task], self.clock()
        results = {name: self.tasks[name].result for name in task.map_over}
        try:
            arguments = children_arguments(task.name, task.args, task.call_kwargs, results, max_map_length())
            payloads = children_payloads(task.name, arguments, max_payload_bytes())
        except (MapError, SerializationError) as exc:
            return TaskFailed(task.name, action.attempt, now, f"MapError: {exc}", types=class_refs(MapError))
        self._expansions[task.name] = (arguments, payloads)
        return MapExpanded(task.name, action.attempt, now, len(arguments))

    def _make_children(self, action: MapChildren) -> tuple[list[Task], list[str]]:
        """The Task objects of a mapped task's children, added to the run's tasks, and their payloads."""
        parent = self.tasks[action.task]
        arguments, payloads = self._expansions.pop(action.task)
        children = [parent.child(name, args, kwargs) for name, (args, kwargs) in zip(action.children, arguments)]
        for child in children:
            self.tasks[child.name] = child  # type: ignore[index]  # the run's own dict of tasks
        return children, payloads

    def _record(self, move: Transition, event: Optional[Event], step: Step) -> None:
        """Keep the user's Task object in line with the scheduler."""
        task = self.tasks[move.task]
        if move.finish is TaskState.PENDING:  # a rerun: the last attempt becomes history
            if move.start is TaskState.SUCCESS and move.attempt > task.attempt_base:
                first_of_its_go = move.attempt == task.attempt_base + 1  # else its own start is not kept
                self._keep_attempt(task, AttemptRecord(move.attempt, TaskState.SUCCESS.value, None, task.worker,
                                                       task.started_at if first_of_its_go else None,
                                                       task.finished_at), step)
            task.rerun(move.attempt)
            return
        if move.start in ACTIVE_STATES and move.finish not in ACTIVE_STATES:
            self._note_start(task, event, step)
        if move.start in ACTIVE_STATES and move.finish is TaskState.SUCCESS:
            self._attempt_started.pop(task.name, None)
        elif move.start in ACTIVE_STATES and move.finish is not TaskState.RUNNING:
            self._attempt_ended(task, move, event, step)
        task.state = move.finish
        task.attempts = move.attempt
        if move.finish is not TaskState.RETRYING:
            task.retry_at = None
        if move.finish is TaskState.RUNNING:
            self._attempt_started[task.name] = move.at
            if isinstance(event, TaskStarted):
                task.worker = event.worker
            if task.started_at is None:
                task.started_at = move.at
        if move.finish is TaskState.SUCCESS:
            task.error = task.traceback = None
        if move.finish is TaskState.SUCCESS and task.map_over:
            task.result = [t.result for t in self.tasks.values() if t.map_parent == task.name]
            step.results[move.task] = codec.encode(task.result, f"result of mapped task {task.name!r}")
        elif move.finish is TaskState.SUCCESS and isinstance(event, TaskSucceeded) and event.task == move.task:
            task.result = self._values.pop((event.task, event.attempt), None)
            step.results[move.task] = event.result
            if task.started_at is None:
                task.started_at = event.started_at or move.at
        if move.finish in (TaskState.FAILURE, TaskState.RETRYING, TaskState.CANCELLED, TaskState.SKIPPED):
            task.error = move.error
            if isinstance(event, TaskFailed) and move.kind is not FailureKind.UPSTREAM:
                task.traceback = event.traceback
                if event.traceback:
                    step.tracebacks[move.task] = event.traceback
                if task.started_at is None and event.started_at is not None:
                    task.started_at = event.started_at
        if move.finish in TERMINAL_STATES:
            task.finished_at = move.at

    def _note_start(self, task: Task, event: Optional[Event], step: Step) -> None:
        """Keep when the attempt ending now started (the worker's report, else when it was seen running)."""
        reported = getattr(event, "started_at", None) if getattr(event, "task", None) == task.name else None
        started = reported or self._attempt_started.get(task.name)
        if started is not None:
            step.attempt_starts[task.name] = started

    def _attempt_ended(self, task: Task, move: Transition, event: Optional[Event], step: Step) -> None:
        """Keep the record of an attempt that failed (or was cancelled) in the task's history."""
        started = getattr(event, "started_at", None) or self._attempt_started.get(task.name)
        worker = task.worker if move.start is TaskState.RUNNING else None  # else not known, or a former one
        state = move.finish if move.finish in (TaskState.CANCELLED, TaskState.SKIPPED) else TaskState.FAILURE
        self._keep_attempt(task, AttemptRecord(move.attempt, state.value, move.error, worker, started, move.at), step)

    def _keep_attempt(self, task: Task, record: AttemptRecord, step: Step) -> None:
        task.history += (record,)
        step.attempts.append((task.name, record))
        self._attempt_started.pop(task.name, None)
