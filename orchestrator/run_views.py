"""What the CLI (and later the dashboard) shows of stored runs, as plain data.

Every reader of a run goes through :mod:`orchestrator.run_store`; this module
turns what it reads into the documented shapes (``orch status --json``,
``orch runs --json``), finds runs by state and workflow, and waits for a run
to finish. Extra keys may be added to these shapes later; the ones here stay.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Iterator, Optional

import redis

from orchestrator import dag
from orchestrator.run_store import RunSnapshot, epoch as _epoch, read_run, run_retries
from orchestrator.task import Task
from shared import keys
from shared.errors import RunNotFoundError, ScheduleNotFoundError
from shared.states import RunState

PAGE = 200
"""Run ids read from the newest-first index in one go while filtering."""


def task_document(task: Task) -> dict[str, Any]:
    """One task of ``orch status --json``; ``history``: its earlier attempts (``Task.history``)."""
    return {"name": task.name, "state": task.state.value, "attempts": task.attempts, "worker": task.worker,
            "started_at": task.started_at, "finished_at": task.finished_at, "duration": task.duration,
            "error": task.error, "history": [asdict(record) for record in task.history]}


def _jsonable(value: Any) -> Any:
    """``value`` in plain JSON types: what the codec adds (tuples, sets, bytes, dates, ...) as lists and strings."""
    return json.loads(json.dumps(value, default=lambda other: sorted(other, key=repr)
                                 if isinstance(other, (set, frozenset)) else str(other)))


def status_document(run_id: str, meta: dict[str, Any], tasks: dict[str, Task],
                    params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``orch status --json``: the run and its tasks in execution order."""
    try:
        order = dag.topological_order(tasks)
    except Exception:  # a damaged spec: show the tasks as stored
        order = list(tasks)
    document = {
        "run_id": run_id,
        "workflow": meta.get("workflow"),
        "state": meta.get("state"),
        "params": _jsonable(params or {}),
        "retries": run_retries(meta),
        "created_at": _epoch(meta.get("created_at")),
        "finished_at": _epoch(meta.get("finished_at")),
        "tasks": [task_document(tasks[name]) for name in order],
    }
    for optional in ("cancelled_by", "warning", "schedule", "trigger"):
        if meta.get(optional):
            document[optional] = meta[optional]
    if meta.get("tick"):
        document["tick"] = _epoch(meta.get("tick"))
    return document


def run_summary(snapshot: RunSnapshot) -> dict[str, Any]:
    """One element of ``orch runs --json`` (``schedule`` and ``tick`` for a run a schedule started)."""
    summary = {"run_id": snapshot.run_id, "workflow": snapshot.workflow, "state": snapshot.state,
               "created_at": snapshot.created_at, "finished_at": snapshot.finished_at,
               "counts": dict(snapshot.counts)}
    if snapshot.schedule:
        summary.update(schedule=snapshot.schedule, tick=snapshot.tick, trigger=snapshot.trigger)
    return summary


def _newest_first(connection: redis.Redis, index: str = keys.RUNS) -> Iterator[str]:
    """The run ids of ``index`` (all runs, or one schedule's), newest first, a page at a time."""
    start = 0
    while True:
        page = connection.zrevrange(index, start, start + PAGE - 1)
        if not page:
            return
        for raw in page:
            yield raw.decode() if isinstance(raw, bytes) else raw
        start += PAGE


def schedule_run_ids(connection: redis.Redis, name: str, limit: int = 20) -> list[str]:
    """The newest ``limit`` runs a schedule started (removed schedules included), newest first;
    ids whose run expired leave the index."""
    found: list[str] = []
    for raw in connection.zrevrange(keys.schedule_runs(name), 0, -1):
        run_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not connection.exists(keys.run(run_id)):
            try:
                connection.zrem(keys.schedule_runs(name), run_id)
            except redis.exceptions.NoPermissionError:
                pass
            continue
        found.append(run_id)
        if len(found) >= limit:
            break
    return found


def check_schedule_known(connection: redis.Redis, name: str) -> None:
    """Raise :class:`ScheduleNotFoundError` for a name that is no schedule and started no run kept
    (``orch runs --schedule`` with a typo is an error, not an empty list; a removed schedule's
    runs are still listed)."""
    if not connection.exists(keys.schedule(name), keys.schedule_runs(name)):
        raise ScheduleNotFoundError(name)


def find_runs(connection: redis.Redis, *, state: Optional[str] = None, workflow: Optional[str] = None,
              schedule: Optional[str] = None, limit: int = 20) -> list[RunSnapshot]:
    """The newest ``limit`` retained runs in ``state`` of ``workflow`` started by ``schedule`` (each
    ``None``: any), newest first. Ids whose keys expired leave the index."""
    found: list[RunSnapshot] = []
    index = keys.RUNS if schedule is None else keys.schedule_runs(schedule)
    for run_id in _newest_first(connection, index):  # read lazily: -n 5 reads about 5 runs, however many there were
        try:
            snapshot = read_run(connection, run_id)
        except RunNotFoundError:
            try:
                connection.zrem(index, run_id)
            except redis.exceptions.NoPermissionError:
                pass  # a read-only ACL user: the index keeps the id until a coordinator's cleanup
            continue
        if (state is None or snapshot.state == state) and (workflow is None or snapshot.workflow == workflow):
            found.append(snapshot)
            if len(found) >= limit:
                break
    return found


def wait_until_final(connection: redis.Redis, run_id: str, poll: float = 0.25) -> str:
    """Block until the run is no longer running; return its final state. Raises
    :class:`RunNotFoundError` if there is no such run (or it expires meanwhile)."""
    while True:
        state = connection.hget(keys.run(run_id), "state")
        if state is None:
            raise RunNotFoundError(run_id)
        text = state.decode() if isinstance(state, bytes) else state
        if text != RunState.RUNNING.value:
            return text
        time.sleep(poll)
