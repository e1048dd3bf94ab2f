"""The embedded backend: each attempt in a forked child process on this machine.

Forking (not spawning) is what lets lambdas and closures run, and lets a task
read its upstream results from the parent's ``Workflow`` as it was at fork
time. A child process per attempt is what lets a timeout kill the attempt and
everything it started (the child leads its own process group), and keeps a
segfault or ``os._exit`` in a task from taking the run down.

The child captures the attempt's log (:mod:`worker.task_log`, its output also
going to this terminal as before) and sends it to this process in batches on
the pipe that carries its outcome; the logs stay here, in :attr:`LocalBackend.logs`.
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping, Optional, Sequence

from orchestrator.actions import Dispatch
from orchestrator.coordinator import Step
from orchestrator.logs import MemoryLogs
from orchestrator.task import Task
from shared.context import TaskContext, running
from shared.events import Event, TaskFailed, TaskStarted
from shared.messages import FAILED, Outcome, finished_event
from shared.states import FailureKind
from shared.log_records import LogBatch
from worker.execute import death_error, describe_exception, exception_types, kill_group, run_attempt, timeout_error
from worker.task_log import capturing, note

DEFAULT_MAX_WORKERS = 4
_LOG, _OUTCOME = "log", "outcome"
"""The two kinds of message a child sends its parent: a batch of its log, then its outcome."""


@dataclass
class _Attempt:
    task: str
    attempt: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    deadline: Optional[float]


def _child(tasks: Mapping[str, Task], name: str, attempt: int, run_id: str, deadline: Optional[float],
           conn: Connection, params: Mapping[str, Any]) -> None:
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the CLI's "cancel the run" handlers
        signal.signal(sig, signal.SIG_DFL)

    def send(batch: LogBatch) -> None:
        conn.send_bytes(pickle.dumps((_LOG, batch)))

    kill_at = None if deadline is None else time.monotonic() + (deadline - time.time())
    with capturing(send, echo=True, flush_before=kill_at):
        outcome = _attempt(tasks, name, attempt, run_id, params)
    conn.send_bytes(pickle.dumps((_OUTCOME, outcome)))
    conn.close()


def _attempt(tasks: Mapping[str, Task], name: str, attempt: int, run_id: str, params: Mapping[str, Any]) -> Outcome:
    task = tasks[name]
    try:
        func = task.resolve()
    except Exception as exc:
        note(traceback.format_exc())
        return Outcome(run_id=run_id, task=task.name, attempt=attempt, status=FAILED, at=time.time(),
                       error=describe_exception(exc), started_at=time.time(), types=exception_types(exc))

    def upstream_result(other: str) -> Any:
        return tasks[other].result if other in tasks else None

    def fetch_params() -> dict[str, Any]:
        return copy.deepcopy(dict(params))

    with running(TaskContext(run_id, name, attempt, upstream_result, fetch_params)):
        return run_attempt(func, task.args, task.call_kwargs, run_id=run_id, task=name, attempt=attempt,
                           upstream_result=upstream_result)


class LocalBackend:
    """Runs at most ``max_workers`` attempts at once; the rest wait in a FIFO queue."""

    def __init__(self, tasks: Mapping[str, Task], max_workers: int = DEFAULT_MAX_WORKERS, run_id: str = "local",
                 params: Optional[Mapping[str, Any]] = None, logs: Optional[MemoryLogs] = None) -> None:
        """``params``: the run's parameters, as tasks read them (``current_task().params``); ``logs``:
        where to keep the attempts' logs (a rerun passes its first go's, so earlier attempts stay readable)."""
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, not {max_workers}")
        self.tasks = tasks
        self.params = dict(params or {})
        self.max_workers = max_workers
        self.run_id = run_id
        self._context = multiprocessing.get_context("fork")
        self._queue: deque[Dispatch] = deque()
        self._running: dict[str, _Attempt] = {}
        self._events: list[Event] = []
        self.logs = logs if logs is not None else MemoryLogs()
        """The attempts' logs, as their children sent them (read with :mod:`orchestrator.logs`)."""

    def carry_out(self, step: Step) -> None:
        for stop in step.stops:
            self._queue = deque(d for d in self._queue if d.task != stop.task)
            running = self._running.get(stop.task)
            if running is not None and running.attempt == stop.attempt:
                self._kill(running)
                del self._running[stop.task]
        self._queue.extend(step.dispatches)
        self._start_queued()

    def _start_queued(self) -> None:
        while self._queue and len(self._running) < self.max_workers:
            dispatch = self._queue.popleft()
            task = self.tasks[dispatch.task]
            receiver, sender = self._context.Pipe(duplex=False)
            now = time.time()
            deadline = None if task.timeout is None else now + task.timeout
            process = self._context.Process(
                target=_child, args=(self.tasks, task.name, dispatch.attempt, self.run_id, deadline, sender,
                                     self.params),
                name=f"orch-task-{task.name}", daemon=False,
            )
            process.start()
            sender.close()
            self._running[task.name] = _Attempt(task.name, dispatch.attempt, process, receiver, now, deadline)
            self._events.append(TaskStarted(task.name, dispatch.attempt, now, worker=f"pid {process.pid}"))

    def wait(self, timeout: float) -> Sequence[Event]:
        if not self._events and self._running:
            deadlines = [a.deadline for a in self._running.values() if a.deadline is not None]
            if deadlines:
                timeout = min(timeout, max(0.0, min(deadlines) - time.time()))
            waitables: list[Any] = []
            for a in self._running.values():
                waitables += [a.conn, a.process.sentinel]
            wait(waitables, timeout)
        elif not self._events:
            time.sleep(timeout)
        self._collect()
        self._start_queued()
        events, self._events = self._events, []
        return events

    def _collect(self) -> None:
        now = time.time()
        for name, a in list(self._running.items()):
            outcome = self._read(a)
            if outcome is not None:
                self._finish(a)
                self._events.append(self._event_of(outcome))
                continue
            if not a.process.is_alive():
                a.process.join()
                outcome = self._read(a)  # it may have reported just before it exited
                self._finish(a)
                self._events.append(self._event_of(outcome) if outcome is not None else
                                    TaskFailed(name, a.attempt, now, death_error(a.process.exitcode),
                                               FailureKind.CRASHED, started_at=a.started_at))
            elif a.deadline is not None and now >= a.deadline:
                self._kill(a)
                del self._running[name]
                limit = self.tasks[name].timeout
                assert limit is not None  # an attempt has a deadline only when its task has a timeout
                self._events.append(TaskFailed(name, a.attempt, now,
                                               timeout_error(limit), FailureKind.TIMEOUT, started_at=a.started_at))

    def _read(self, a: _Attempt) -> Optional[Outcome]:
        """Take in what the attempt's child has sent: its log batches are stored; returns its outcome
        once it came. A child killed midway leaves a truncated message, which ends the reading."""
        try:
            while a.conn.poll():
                kind, body = pickle.loads(a.conn.recv_bytes())
                if kind == _OUTCOME:
                    return body
                self.logs.apply(a.task, a.attempt, body)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError):
            pass
        return None

    def _finish(self, a: _Attempt) -> None:
        a.process.join()
        self._read(a)
        a.conn.close()
        del self._running[a.task]

    @staticmethod
    def _event_of(outcome: Outcome) -> Event:
        return finished_event(outcome, outcome.at)

    def _kill(self, a: _Attempt) -> None:
        """Kill the attempt's whole process group, so nothing it started keeps running."""
        kill_group(a.process.pid)
        a.process.kill()  # the child may not have made its group yet
        a.process.join()
        self._read(a)  # its log up to its last flush
        a.conn.close()

    def close(self) -> None:
        for a in list(self._running.values()):
            self._kill(a)
        self._running.clear()
        self._queue.clear()
