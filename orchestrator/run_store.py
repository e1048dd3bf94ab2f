"""A run's state in Redis: written by its coordinator, read by ``orch status`` / ``orch runs``.

The layout is in :mod:`shared.keys`. The spec stored at submit holds all a
coordinator needs to drive (or resume) the run without the submitter's Python
objects: per task its reference, dependencies, retry policy, timeout, queue
and encoded arguments, in the compact form of :mod:`orchestrator.run_spec`
(format 2; runs stored in format 1 by an older orch are not read).
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import redis

from orchestrator.metrics_store import count_run_started
from orchestrator.run_spec import RunSpec, run_arguments
from orchestrator.task import AttemptRecord, Task
from shared import codec, keys
from shared.errors import CorruptRunError, RunNotFoundError, WorkflowError
from shared.messages import cancel_fields
from shared.params import PARAMS_FIELD, decode_params
from shared.signing import Signer
from shared.states import RunState, TaskState


def new_run_id(workflow_name: str) -> str:
    """Sortable by time, unique by 48 random bits (and checked with SETNX-like HSETNX at create)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{secrets.token_hex(6)}"


def task_record(task: Task) -> str:
    """The JSON a task's field in ``orch:run:{id}:tasks`` holds (``base`` only once the task was rerun)."""
    record = {
        "state": task.state.value,
        "attempt": task.attempts,
        "error": task.error,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "worker": task.worker,
        "retry_at": task.retry_at,
    }
    if task.attempt_base:
        record["base"] = task.attempt_base
    return json.dumps(record, separators=(",", ":"))


Apply = Callable[[list[tuple]], None]
"""Runs a list of commands (argument tuples) atomically, e.g. behind a fence (a schedule's tick)."""


def create_run(connection: redis.Redis, run_id: str, workflow: str, spec: RunSpec,
               lease_token: Optional[str] = None, lease_ttl: float = 5.0,
               transport: str = "auto", params: Optional[bytes] = None,
               extra: Optional[dict[str, str]] = None, apply: Optional[Apply] = None) -> None:
    """Write a new run in one MULTI, so a failure leaves nothing half-written.

    With ``lease_token`` the submitter holds the run's lease from the start;
    without it (``orch submit --detach``) the run waits for an ``orch coordinator``.
    ``params``: the run's parameters, encoded by :func:`shared.params.encode_params`.
    ``extra``: more fields of the run's hash (a scheduled run's schedule and tick).
    ``apply``: given, it runs the commands instead of a MULTI (with commands of its own).
    """
    now = time.time()
    pipe = connection.pipeline(transaction=True)
    if lease_token is not None:
        pipe.set(keys.lease(run_id), lease_token, px=int(lease_ttl * 1000))
    meta: dict[str, Any] = {
        "workflow": workflow,
        "state": RunState.RUNNING.value,
        "created_at": repr(now),
        "total": len(spec),
        "spec": spec.to_json(),
        "last_event": "0-0",
        "transport": transport,
    }
    if params is not None:
        meta[PARAMS_FIELD] = params
    meta.update(extra or {})
    pipe.hset(keys.run(run_id), mapping=meta)
    pipe.zadd(keys.RUNS, {run_id: now})
    pipe.sadd(keys.ACTIVE, run_id)
    open_event_stream(pipe, run_id)
    count_run_started(pipe, workflow, (profile.queue for profile in spec.profiles))
    if apply is None:
        pipe.execute()
        return
    commands = [args for args, _options in pipe.command_stack]
    pipe.reset()
    apply(commands)


def run_keys(connection: redis.Redis, run_id: str) -> list[Any]:
    """Every key of run ``run_id``: those with fixed names and the logs its log index names
    (what retention expires, and what must live again if the run does)."""
    return [*keys.all_of_run(run_id), *connection.smembers(keys.logs(run_id))]


def open_event_stream(connection: Any, run_id: str) -> None:
    """Create the run's event stream, empty (an entry added and trimmed at once): workers report
    only to a stream that exists (``XADD NOMKSTREAM``). Call only for a stream that does not exist
    yet (it would drop what is in it): see :func:`ensure_event_stream`."""
    connection.xadd(keys.events(run_id), {"status": "opened"}, maxlen=0)


def ensure_event_stream(connection: redis.Redis, run_id: str) -> None:
    """Open the run's event stream if it is not there (a run written before streams were opened
    with the run, whose workers have reported nothing yet). No worker can create it meanwhile."""
    if not connection.exists(keys.events(run_id)):
        open_event_stream(connection, run_id)


def request_cancel(connection: redis.Redis, run_id: str, by: str) -> None:
    """Ask the run's coordinator to cancel it; it wakes on the stream entry at once. Signed with this
    process's key when signing is on (a coordinator with a key ignores unsigned requests)."""
    if not connection.exists(keys.run(run_id)):
        raise RunNotFoundError(run_id)
    connection.xadd(keys.events(run_id), cancel_fields(by, run_id, Signer.from_environment()))


def load_tasks(connection: redis.Redis, run_id: str, with_results: bool = True
               ) -> tuple[dict[str, Any], RunSpec, dict[str, Task]]:
    """``(meta, spec, tasks)`` of a stored run, the Task objects carrying the recorded state.

    All a coordinator needs to resume the run (the spec's graph is validated, so
    the scheduler reuses it), and all ``orch status`` shows. A damaged spec (or
    one in another format) raises :class:`CorruptRunError`; a damaged task record
    leaves that task pending.
    """
    meta = {_text(k): _text(v) for k, v in connection.hgetall(keys.run(run_id)).items()}
    if not meta:
        raise RunNotFoundError(run_id)
    try:
        spec = RunSpec.from_json(meta["spec"])
        tasks = spec.tasks()
    except (KeyError, TypeError, ValueError, WorkflowError) as exc:
        raise CorruptRunError(run_id, f"its task spec is unreadable ({exc})") from None
    _load_children(connection, run_id, spec, tasks)
    for name, raw in connection.hgetall(keys.tasks(run_id)).items():
        task = tasks.get(_text(name))
        try:
            record = json.loads(raw)
            state = TaskState(record["state"])
            attempts = int(record.get("attempt") or 0)
        except (KeyError, ValueError, TypeError):
            continue
        if task is None:
            continue
        task.state, task.attempts, task.error = state, attempts, record.get("error")
        task.started_at, task.finished_at = record.get("started_at"), record.get("finished_at")
        task.worker, task.retry_at = record.get("worker"), record.get("retry_at")
        task.attempt_base = _count(record.get("base"), attempts)
    if with_results:
        for name, blob in connection.hgetall(keys.results(run_id)).items():
            task = tasks.get(_text(name))
            if task is not None:
                try:
                    task.result = codec.decode(blob)
                except WorkflowError:
                    task.result = None
    return meta, spec, tasks


def _count(value: Any, most: int) -> int:
    """A recorded attempt count, within ``0..most`` (0 if damaged)."""
    try:
        return max(0, min(int(value or 0), most))
    except (TypeError, ValueError):
        return 0


def load_history(connection: redis.Redis, run_id: str, tasks: dict[str, Task]) -> None:
    """Fill each task's ``history`` with its earlier attempts (oldest first); damaged records are skipped."""
    found: dict[str, list[AttemptRecord]] = {}
    for raw_field, raw in connection.hgetall(keys.attempts(run_id)).items():
        try:
            name, attempt = keys.split_attempt_field(_text(raw_field) or "")
            record = AttemptRecord.from_json(attempt, raw)
        except (KeyError, TypeError, ValueError):
            continue
        if name in tasks:
            found.setdefault(name, []).append(record)
    for name, task in tasks.items():
        task.history = tuple(sorted(found.get(name, ()), key=lambda record: record.attempt))


def run_params(meta: dict[str, Any]) -> dict[str, Any]:
    """The parameters a run was submitted with (``{}`` if none, or if the stored value is damaged)."""
    blob = meta.get(PARAMS_FIELD)
    if not blob:
        return {}
    try:
        return decode_params(blob)
    except WorkflowError:
        return {}


def run_retries(meta: dict[str, Any]) -> int:
    """How many times the run was rerun from failure."""
    return _count(meta.get("retries"), 1 << 30)


def _load_children(connection: redis.Redis, run_id: str, spec: RunSpec, tasks: dict[str, Task]) -> None:
    """Add the children of the run's expanded mapped tasks (``keys.maps``) to ``spec`` and ``tasks``,
    in the order they were made. Anything damaged raises :class:`CorruptRunError`."""
    try:
        found = []
        for name, raw in connection.hgetall(keys.maps(run_id)).items():
            record = json.loads(raw)
            first, payloads = record["first"], record["payloads"]
            if not (isinstance(first, int) and isinstance(payloads, list)
                    and all(isinstance(p, str) for p in payloads)):
                raise ValueError("not {first: int, payloads: [str]}")
            found.append((first, _text(name) or "", payloads))
        for first, name, payloads in sorted(found):
            parent = tasks[name]
            for child, payload in zip(spec.add_children(name, first, payloads), payloads):
                tasks[child] = parent.child(child, *run_arguments(payload))
    except (KeyError, TypeError, ValueError, WorkflowError) as exc:
        raise CorruptRunError(run_id, f"the expansion of a mapped task is unreadable ({exc})") from None


@dataclass
class RunSnapshot:
    run_id: str
    workflow: str
    state: str
    created_at: float
    finished_at: Optional[float]
    cancelled_by: Optional[str]
    counts: dict[str, int] = field(default_factory=dict)
    schedule: Optional[str] = None
    """The schedule that started the run, with its ``tick`` (epoch s) and ``trigger`` (fired, manual, backfill)."""
    tick: Optional[float] = None
    trigger: Optional[str] = None


def _text(value: Any) -> str:
    """A Redis reply (bytes, or str on a decoding connection) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def epoch(value: Any) -> Optional[float]:
    """A time field of a run record as a number, ``None`` when absent or damaged (anything may be
    written to Redis: a reader shows what it can and never fails on one field)."""
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is None or math.isfinite(number) else None


def read_run(connection: redis.Redis, run_id: str) -> RunSnapshot:
    """The run's metadata and task counts (as of its last step), without its tasks."""
    meta = {_text(k): _text(v) for k, v in connection.hgetall(keys.run(run_id)).items()}
    if not meta:
        raise RunNotFoundError(run_id)
    snapshot = RunSnapshot(
        run_id=run_id,
        workflow=meta.get("workflow", "?"),
        state=meta.get("state", "?"),
        created_at=epoch(meta.get("created_at")) or 0.0,
        finished_at=epoch(meta.get("finished_at")),
        cancelled_by=meta.get("cancelled_by"),
        schedule=meta.get("schedule"),
        tick=epoch(meta.get("tick")),
        trigger=meta.get("trigger"),
    )
    try:
        counts = json.loads(meta.get("counts") or "{}")
        snapshot.counts = {str(k): int(v) for k, v in counts.items()}
    except (ValueError, TypeError, AttributeError):
        snapshot.counts = {}
    total = meta.get("total") or ""
    if not snapshot.counts and total.isdigit():
        snapshot.counts = {"pending": int(total)}
    return snapshot


def read_result(connection: redis.Redis, run_id: str, task: str) -> Any:
    blob = connection.hget(keys.results(run_id), task)
    return None if blob is None else codec.decode(blob)
