"""What each dashboard page shows, as plain data read through the run store the CLI uses.

Every function here takes a Redis connection and returns dicts and lists ready for a
template or for JSON; nothing here knows about HTTP. Reads go through
:mod:`orchestrator.run_store`, :mod:`orchestrator.run_views`, :mod:`orchestrator.logs` and
:mod:`shared.workers`, the same functions ``orch status``, ``orch runs`` and ``orch logs`` use.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Any, Optional

import redis

from orchestrator import dag
from orchestrator.backends.routing import waiting_notice
from orchestrator.dashboard.graph_view import build_graph
from orchestrator.logs import log_page
from orchestrator.run_store import (epoch, load_history, load_tasks, read_meta, read_traceback, run_params,
                                   run_retries)
from orchestrator.run_views import find_runs, run_summary
from orchestrator.task import Task
from shared import keys
from shared.config import Settings
from shared.errors import RunNotFoundError, UnknownTaskError
from orchestrator.metrics import queue_lengths
from shared.workers import RQ, WorkerInfo, kinds_by_queue, live_workers

RUNS_PER_PAGE = 25


def runs_page(connection: redis.Redis, *, state: Optional[str], workflow: Optional[str], schedule: Optional[str],
              page: int) -> dict[str, Any]:
    """One page of ``orch runs`` (newest first, filtered as its options filter), with each run's duration."""
    found = find_runs(connection, state=state, workflow=workflow, schedule=schedule,
                      limit=(page + 1) * RUNS_PER_PAGE + 1)
    start = page * RUNS_PER_PAGE
    rows = []
    for snapshot in found[start:start + RUNS_PER_PAGE]:
        row = run_summary(snapshot)
        end = snapshot.finished_at or (time.time() if snapshot.state == "running" else None)
        row["duration"] = None if end is None or not snapshot.created_at else max(0.0, end - snapshot.created_at)
        rows.append(row)
    return {"runs": rows, "page": page, "has_next": len(found) > start + RUNS_PER_PAGE}


HEADER_FIELDS = ["workflow", "state", "params", "retries", "created_at", "finished_at", "cancelled_by", "cancelled_at",
                 "warning", "counts", "schedule", "tick"]
"""The run hash's fields :func:`header_document` reads."""
MARKER_FIELDS = [*HEADER_FIELDS, "last_event", "total"]
"""The run hash's fields a live page reads at each look: the header, and what changes with every step."""


def marker_token(marker: Optional[dict[str, str]]) -> str:
    """A short digest of a run's :data:`MARKER_FIELDS`: what a page's data was read at."""
    return hashlib.sha1(json.dumps(marker or {}, sort_keys=True).encode()).hexdigest()[:16]


def header_document(run_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The run page's header: what ``orch status`` prints above its table."""
    counts: dict[str, int] = {}
    try:
        counts = {str(k): int(v) for k, v in json.loads(meta.get("counts") or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        pass
    return {"run_id": run_id, "workflow": meta.get("workflow"), "state": meta.get("state"),
            "params": run_params(meta), "retries": run_retries(meta), "created_at": epoch(meta.get("created_at")),
            "finished_at": epoch(meta.get("finished_at")), "cancelled_by": meta.get("cancelled_by"),
            "cancelled_at": epoch(meta.get("cancelled_at")), "warning": meta.get("warning"), "counts": counts,
            "schedule": meta.get("schedule"), "tick": meta.get("tick")}


def run_header(connection: redis.Redis, run_id: str) -> dict[str, Any]:
    """The header alone (one ``HMGET``): what the run page is drawn with before its data arrives."""
    meta = read_meta(connection, run_id, HEADER_FIELDS)
    if not meta:
        raise RunNotFoundError(run_id)
    return header_document(run_id, meta)


def task_row(task: Task) -> list[Any]:
    """One row of the grid: ``[name, state, attempts, worker, started_at, finished_at, error]``."""
    return [task.name, task.state.value, task.attempts, task.worker, task.started_at, task.finished_at, task.error]


def record_row(name: str, record: dict[str, Any]) -> list[Any]:
    """A grid row from a stored task record (the live updates' form of :func:`task_row`)."""
    return [name, record.get("state"), record.get("attempt") or 0, record.get("worker"), record.get("started_at"),
            record.get("finished_at"), record.get("error")]


def _order(tasks: dict[str, Task]) -> list[str]:
    """Execution order, each mapped task's children right after it."""
    try:
        order = dag.topological_order(tasks)
    except Exception:  # a damaged spec: the tasks as stored
        order = list(tasks)
    children: dict[str, list[str]] = {}
    for name in order:
        parent = tasks[name].map_parent
        if parent is not None:
            children.setdefault(parent, []).append(name)
    placed: list[str] = []
    for name in order:
        if tasks[name].map_parent is None:
            placed.append(name)
            placed += children.pop(name, [])
    for rest in children.values():
        placed += rest
    return placed


def run_document(connection: redis.Redis, run_id: str) -> dict[str, Any]:
    """The run page's data: header, every task as a grid row (execution order), the graph, and
    for each row the index of the graph node that shows it."""
    marker = read_meta(connection, run_id, MARKER_FIELDS)  # before the tasks: a change meanwhile shows as one
    meta, _, tasks = load_tasks(connection, run_id, with_results=False)
    order = _order(tasks)
    graph = build_graph(order, tasks)
    return {"header": header_document(run_id, meta), "marker": marker_token(marker),
            "rows": [task_row(tasks[name]) for name in order],
            "node_of": [graph.node_of.get(name, -1) for name in order], "graph": graph.document()}


def task_document(connection: redis.Redis, run_id: str, name: str) -> dict[str, Any]:
    """The task page's data: the task, its attempts (earlier ones from the run's history, then
    its latest), the traceback of its last failure, and its dependencies and dependents."""
    meta, _, tasks = load_tasks(connection, run_id, with_results=False)
    if name not in tasks:
        raise UnknownTaskError(name)
    task = tasks[name]
    load_history(connection, run_id, {name: task})
    attempts = [asdict(record) for record in task.history]
    if task.attempts and all(record["attempt"] != task.attempts for record in attempts):
        attempts.append({"attempt": task.attempts, "state": task.state.value, "error": task.error,
                         "worker": task.worker, "started_at": task.started_at, "finished_at": task.finished_at})
    for record in attempts:
        start, end = record.get("started_at"), record.get("finished_at")
        record["duration"] = end - start if start and end else None
    return {"header": header_document(run_id, meta), "name": name, "state": task.state.value,
            "attempts": attempts, "latest": task.attempts, "error": task.error,
            "traceback": read_traceback(connection, run_id, name), "queue": task.queue,
            "dependencies": list(task.dependencies) or ([task.map_parent] if task.map_parent else []),
            "dependents": [other.name for other in tasks.values() if name in other.dependencies],
            "map_parent": task.map_parent}


def log_document(connection: redis.Redis, run_id: str, task: str, attempt: int, *, before: Optional[int] = None,
                 after: Optional[int] = None) -> dict[str, Any]:
    """Part of one attempt's log for the page (its end, an earlier page, or what came after a line)."""
    page = log_page(connection, run_id, task, attempt, before=before, after=after)
    return {"attempt": attempt, "lines": [[seq, line.time, line.line] for seq, line in page.lines],
            "first": page.first, "last": page.last, "more_before": page.more_before}


def _running_by_worker(connection: redis.Redis, workers: list[WorkerInfo]) -> dict[str, list[str]]:
    """worker -> ``run / task #attempt`` of the attempts its lean work processes hold; for an RQ
    worker, ``run / task number N #attempt`` of the job RQ records as its current one."""
    slots = sorted(s.decode() if isinstance(s, bytes) else s for s in connection.smembers(keys.LEAN_WORKERS))
    rq_names = [info.name for info in workers if info.kind == RQ]
    pipe = connection.pipeline(transaction=False)
    for slot in slots:
        pipe.lrange(keys.inflight(slot), 0, -1)
    for name in rq_names:
        pipe.hget(f"rq:worker:{name}", "current_job")
    replies = pipe.execute()
    running: dict[str, list[str]] = {}
    for name, job in zip(rq_names, replies[len(slots):]):
        prefix, _, rest = (job.decode() if isinstance(job, bytes) else job or "").partition("-")
        run_id, index, attempt = (rest.rsplit("-", 2) + ["", ""])[:3] if prefix == keys.PREFIX else ("", "", "")
        if run_id and index.isdigit() and attempt.isdigit():
            running.setdefault(name, []).append(f"{run_id} / task number {index} #{attempt}")
    for slot, entries in zip(slots, replies[:len(slots)]):
        for entry in entries:
            try:
                run_id, task, attempt = json.loads(entry)[:3]
            except (ValueError, TypeError):
                continue
            running.setdefault(keys.slot_worker(slot), []).append(f"{run_id} / {task} #{attempt}")
    return running


def workers_document(connection: redis.Redis) -> dict[str, Any]:
    """The workers page: live workers (queues, what each runs, heartbeat age), queue depths, and
    the warning the coordinator gives when tasks wait on a queue no live worker serves."""
    workers = live_workers(connection)
    pipe = connection.pipeline(transaction=False)
    for info in workers:
        pipe.pttl(keys.alive(info.name))
    ttls = pipe.execute() if workers else []
    running = _running_by_worker(connection, workers)
    ttl = Settings().heartbeat_ttl
    rows = []
    for info, left in zip(workers, ttls):
        age = max(0.0, ttl - left / 1000) if isinstance(left, int) and left >= 0 else None
        rows.append({"name": info.name, "kind": info.kind, "queues": list(info.queues), "host": info.host,
                     "pid": info.pid, "concurrency": info.concurrency, "heartbeat_age": age,
                     "running": running.get(info.name, [])})
    depths = {name: {"lean": lean, "rq": rq} for name, (lean, rq) in queue_lengths(connection, workers).items()}
    served = kinds_by_queue(workers)
    queues = [{"name": name, "lean": d["lean"], "rq": d["rq"], "served_by": sorted(served.get(name, ()))}
              for name, d in sorted(depths.items())]
    warning = waiting_notice({name: d["lean"] + d["rq"] for name, d in depths.items()}, served)
    return {"workers": rows, "queues": queues, "warning": warning}
