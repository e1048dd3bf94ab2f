"""Reading the logs of a run's attempts: the one way the CLI, the Python API (and the dashboard) do it.

A log's source is :class:`RedisLogs` (a run in Redis) or :class:`MemoryLogs`
(an embedded run, kept by its backend); both give an attempt's records (see
:mod:`shared.log_records`) after a line number. :func:`attempt_log` turns them
into :class:`LogLine` objects and says where lines were dropped (the cap);
:func:`run_log` and :func:`follow_run_log` read a stored run by task and
attempt, for ``orch logs``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import redis

from orchestrator import dag
from orchestrator.run_store import load_tasks
from orchestrator.task import Task
from shared import keys
from shared.errors import NoSuchAttemptError, UnknownTaskError
from shared.log_records import LogBatch, LogRecord, entry_id, record_of_entry, text_bytes
from shared.states import TERMINAL_STATES, RunState

PAGE = 5000
"""Entries read from a log stream in one ``XRANGE``."""
FOLLOW_POLL = 0.25
"""Seconds between two looks at a followed run."""


@dataclass(frozen=True)
class LogLine:
    """One line of one attempt's log (``orch logs --json`` prints :meth:`document`)."""

    task: str
    attempt: int
    time: float
    line: str

    def document(self) -> dict[str, Any]:
        return {"task": self.task, "attempt": self.attempt, "time": self.time, "line": self.line}


class LogSource(Protocol):
    def records(self, task: str, attempt: int, after: int = 0) -> list[LogRecord]:
        """The stored records of an attempt's log numbered above ``after``, in order."""


class MemoryLogs:
    """The logs of an embedded run, built from the batches its attempts' processes sent."""

    def __init__(self) -> None:
        self._logs: dict[tuple[str, int], dict[int, LogRecord]] = {}

    def apply(self, task: str, attempt: int, batch: LogBatch) -> None:
        log = self._logs.setdefault((task, attempt), {})
        for record in batch.records:
            log[record.seq] = record
        for seq in range(batch.drop_from, batch.drop_to + 1) if batch.drop_to else ():
            log.pop(seq, None)

    def records(self, task: str, attempt: int, after: int = 0) -> list[LogRecord]:
        log = self._logs.get((task, attempt), {})
        return [record for seq, record in sorted(log.items()) if seq > after]


class RedisLogs:
    """The logs of run ``run_id`` in Redis."""

    def __init__(self, connection: redis.Redis, run_id: str) -> None:
        self.connection = connection
        self.run_id = run_id

    def records(self, task: str, attempt: int, after: int = 0) -> list[LogRecord]:
        key = keys.task_log(self.run_id, task, attempt)
        found: list[LogRecord] = []
        while True:
            page = self.connection.xrange(key, min=f"({entry_id(after)}", max="+", count=PAGE)
            found += [record_of_entry(entry, fields) for entry, fields in page]
            if len(page) < PAGE:
                return found
            after = found[-1].seq

    def records_before(self, task: str, attempt: int, before: Optional[int], count: int) -> list[LogRecord]:
        """The last ``count`` records of an attempt's log numbered below ``before`` (``None``: the
        end), in order: one ``XREVRANGE``, whatever the log's length."""
        key = keys.task_log(self.run_id, task, attempt)
        top = "+" if before is None else f"({entry_id(before)}"
        page = self.connection.xrevrange(key, max=top, min="-", count=count)
        return [record_of_entry(entry, fields) for entry, fields in reversed(page)]


@dataclass(frozen=True)
class LogPage:
    """Part of one attempt's log: ``lines`` (each with its line number, ``0`` for a dropped-lines
    notice), and whether lines come before ``first`` (the number of the first line read)."""

    lines: list[tuple[int, LogLine]]
    first: Optional[int]
    last: Optional[int]
    more_before: bool


TAIL = 1000
"""Lines of a log shown at first (its end), and read per page going back."""


def log_page(connection: redis.Redis, run_id: str, task: str, attempt: int, *, before: Optional[int] = None,
             after: Optional[int] = None, count: int = TAIL) -> LogPage:
    """The dashboard's view of one attempt's log: with ``after``, every line numbered above it
    (following a live attempt); else the last ``count`` lines before line ``before`` (``None``:
    the end), so that a long log opens at its end and its start is loaded on demand."""
    source = RedisLogs(connection, run_id)
    if after is not None:
        records = source.records(task, attempt, after)
    else:
        records = source.records_before(task, attempt, before, count + 1)
    more_before = after is None and len(records) > count
    if more_before:
        records = records[1:]
    lines: list[tuple[int, LogLine]] = []
    previous: Optional[LogRecord] = None
    for record in records:
        if previous is not None and record.seq > previous.seq + 1:
            dropped = max(0, record.offset - previous.offset - text_bytes(previous.text))
            lines.append((0, LogLine(task, attempt, record.time, dropped_notice(record.seq - previous.seq - 1,
                                                                                   dropped))))
        lines.append((record.seq, LogLine(task, attempt, record.time, record.text)))
        previous = record
    first = records[0].seq if records else None
    last = records[-1].seq if records else after
    return LogPage(lines, first, last, more_before)


def dropped_notice(lines: int, size: int) -> str:
    return (f"[orch: {lines} line{'s' if lines != 1 else ''} ({size} bytes) dropped here: an attempt's log keeps "
            f"its first and last parts, ORCH_MAX_LOG_BYTES in all]")


def attempt_log(source: LogSource, task: str, attempt: int, after: Optional[LogRecord] = None
                ) -> tuple[list[LogLine], Optional[LogRecord]]:
    """The lines of attempt ``attempt`` of ``task`` after record ``after`` (``None``: from the start),
    with a notice where lines were dropped; and the last record read (where to go on from)."""
    lines: list[LogLine] = []
    previous = after
    for record in source.records(task, attempt, after.seq if after else 0):
        seen, end = (previous.seq, previous.offset + text_bytes(previous.text)) if previous else (0, 0)
        if record.seq > seen + 1:
            lines.append(LogLine(task, attempt, record.time,
                                 dropped_notice(record.seq - seen - 1, max(0, record.offset - end))))
        lines.append(LogLine(task, attempt, record.time, record.text))
        previous = record
    return lines, previous


def log_text(lines: Iterable[LogLine]) -> str:
    """The lines as the task wrote them, each ending with a newline (``""`` for none)."""
    return "".join(f"{line.line}\n" for line in lines)


def format_line(line: LogLine, with_task: bool) -> str:
    """``orch logs``'s text form: local time to the millisecond, ``[task #attempt]`` if asked, the line."""
    stamp = datetime.fromtimestamp(line.time).strftime("%H:%M:%S.%f")[:-3]
    return f"{stamp} [{line.task} #{line.attempt}] {line.line}" if with_task else f"{stamp} {line.line}"


def _in_order(tasks: dict[str, Task]) -> list[str]:
    try:
        return dag.topological_order(tasks)
    except Exception:  # a damaged spec: the tasks as stored
        return list(tasks)


def _selected(tasks: dict[str, Task], task: Optional[str], attempt: Optional[int]) -> list[tuple[str, int]]:
    """``(task, attempt)`` pairs to show: the one task or every task in execution order, at
    ``attempt`` (default: its latest); tasks not started yet are left out."""
    if task is not None:
        if task not in tasks:
            raise UnknownTaskError(task)
        made = tasks[task].attempts
        if attempt is not None and not 1 <= attempt <= made:
            raise NoSuchAttemptError(task, attempt, made)
        return [(task, attempt or made)] if (attempt or made) else []
    return [(name, attempt or tasks[name].attempts) for name in _in_order(tasks)
            if tasks[name].attempts and (attempt is None or attempt <= tasks[name].attempts)]


def run_log(connection: redis.Redis, run_id: str, task: Optional[str] = None,
            attempt: Optional[int] = None) -> list[LogLine]:
    """``orch logs RUN_ID [TASK] [--attempt N]``: the log of ``task`` (else of every task that ran,
    in execution order) at ``attempt`` (else the latest). Raises :class:`RunNotFoundError`,
    :class:`UnknownTaskError` or :class:`NoSuchAttemptError`."""
    _, _, tasks = load_tasks(connection, run_id, with_results=False)
    source = RedisLogs(connection, run_id)
    lines: list[LogLine] = []
    for name, number in _selected(tasks, task, attempt):
        lines += attempt_log(source, name, number)[0]
    return lines


def task_log(connection: redis.Redis, run_id: str, task: str, attempt: Optional[int] = None) -> str:
    """The text of one attempt's log (default: the latest) of a run in Redis; ``""`` if it printed nothing."""
    return log_text(run_log(connection, run_id, task, attempt))


def follow_run_log(connection: redis.Redis, run_id: str, task: Optional[str] = None,
                   attempt: Optional[int] = None, *, poll: float = FOLLOW_POLL,
                   sleep: Callable[[float], None] = time.sleep) -> Iterator[LogLine]:
    """``orch logs --follow``: the lines of :func:`run_log` as they come, going on with each new
    attempt of a task (unless ``attempt`` pins one), until the task is final (``task`` given),
    the attempt pinned is over, or the run is final; then the rest, and the end."""
    source = RedisLogs(connection, run_id)
    meta, _, tasks = load_tasks(connection, run_id, with_results=False)
    _selected(tasks, task, attempt)  # validates
    names = [task] if task is not None else _in_order(tasks)
    cursors: dict[str, tuple[int, Optional[LogRecord]]] = {}
    while True:
        done = _follow_done(meta, tasks, task, attempt)
        for name in names:
            latest = attempt or tasks[name].attempts
            number, after = cursors.get(name, (0, None))
            number = number or latest  # from the latest attempt when first seen started
            while number and number <= latest:
                lines, after = attempt_log(source, name, number, after)
                yield from lines
                if number == latest:
                    break
                number, after = number + 1, None
            cursors[name] = (number, after)
        if done:
            return
        sleep(poll)
        meta, _, tasks = load_tasks(connection, run_id, with_results=False)


def _follow_done(meta: dict[str, Any], tasks: dict[str, Task], task: Optional[str], attempt: Optional[int]) -> bool:
    """Whether what is followed is over (its log is then complete: a worker stores an attempt's log
    before reporting it, and the coordinator records the task after that)."""
    if meta.get("state") != RunState.RUNNING.value:
        return True
    if task is None:
        return False
    followed = tasks[task]
    return followed.state in TERMINAL_STATES or (attempt is not None and followed.attempts > attempt)
