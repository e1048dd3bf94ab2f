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

from orchestrator.actions import Action, Dispatch, RunFinished, ScheduleRetry, StopTask, Transition
from orchestrator.scheduler import Scheduler
from orchestrator.task import Task
from shared import codec
from shared.errors import SerializationError
from shared.events import Event, RetryDue, RunCancelled, TaskFailed, TaskStarted, TaskSucceeded
from shared.states import TERMINAL_STATES, FailureKind, RunState, TaskState

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

    def __bool__(self) -> bool:
        return bool(self.transitions or self.dispatches or self.stops or self.finished)


class Backend(Protocol):
    """Carries out steps and reports events. Local processes or Redis + RQ."""

    def carry_out(self, step: Step) -> None:
        """Start the dispatched attempts, stop the stopped ones, persist what the backend keeps."""

    def wait(self, timeout: float) -> Sequence[Event]:
        """Events that arrived, blocking up to ``timeout`` seconds for the first one."""

    def close(self) -> None:
        """Release every process and connection the backend holds."""


ProgressCallback = Callable[[Scheduler, Sequence[Transition]], None]


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
        self.interrupted = False

    def run(self) -> RunState:
        """Drive the run until every task is final. Ctrl-C cancels the run, then re-raises."""
        try:
            if not self.scheduler.started:
                self.apply(self.scheduler.start(self.clock()))
            while not self.scheduler.finished:
                self._step(self.backend.wait(self._wait_time()))
        except KeyboardInterrupt:
            self.interrupted = True
            self.cancel("Ctrl-C")
            raise
        return self.scheduler.run_state

    def cancel(self, by: str) -> None:
        """Cancel every unfinished task of the run and stop the attempts in flight."""
        self.apply(self.scheduler.handle(RunCancelled(self.clock(), by)))

    def arm_retry(self, task: str, attempt: int, at: float) -> None:
        """Report ``RetryDue(task, attempt)`` once the clock reaches ``at`` (also used on resume)."""
        heapq.heappush(self._timers, (at, task, attempt))

    def _wait_time(self) -> float:
        if not self._timers:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, self._timers[0][0] - self.clock()))

    def _step(self, events: Sequence[Event]) -> None:
        actions: list[Action] = []
        by_task: dict[str, Event] = {}
        for event in events:
            if isinstance(event, TaskSucceeded) and not self._decodes(event):
                event = TaskFailed(event.task, event.attempt, event.at,
                                   f"SerializationError: result of task {event.task!r} cannot be decoded",
                                   started_at=event.started_at)
            actions.extend(self.scheduler.handle(event))
            if not isinstance(event, RunCancelled):
                by_task[event.task] = event
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, task, attempt = heapq.heappop(self._timers)
            actions.extend(self.scheduler.handle(RetryDue(task, attempt, now)))
        self.apply(actions, by_task)

    def _decodes(self, event: TaskSucceeded) -> bool:
        try:
            codec.decode(event.result)
        except SerializationError:
            return False
        return True

    def apply(self, actions: Sequence[Action], events: Optional[Mapping[str, Event]] = None) -> None:
        """Carry out ``actions`` (from the scheduler) as one step; ``events`` caused them, by task."""
        events = events or {}
        step = Step()
        for action in actions:
            if isinstance(action, Transition):
                step.transitions.append(action)
                self._record(action, events.get(action.task), step)
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
        if step:
            step.counts = {state.value: n for state, n in self.scheduler.counts().items()}
            step.cancelled_by = self.scheduler.cancelled_by
            step.cancelled_at = self.scheduler.cancelled_at
            self.backend.carry_out(step)
            if self.on_progress and step.transitions:
                self.on_progress(self.scheduler, step.transitions)

    def _record(self, move: Transition, event: Optional[Event], step: Step) -> None:
        """Keep the user's Task object in line with the scheduler."""
        task = self.tasks[move.task]
        task.state = move.finish
        task.attempts = move.attempt
        if move.finish is not TaskState.RETRYING:
            task.retry_at = None
        if move.finish is TaskState.RUNNING:
            if isinstance(event, TaskStarted):
                task.worker = event.worker
            if task.started_at is None:
                task.started_at = move.at
        if move.finish is TaskState.SUCCESS:
            task.error = task.traceback = None
        if move.finish is TaskState.SUCCESS and isinstance(event, TaskSucceeded):
            task.result = codec.decode(event.result)
            step.results[move.task] = event.result
            if task.started_at is None:
                task.started_at = event.started_at or move.at
        if move.finish in (TaskState.FAILURE, TaskState.RETRYING, TaskState.CANCELLED):
            task.error = move.error
            if isinstance(event, TaskFailed) and move.kind is not FailureKind.UPSTREAM:
                task.traceback = event.traceback
                if event.traceback:
                    step.tracebacks[move.task] = event.traceback
                if task.started_at is None and event.started_at is not None:
                    task.started_at = event.started_at
        if move.finish in TERMINAL_STATES:
            task.finished_at = move.at
