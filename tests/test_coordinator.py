"""The coordinator with a scripted in-memory backend: timers, steps, Ctrl-C, result commits."""
from __future__ import annotations

from typing import Sequence

import pytest

from orchestrator.coordinator import Coordinator, Step
from orchestrator.task import Task
from shared import codec
from shared.events import Event, TaskFailed, TaskStarted, TaskSucceeded
from shared.states import FailureKind, RunState, TaskState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedBackend:
    """Answers each dispatch with the outcome ``behaviour(task, attempt)`` gives; records every step."""

    def __init__(self, clock: FakeClock, behaviour, interrupt_after: int | None = None) -> None:
        self.clock = clock
        self.behaviour = behaviour
        self.steps: list[Step] = []
        self.pending: list[Event] = []
        self.waits: list[float] = []
        self.interrupt_after = interrupt_after

    def carry_out(self, step: Step) -> None:
        self.steps.append(step)
        for d in step.dispatches:
            self.pending.append(TaskStarted(d.task, d.attempt, self.clock.now, worker="w1"))
            self.pending.append(self.behaviour(d.task, d.attempt, self.clock.now))

    def wait(self, timeout: float) -> Sequence[Event]:
        self.waits.append(timeout)
        if self.interrupt_after is not None and len(self.waits) > self.interrupt_after:
            raise KeyboardInterrupt
        if not self.pending:
            self.clock.now += timeout  # nothing to report: time passes
            return []
        events, self.pending = self.pending, []
        return events

    def close(self) -> None:
        pass


def ok(value):
    return lambda task, attempt, at: TaskSucceeded(task, attempt, at, codec.encode(value))


def tasks(*specs: Task) -> dict[str, Task]:
    return {t.name: t for t in specs}


def test_results_and_states_reach_the_task_objects() -> None:
    clock = FakeClock()
    ts = tasks(Task("a", "m:f"), Task("b", "m:f", ["a"]))
    backend = ScriptedBackend(clock, lambda t, n, at: TaskSucceeded(t, n, at, codec.encode({"t": t, "n": n})))
    assert Coordinator(ts, backend, clock=clock).run() is RunState.SUCCESS
    assert ts["a"].result == {"t": "a", "n": 1} and ts["b"].result == {"t": "b", "n": 1}
    assert all(t.state is TaskState.SUCCESS and t.attempts == 1 and t.worker == "w1" for t in ts.values())
    assert backend.steps[-1].finished is not None
    assert backend.steps[-1].finished.state is RunState.SUCCESS
    committed = {name: blob for step in backend.steps for name, blob in step.results.items()}
    assert set(committed) == {"a", "b"}


def test_retry_waits_for_its_delay_on_the_coordinator_clock() -> None:
    clock = FakeClock()

    def flaky(task, attempt, at):
        if attempt == 1:
            return TaskFailed(task, attempt, at, "ValueError: first", FailureKind.ERROR)
        return TaskSucceeded(task, attempt, at, codec.encode("ok"))

    ts = tasks(Task("a", "m:f", max_retries=2, retry_delay=3.0))
    backend = ScriptedBackend(clock, flaky)
    start = clock.now
    assert Coordinator(ts, backend, clock=clock).run() is RunState.SUCCESS
    dispatch_times = [step for step in backend.steps if step.dispatches]
    assert len(dispatch_times) == 2
    retry = [r for step in backend.steps for r in step.retries]
    assert len(retry) == 1 and retry[0].at == pytest.approx(start + 3.0)
    assert clock.now >= start + 3.0
    assert ts["a"].attempts == 2 and ts["a"].error is None


def test_an_undecodable_result_fails_the_attempt() -> None:
    clock = FakeClock()
    ts = tasks(Task("a", "m:f"))
    backend = ScriptedBackend(clock, lambda t, n, at: TaskSucceeded(t, n, at, b"\xff not json"))
    assert Coordinator(ts, backend, clock=clock).run() is RunState.FAILURE
    assert ts["a"].state is TaskState.FAILURE
    assert "cannot be decoded" in ts["a"].error


def test_ctrl_c_cancels_the_run_and_stops_attempts_in_flight() -> None:
    clock = FakeClock()
    ts = tasks(Task("a", "m:f"), Task("b", "m:f", ["a"]))
    # "a" is dispatched but never reports; the second wait is interrupted.
    backend = ScriptedBackend(clock, lambda t, n, at: TaskStarted(t, n, at), interrupt_after=1)
    coordinator = Coordinator(ts, backend, clock=clock)
    with pytest.raises(KeyboardInterrupt):
        coordinator.run()
    assert coordinator.interrupted
    last = backend.steps[-1]
    assert [(s.task, s.attempt) for s in last.stops] == [("a", 1)]
    assert last.finished is not None and last.finished.state is RunState.CANCELLED
    assert last.cancelled_by == "Ctrl-C"
    assert ts["a"].state is TaskState.CANCELLED and ts["b"].state is TaskState.CANCELLED


def test_progress_callback_sees_every_transition() -> None:
    clock = FakeClock()
    ts = tasks(Task("a", "m:f"), Task("b", "m:f", ["a"]))
    seen = []
    backend = ScriptedBackend(clock, ok(1))
    Coordinator(ts, backend, clock=clock, on_progress=lambda s, moves: seen.extend(
        (m.task, m.finish.value) for m in moves)).run()
    assert seen == [("a", "queued"), ("a", "running"), ("a", "success"), ("b", "queued"),
                    ("b", "running"), ("b", "success")]
