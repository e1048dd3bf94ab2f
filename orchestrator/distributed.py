"""Running a workflow on ``orch worker`` processes through Redis + RQ.

``run_distributed`` checks everything that can be checked before anything is
written (every task importable by reference, every argument encodable, Redis
reachable), writes the run in one MULTI, then coordinates it to the end.
"""
from __future__ import annotations

from typing import Any, Optional

import redis

from orchestrator.backends.rq import RQBackend
from orchestrator.coordinator import Coordinator, ProgressCallback
from orchestrator.run_store import create_run, new_run_id, task_record, task_spec
from orchestrator.task import Task
from shared import codec
from shared.config import Settings
from shared.connection import connect
from shared.errors import SerializationError, UnimportableTasksError
from shared.refs import reference_of
from shared.states import RunState


def task_references(tasks: dict[str, Task]) -> dict[str, str]:
    """``{name: "module:function"}``; raises :class:`UnimportableTasksError` naming every bad task."""
    refs: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name, task in tasks.items():
        if isinstance(task.func, str):
            refs[name] = task.func
            continue
        try:
            refs[name] = reference_of(task.func)
        except ValueError as exc:
            problems.append((name, str(exc)))
    if problems:
        raise UnimportableTasksError(problems)
    return refs


def encode_arguments(task: Task) -> str:
    try:
        return codec.encode([list(task.args), task.kwargs], f"arguments of task {task.name!r}").decode("utf-8")
    except SerializationError:
        raise
    except Exception as exc:  # pragma: no cover - the codec raises SerializationError for all it refuses
        raise SerializationError(f"arguments of task {task.name!r}: {exc}") from None


def run_distributed(
    workflow: Any,
    redis_url: str,
    *,
    on_progress: Optional[ProgressCallback] = None,
    on_submitted: Optional[Any] = None,
    settings: Optional[Settings] = None,
    connection: Optional[redis.Redis] = None,
) -> tuple[str, RunState]:
    """Submit ``workflow`` as a new run and coordinate it to the end; return ``(run_id, state)``.

    ``on_submitted(run_id)`` is called once the run is written, before the first dispatch.
    The caller's Task objects are kept current throughout.
    """
    settings = settings or Settings()
    tasks: dict[str, Task] = workflow.tasks
    refs = task_references(tasks)
    specs = {name: task_spec(task, refs[name], encode_arguments(task)) for name, task in tasks.items()}
    conn = connection if connection is not None else connect(redis_url)
    run_id = new_run_id(workflow.name)
    create_run(conn, run_id, workflow.name, list(specs.values()), {n: task_record(t) for n, t in tasks.items()})
    if on_submitted is not None:
        on_submitted(run_id)
    backend = RQBackend(conn, run_id, tasks, specs, settings)
    coordinator = Coordinator(tasks, backend, on_progress=on_progress)
    workflow.last_run_id = run_id
    state = coordinator.run()
    return run_id, state
