"""Live updates of an open page: what changed since the last look, read cheaply.

A page opens one server-sent event stream; the server looks at Redis every
:data:`POLL` seconds on its behalf and sends only changes. A run page's look is
one ``HMGET`` of the run's header fields (:data:`MARKER_FIELDS`: the coordinator
rewrites its counts and last applied event with every step); only when they moved
are the task records read (one ``HGETALL``) and compared with the last ones, and
only the tasks whose record changed are sent. A quiet run costs two commands a
second per open page, a busy one four, whatever its size; the page itself never polls.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import redis

from orchestrator.dashboard.views import MARKER_FIELDS, header_document, log_document, marker_token, record_row
from orchestrator.run_store import (decode_task_record, load_tasks, raw_task_records, read_meta,
                                   read_task_record)
from shared import keys
from shared.states import TERMINAL_STATES, RunState, TaskState

POLL = 0.5
"""Seconds between two looks at Redis for one open page: every change shows within a second."""


class RunWatch:
    """Follows one run for one page: :meth:`look` returns the events to send (possibly none).

    When the run moved, only the tasks that can have changed are read (``HMGET``): those not
    final whose dependencies are not all still unfinished (a task waits while all of them
    are). The run's own counts by state, written in the same transaction as the records,
    check the reading: when the snapshot's counts differ from them (a cascade of skipped or
    upstream-failed tasks, a rerun, a map's new children), every record is read (``HGETALL``).
    """

    def __init__(self, connection: redis.Redis, run_id: str) -> None:
        self.connection = connection
        self.run_id = run_id
        self.marker: Optional[dict[str, str]] = None
        self.records: dict[str, bytes] = {}
        self.states: dict[str, str] = {}
        self.dependencies: dict[str, list[str]] = {}
        self.strangers: set[str] = set()
        """Records of names the run does not have (damaged or forged): ignored."""
        self.resend = False

    def start(self, since: Optional[str] = None) -> None:
        """Take the run as it is now as the first snapshot. ``since``: the :func:`marker_token` of the
        data the page was drawn from; when the run moved since, the first look sends every task."""
        _, _, tasks = load_tasks(self.connection, self.run_id, with_results=False)
        self.dependencies = {name: [dep for dep in task.dependencies if dep in tasks] for name, task in tasks.items()}
        self.marker = read_meta(self.connection, self.run_id, MARKER_FIELDS)
        records = raw_task_records(self.connection, self.run_id)
        self.strangers = set(records) - set(self.dependencies)
        self._take({name: raw for name, raw in records.items() if name not in self.strangers})
        self.states.update({name: task.state.value for name, task in tasks.items() if name not in self.records})
        self.resend = since is not None and since != marker_token(self.marker)

    def _take(self, records: dict[str, bytes]) -> list[str]:
        """Keep ``records`` (all or some of the run's); return the names whose record changed."""
        changed = [name for name, raw in records.items() if self.records.get(name) != raw]
        for name in changed:
            self.records[name] = records[name]
            record = decode_task_record(records[name])
            self.states[name] = str(record["state"]) if record else "pending"
        return changed

    def _may_have_moved(self) -> list[str]:
        final = _FINAL
        return [name for name, deps in self.dependencies.items() if self.states.get(name) not in final
                and (not deps or any(self.states.get(dep) in final for dep in deps))]

    def _counts_agree(self, marker: dict[str, str]) -> bool:
        try:
            counts = {str(k): int(v) for k, v in json.loads(marker.get("counts") or "{}").items() if int(v)}
        except (ValueError, TypeError, AttributeError):
            return False
        mine: dict[str, int] = {}
        for state in self.states.values():
            mine[state] = mine.get(state, 0) + 1
        return mine == counts

    def look(self) -> list[tuple[str, Any]]:
        """``[("tasks", rows), ("header", header)]`` for what changed; ``("reload", None)`` when the
        run gained tasks (a mapped task expanded), ``("gone", None)`` when it vanished."""
        if self.resend:  # the run moved between the page's reading and this stream's: send it all
            self.resend = False
            rows = [record_row(name, record) for name, raw in self.records.items()
                    if (record := decode_task_record(raw)) is not None]
            return [("tasks", rows), ("header", header_document(self.run_id, self.marker or {}))]
        marker = read_meta(self.connection, self.run_id, MARKER_FIELDS)
        if marker == self.marker:
            return []
        previous, self.marker = self.marker or {}, marker
        if not marker:
            return [("gone", None)]
        changed: list[str] = []
        if marker.get("retries") == previous.get("retries"):
            names = self._may_have_moved()
            values = self.connection.hmget(keys.tasks(self.run_id), names) if names else []
            changed = self._take({name: raw for name, raw in zip(names, values) if raw is not None})
        if not self._counts_agree(marker):
            records = raw_task_records(self.connection, self.run_id)
            if set(records) - set(self.dependencies) - self.strangers:
                self.start()  # the page reads the run again, and so does this watch
                return [("reload", None)]
            known = {name: raw for name, raw in records.items() if name not in self.strangers}
            changed = list(dict.fromkeys(changed + self._take(known)))
        rows = []
        for name in changed:
            record = decode_task_record(self.records[name])
            if record is not None:
                rows.append(record_row(name, record))
        events: list[tuple[str, Any]] = [("header", header_document(self.run_id, marker))]
        if rows:
            events.insert(0, ("tasks", rows))
        return events


_FINAL = frozenset(state.value for state in TERMINAL_STATES)


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
