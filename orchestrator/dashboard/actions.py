"""What the dashboard's buttons do: each calls exactly the function its CLI command calls.

=========================  ==========================================================
button                     same as
=========================  ==========================================================
cancel a run               ``orch cancel RUN`` (:func:`orchestrator.distributed.cancel_run`)
retry a run from failure   ``orch retry RUN --detach`` (:func:`~orchestrator.distributed.retry_run`)
rerun a task and after     ``orch retry RUN --task NAME --detach``
trigger/pause/resume       ``orch schedule trigger|pause|resume NAME`` (:mod:`orchestrator.schedules`)
=========================  ==========================================================

Retries are detached, as the dashboard drives no run itself: an ``orch coordinator``
service picks the reopened run up. Under a read-only Redis user (the ``orch-reader`` ACL
user) every action is refused before anything is sent, and the page shows them disabled.
"""
from __future__ import annotations

import importlib
import threading
import time
from typing import Any, Optional

import redis
from starlette.requests import Request

from orchestrator.distributed import cancel_run, retry_run
from orchestrator.metrics import metrics_text
from shared import keys
from shared.errors import WorkflowError

READ_ONLY_REASON = ("this dashboard's Redis user may only read (a read-only ACL user such as orch-reader): "
                    "actions are off. Start 'orch dashboard' with a user that may write to act on runs.")
ACCESS_RECHECK = 30.0
"""Seconds a finding of "may write" / "may only read" is kept before Redis is asked again."""


class ActionRefused(WorkflowError):
    """An action the dashboard does not carry out; the message says why."""


class Access:
    """Whether this dashboard's Redis user may write: asked by deleting a key that never exists
    (:data:`shared.keys.DASHBOARD_WRITE_PROBE`), refused with ``NOPERM`` for a read-only user."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self._known: Optional[tuple[bool, float]] = None
        self._lock = threading.Lock()

    def writable(self) -> bool:
        with self._lock:
            if self._known is not None and time.monotonic() - self._known[1] < ACCESS_RECHECK:
                return self._known[0]
            try:
                self.connection.delete(keys.DASHBOARD_WRITE_PROBE)
                allowed = True
            except redis.exceptions.NoPermissionError:
                allowed = False
            except (redis.ConnectionError, redis.TimeoutError):
                return self._known[0] if self._known is not None else False  # Redis away: ask again later
            self._known = (allowed, time.monotonic())
            return allowed


def _require_write(request: Request) -> redis.Redis:
    dashboard = request.app.state.dashboard
    if not dashboard.access.writable():
        raise ActionRefused(READ_ONLY_REASON)
    return dashboard.connection


def cancel(request: Request, form: dict[str, str], user: str) -> str:
    """``orch cancel``: ask the run's coordinator to cancel it (or cancel it here if none drives it)."""
    connection = _require_write(request)
    run_id = request.path_params["run_id"]
    if cancel_run(connection, run_id, f"dashboard by {user}"):
        return f"run {run_id} cancelled (no coordinator was driving it)"
    return f"run {run_id}: cancel requested from its coordinator"


def retry(request: Request, form: dict[str, str], user: str) -> str:
    """``orch retry RUN --detach``: reopen the finished run from where it failed."""
    connection = _require_write(request)
    run_id = request.path_params["run_id"]
    retry_run(connection, run_id, (), detach=True)
    return f"run {run_id} reopened from where it failed; an orch coordinator drives it"


def rerun(request: Request, form: dict[str, str], user: str) -> str:
    """``orch retry RUN --task NAME --detach``: run NAME and everything downstream of it again."""
    connection = _require_write(request)
    run_id, task = request.path_params["run_id"], form.get("task", "")
    if not task:
        raise ActionRefused("name the task to rerun")
    retry_run(connection, run_id, (task,), detach=True)
    return f"task {task} and its descendants rerun in run {run_id}; an orch coordinator drives it"


def _schedules() -> Any:
    """The schedules module (``orch schedule``), or a clear refusal where this orch has none."""
    try:
        return importlib.import_module("orchestrator.schedules")
    except ImportError:
        raise ActionRefused("this orch has no schedules (orchestrator.schedules is missing)") from None


def schedule_action(request: Request, form: dict[str, str], user: str) -> str:
    """``orch schedule trigger|pause|resume NAME``."""
    connection = _require_write(request)
    name, verb = request.path_params["name"], request.path_params["verb"]
    module = _schedules()
    if verb == "trigger":
        run_id = module.trigger_schedule(connection, name, {})  # as 'orch schedule trigger NAME' (no --param)
        return f"schedule {name} triggered: run {run_id}"
    if verb == "pause":
        module.pause_schedule(connection, name)
        return f"schedule {name} paused"
    if verb == "resume":
        module.resume_schedule(connection, name)
        return f"schedule {name} resumed"
    raise ActionRefused(f"no schedule action {verb!r}: trigger, pause or resume")


def schedules_document(connection: redis.Redis) -> dict[str, Any]:
    """The schedules page: each schedule as ``orch schedule show --json`` describes it."""
    try:
        module = _schedules()
    except ActionRefused as exc:
        return {"available": False, "reason": str(exc), "schedules": []}
    described = [module.describe_schedule(connection, item["name"]) for item in module.list_schedules(connection)]
    return {"available": True, "reason": None, "schedules": described}


def metrics(connection: redis.Redis) -> tuple[bytes, str]:
    """``/metrics``: the Prometheus text of :mod:`orchestrator.metrics` (the same as
    ``orch coordinator --metrics-port`` serves)."""
    return metrics_text(connection)
