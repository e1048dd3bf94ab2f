"""Live updates of an open page: what changed since the last look, read cheaply.

A page opens one server-sent event stream; the server looks at Redis every
:data:`POLL` seconds on its behalf and sends only changes. A run page's look is
one ``HMGET`` of the run's change marker (:func:`orchestrator.run_store.run_marker`,
fields the coordinator rewrites with every step); only when it moved are the
task records read (one ``HGETALL``) and compared with the last ones, and only
the tasks whose record changed are sent. A quiet run costs two commands a
second per open page, whatever its size; the page itself never polls.
"""
from __future__ import annotations

from typing import Any, Optional

import redis

from orchestrator.dashboard.views import HEADER_FIELDS, header_document, log_document, record_row
from orchestrator.run_store import decode_task_record, raw_task_records, read_meta, read_task_record, run_marker
from shared import keys
from shared.states import TERMINAL_STATES, RunState, TaskState

POLL = 0.5
"""Seconds between two looks at Redis for one open page: every change shows within a second."""


class RunWatch:
    """Follows one run for one page: :meth:`look` returns the events to send (possibly none)."""

    def __init__(self, connection: redis.Redis, run_id: str) -> None:
        self.connection = connection
        self.run_id = run_id
        self.marker: Optional[tuple[Optional[str], ...]] = None
        self.records: dict[str, bytes] = {}

    def start(self) -> None:
        """Take the state the page was drawn from as the first snapshot (read right after it)."""
        self.marker = run_marker(self.connection, self.run_id)
        self.records = raw_task_records(self.connection, self.run_id)

    def look(self) -> list[tuple[str, Any]]:
        """``[("tasks", rows), ("header", header)]`` for what changed; ``("reload", None)`` when the
        run gained tasks (a mapped task expanded) or vanished (its retention ended)."""
        marker = run_marker(self.connection, self.run_id)
        if marker == self.marker:
            return []
        self.marker = marker
        if all(value is None for value in marker):
            return [("gone", None)]
        records = raw_task_records(self.connection, self.run_id)
        if set(records) - set(self.records):
            self.records = records
            return [("reload", None)]
        changed = [name for name, raw in records.items() if self.records.get(name) != raw]
        self.records = records
        rows = []
        for name in changed:
            record = decode_task_record(records[name])
            if record is not None:
                rows.append(record_row(name, record))
        meta = read_meta(self.connection, self.run_id, HEADER_FIELDS)
        events: list[tuple[str, Any]] = [("header", header_document(self.run_id, meta))]
        if rows:
            events.insert(0, ("tasks", rows))
        return events


class LogFollow:
    """Follows one task's latest attempt for the task page: new log lines and the task's state."""

    def __init__(self, connection: redis.Redis, run_id: str, task: str, attempt: int, after: Optional[int]) -> None:
        self.connection = connection
        self.run_id = run_id
        self.task = task
        self.attempt = attempt
        self.after = after or 0
        self.state: Optional[str] = None
        self.done = False

    def look(self) -> list[tuple[str, Any]]:
        """New lines of the followed attempt; ``("task", record)`` when the task's record changed;
        ``("end", None)`` once the attempt is over and its log read to the end (a worker stores
        an attempt's log before reporting it, so nothing comes after that)."""
        record = read_task_record(self.connection, self.run_id, self.task)
        events: list[tuple[str, Any]] = []
        page = log_document(self.connection, self.run_id, self.task, self.attempt, after=self.after)
        if page["lines"]:
            self.after = page["last"] or self.after
            events.append(("lines", page))
        if record is None:
            self.done = True
            return events + [("end", None)]
        state = record.get("state")
        if state != self.state:
            self.state = state
            events.append(("task", record))
        made = int(record.get("attempt") or 0)
        attempt_over = made > self.attempt or (made == self.attempt and (
            state in {s.value for s in TERMINAL_STATES} or state == TaskState.RETRYING.value))
        run_state = self.connection.hget(keys.run(self.run_id), "state")
        if attempt_over or (run_state is not None and run_state.decode() != RunState.RUNNING.value):
            self.done = True
            events.append(("end", None))
        return events
