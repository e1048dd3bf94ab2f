"""Running a workflow on ``orch worker`` processes through Redis + RQ.

``submit_run`` checks everything that can be checked before anything is
written (every task importable by reference, every argument encodable, Redis
reachable) and writes the run in one MULTI. ``run_distributed`` then drives it
to the end itself; ``orch submit --detach`` leaves that to an ``orch
coordinator`` service (:func:`serve_coordinator`), which also adopts any run
whose coordinator's lease lapsed. ``resume_run`` continues a run from what is
in Redis alone; ``retry_run`` starts a finished run again from where it failed;
``cancel_run`` cancels one, adopting it if nobody drives it.
"""
from __future__ import annotations

import contextlib
import gc
import getpass
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import redis

from orchestrator.backends.routing import AUTO, TRANSPORTS
from orchestrator.backends.rq import RQBackend
from orchestrator.coordinator import Coordinator, ProgressCallback
from orchestrator.dag import Graph
from orchestrator.lease import Lease, LeaseLost
from orchestrator.run_spec import RunSpec
from orchestrator.run_store import (Apply, create_run, ensure_event_stream, load_tasks, new_run_id, request_cancel,
                                    run_retries)
from orchestrator.scheduler import Scheduler
from orchestrator.task import Task
from shared import keys
from shared.allow import Allowlist, refused
from shared.config import Settings, max_payload_bytes, max_tasks
from shared.connection import connect
from shared.errors import (CorruptRunError, LimitExceededError, RunExpiredError, RunNotFoundError,
                           RunStillRunningError, UnimportableTasksError, WorkflowError)
from shared.params import encode_params
from shared.refs import reference_of
from shared.signing import Signer
from shared.states import RunState, TaskState

log = logging.getLogger("orch.coordinator")


class RunBusyError(WorkflowError):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} is being driven by a live coordinator (it keeps renewing the run's "
                         f"lease); let it finish, or stop it with 'orch cancel {run_id}'")


def who() -> str:
    """``user@host (pid N)``: recorded as who cancelled a run."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "?"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def task_references(tasks: dict[str, Task]) -> list[str]:
    """Each task's ``"module:function"``, in task order; raises :class:`UnimportableTasksError`
    naming every bad task.

    Each distinct function is looked up once: a large DAG is mostly a few functions. One pass and
    no per-task temporaries, since at 100,000 tasks those would set the submitting process's peak
    memory.
    """
    found: dict[int, str] = {}
    bad: dict[int, str] = {}
    refs: list[str] = []
    for task in tasks.values():
        func = task.func
        ref = found.get(id(func))
        if ref is None and id(func) not in bad:
            try:
                ref = found[id(func)] = func if isinstance(func, str) else reference_of(func)
            except ValueError as exc:
                ref = bad[id(func)] = str(exc)
        refs.append(ref if ref is not None else bad[id(func)])  # a bad one: raised below
    if bad:
        raise UnimportableTasksError([(name, bad[id(t.func)]) for name, t in tasks.items() if id(t.func) in bad])
    return refs


@dataclass(frozen=True)
class Submission:
    run_id: str
    specs: RunSpec
    """The run's tasks as stored: ``specs[name]`` gives a task's fields (see :class:`RunSpec`)."""

    @property
    def graph(self) -> Graph:
        """The validated graph, which the run's scheduler reuses."""
        return self.specs.graph


def submit_run(workflow: Any, connection: redis.Redis, *, lease: Optional[Lease] = None,
               settings: Optional[Settings] = None, transport: str = AUTO,
               params: Optional[Mapping[str, Any]] = None, extra: Optional[dict[str, str]] = None,
               apply: Optional[Apply] = None) -> Submission:
    """Check and write a new run. Nothing is written on a bad input (parameters the codec
    cannot encode included).

    Task records are written as tasks move; a task without one is pending. ``extra`` and
    ``apply``: see :func:`~orchestrator.run_store.create_run` (how a schedule fences its runs).
    """
    settings = settings or Settings()
    if transport not in TRANSPORTS:
        raise WorkflowError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
    encoded = encode_params(params)
    with _no_cyclic_gc():
        return _submit(workflow, connection, lease, settings, transport, encoded, extra, apply)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Submitting a large DAG allocates a few objects per task and frees none: the cyclic
    collector would only rescan them, about a fifth of the time at 100,000 tasks."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _submit(workflow: Any, connection: redis.Redis, lease: Optional[Lease], settings: Settings,
            transport: str, params: Optional[bytes], extra: Optional[dict[str, str]] = None,
            apply: Optional[Apply] = None) -> Submission:
    tasks: dict[str, Task] = workflow.tasks
    Signer.from_environment()  # a bad key setting: one error before anything is written
    _check_task_count(workflow.name, len(tasks), max_tasks())
    graph = workflow.validate()
    refs = task_references(tasks)
    _check_allowed(tasks, refs, Allowlist.from_settings())
    specs = RunSpec.build(list(tasks.values()), graph, refs)
    _check_payloads(list(tasks), specs, max_payload_bytes())
    run_id = new_run_id(workflow.name)
    if lease is not None:
        lease.run_id, lease.key, lease.held = run_id, keys.lease(run_id), True
    create_run(connection, run_id, workflow.name, specs,
               lease_token=lease.token if lease else None, lease_ttl=settings.lease_ttl, transport=transport,
               params=params, extra=extra, apply=apply)
    return Submission(run_id, specs)


def _check_task_count(workflow: str, count: int, limit: int) -> None:
    if count > limit:
        raise LimitExceededError(f"workflow {workflow!r} has {count} tasks, over the limit of {limit} tasks per run "
                                 f"(ORCH_MAX_TASKS); split it into several runs or raise the limit")


def _check_payloads(names: list[str], specs: RunSpec, limit: int) -> None:
    """Refuse a run in which a task's encoded arguments are over ``limit`` bytes, naming the first."""
    sizes = [len(payload.encode("utf-8", "surrogatepass")) for payload in specs.payloads]
    if max(sizes, default=0) <= limit:
        return
    for i, code in enumerate(specs.payload_of):
        if sizes[code] > limit:
            raise LimitExceededError(f"task {names[i]!r}: its arguments encode to {sizes[code]} bytes, over the "
                                     f"limit of {limit} bytes (ORCH_MAX_PAYLOAD_BYTES); pass large data by "
                                     f"reference (a path, a URL) or raise the limit")


def _check_allowed(tasks: dict[str, Task], refs: list[str], allowlist: Allowlist) -> None:
    """With an allowlist of its own (``orch submit --allow`` / ``ORCH_ALLOW``), a coordinator refuses,
    before writing anything, a workflow naming a function outside it (its workers would refuse it)."""
    if not allowlist.prefixes:
        return
    outside = refused(zip(tasks, refs), allowlist)
    if outside:
        raise UnimportableTasksError((task, f"its function {ref!r} is outside the allowlist "
                                            f"({allowlist.describe()})") for task, ref in outside)


def run_distributed(
    workflow: Any,
    redis_url: str,
    *,
    on_progress: Optional[ProgressCallback] = None,
    on_submitted: Optional[Callable[[str], None]] = None,
    settings: Optional[Settings] = None,
    connection: Optional[redis.Redis] = None,
    detach: bool = False,
    transport: str = AUTO,
    on_notice: Optional[Callable[[Optional[str]], None]] = None,
    params: Optional[Mapping[str, Any]] = None,
) -> tuple[str, RunState]:
    """Submit ``workflow`` as a new run and, unless ``detach``, coordinate it to the end.

    ``transport``: ``"auto"`` (the default) sends each queue's jobs in the form its
    live workers run (:mod:`orchestrator.backends.routing`); ``"lean"`` or ``"rq"``
    pins one form for every queue. ``on_notice(text)`` is called when tasks start
    waiting on a queue no live worker serves, and with ``None`` when that clears.
    ``params``: the run's parameters (tasks read them as ``current_task().params``).

    Returns ``(run_id, state)`` (``running`` when detached). ``on_submitted(run_id)``
    is called once the run is written. The caller's Task objects are kept current.
    """
    settings = settings or Settings()
    conn = connection if connection is not None else connect(redis_url)
    lease = None if detach else Lease(conn, "", settings.lease_ttl)
    submission = submit_run(workflow, conn, lease=lease, settings=settings, transport=transport, params=params)
    run_id = submission.run_id
    workflow.last_run_id = run_id
    if on_submitted is not None:
        on_submitted(run_id)
    if detach:
        return run_id, RunState.RUNNING
    backend = RQBackend(conn, run_id, workflow.tasks, submission.specs, settings, lease=lease, transport=transport,
                        on_notice=on_notice, workflow=workflow.name)
    scheduler = Scheduler(workflow.tasks.values(), submission.graph)
    coordinator = Coordinator(workflow.tasks, backend, on_progress=on_progress, scheduler=scheduler)
    return run_id, coordinator.run()


def restore_coordinator(
    connection: redis.Redis,
    run_id: str,
    lease: Lease,
    *,
    settings: Optional[Settings] = None,
    on_progress: Optional[ProgressCallback] = None,
    on_notice: Optional[Callable[[Optional[str]], None]] = None,
) -> tuple[Coordinator, dict[str, Task]]:
    """Rebuild a run's coordinator from Redis alone, with its lease already held by ``lease``."""
    coordinator, tasks, repairs, _ = _restore(connection, run_id, lease, settings, on_progress, on_notice)
    coordinator.apply(repairs)
    return coordinator, tasks


def _restore(connection: redis.Redis, run_id: str, lease: Lease, settings: Optional[Settings],
             on_progress: Optional[ProgressCallback], on_notice: Optional[Callable[[Optional[str]], None]],
             ) -> tuple[Coordinator, dict[str, Task], list[Any], dict[str, Any]]:
    """The coordinator, tasks, repairs still to apply and metadata of a stored run; writes nothing."""
    settings = settings or Settings()
    meta, specs, tasks = load_tasks(connection, run_id)
    ensure_event_stream(connection, run_id)
    states = {name: (task.state, task.attempts, task.error, task.attempt_base) for name, task in tasks.items()
              if task.state is not TaskState.PENDING or task.attempts}
    now = time.time()
    graph_tasks = [task for task in tasks.values() if task.map_parent is None]
    maps = [(task, first, len(payloads)) for task, (first, payloads) in specs.maps.items()]
    scheduler, repairs = Scheduler.restore(graph_tasks, states, now, specs.graph, maps)
    scheduler.cancelled_by = meta.get("cancelled_by")
    running = {name: (task.attempts, task.worker) for name, task in tasks.items()
               if task.state is TaskState.RUNNING and task.worker}
    backend = RQBackend(connection, run_id, tasks, specs, settings, last_event=meta.get("last_event") or "0-0",
                        lease=lease, running=running, transport=meta.get("transport") or AUTO,
                        queued=[(name, task.attempts) for name, task in tasks.items()
                                if task.state is TaskState.QUEUED], on_notice=on_notice,
                        retries=run_retries(meta), workflow=meta.get("workflow") or "")
    coordinator = Coordinator(tasks, backend, on_progress=on_progress, scheduler=scheduler)
    for name, task in tasks.items():
        if task.state is TaskState.RETRYING:
            coordinator.arm_retry(name, task.attempts + 1, task.retry_at or now)
    return coordinator, tasks, repairs, meta


def resume_run(
    connection: redis.Redis,
    run_id: str,
    *,
    settings: Optional[Settings] = None,
    on_progress: Optional[ProgressCallback] = None,
    on_notice: Optional[Callable[[Optional[str]], None]] = None,
    patience: float = 0.0,
    on_wait: Optional[Callable[[float], None]] = None,
) -> tuple[RunState, dict[str, Task]]:
    """Continue ``run_id`` from Redis: succeeded tasks are not run again, running ones report in,
    due retries fire.

    A coordinator that just died still holds the lease for up to ``lease_ttl``: with
    ``patience`` seconds, wait that long for it to lapse (calling ``on_wait(patience)``
    once, when the wait starts). Raises :class:`RunBusyError` if the lease is still
    held after that, i.e. a live coordinator keeps renewing it."""
    settings = settings or Settings()
    lease = Lease(connection, run_id, settings.lease_ttl)
    if not _acquire_within(lease, patience, on_wait):
        raise RunBusyError(run_id)
    with _released_on_error(lease):
        coordinator, tasks = restore_coordinator(connection, run_id, lease, settings=settings,
                                                 on_progress=on_progress, on_notice=on_notice)
        return coordinator.run(), tasks


def retry_run(
    connection: redis.Redis,
    run_id: str,
    tasks: Iterable[str] = (),
    *,
    settings: Optional[Settings] = None,
    on_progress: Optional[ProgressCallback] = None,
    on_notice: Optional[Callable[[Optional[str]], None]] = None,
    detach: bool = False,
) -> tuple[RunState, dict[str, Task]]:
    """Start the finished run ``run_id`` again from where it failed and drive it to its end.

    Tasks that succeeded keep their results and do not run again; failed, upstream-failed
    and cancelled tasks, the tasks named in ``tasks`` (even if they succeeded) and everything
    downstream of those run again, each with a fresh budget of attempts; attempt numbers keep
    growing and earlier attempts stay in the run's history. The run keeps its id, is active
    again (its retention lifted until it finishes again) and counts one more retry. With
    ``detach`` the run is reopened and left to an ``orch coordinator`` service.

    Refused, with nothing written, for a run that is unknown (:class:`RunNotFoundError`),
    whose retention expired (:class:`RunExpiredError`), that is still running
    (:class:`RunStillRunningError`), for a task name not in the run (``UnknownTaskError``)
    and when there is nothing to rerun (``NothingToRerunError``).
    """
    settings = settings or Settings()
    if stored_run(connection, run_id) == RunState.RUNNING.value:
        raise RunStillRunningError(run_id)
    lease = Lease(connection, run_id, settings.lease_ttl)
    coordinator, loaded, _, meta = _restore(connection, run_id, lease, settings, on_progress, on_notice)
    if meta.get("state") == RunState.RUNNING.value:
        raise RunStillRunningError(run_id)
    if not coordinator.scheduler.finished:
        raise CorruptRunError(run_id, f"it is recorded as {meta.get('state')} but some of its tasks are not final")
    rerun = coordinator.scheduler.rerun(tasks, time.time())  # refuses unknown names, nothing to rerun
    if not lease.acquire():
        raise RunStillRunningError(run_id)
    with _released_on_error(lease):
        finished_at = connection.hget(keys.run(run_id), "finished_at")
        if finished_at is None or finished_at.decode() != meta.get("finished_at"):
            raise RunStillRunningError(run_id)  # another retry reopened it meanwhile
        coordinator.apply(rerun)
        if detach:
            lease.release()
            return RunState.RUNNING, loaded
        return coordinator.run(), loaded


@contextlib.contextmanager
def _released_on_error(lease: Lease) -> Iterator[None]:
    """Give the run's lease up if driving it fails (Ctrl-C too), so another coordinator may take it at once."""
    try:
        yield
    except BaseException:
        try:
            lease.release()
        except redis.RedisError:
            pass
        raise


def stored_run(connection: redis.Redis, run_id: str) -> str:
    """The recorded state of ``run_id``; raises :class:`RunExpiredError` for a run whose retention
    ended (still listed in ``orch:runs``), :class:`RunNotFoundError` for one never seen here."""
    state = connection.hget(keys.run(run_id), "state")
    if state is None:
        raise RunExpiredError(run_id) if connection.zscore(keys.RUNS, run_id) is not None else RunNotFoundError(run_id)
    return state.decode() if isinstance(state, bytes) else state


def _acquire_within(lease: Lease, patience: float, on_wait: Optional[Callable[[float], None]]) -> bool:
    """Take the lease once it lapses, within ``patience`` seconds; give up at once when it is seen
    renewed (its time to live went up): a live coordinator holds it, not a dead one."""
    deadline = time.monotonic() + patience
    last_ttl: Optional[int] = None
    while not lease.acquire():
        ttl = lease.connection.pttl(lease.key)
        if time.monotonic() >= deadline or (last_ttl is not None and ttl > last_ttl):
            return False
        last_ttl = ttl
        if on_wait is not None:
            on_wait(patience)
            on_wait = None
        time.sleep(0.1)
    return True


def cancel_run(connection: redis.Redis, run_id: str, by: Optional[str] = None,
               settings: Optional[Settings] = None, *, request: bool = True) -> bool:
    """Cancel ``run_id``. Returns True if this call cancelled it itself (nobody was driving it),
    False if it asked the run's live coordinator to, which does so at once (or the run had
    already finished).

    A coordinator that died keeps its lease for up to ``lease_ttl`` seconds: call again
    with ``request=False`` (the request is already in the stream) to adopt the run once
    the lease lapsed, which is what ``orch cancel`` does while it waits.
    """
    settings = settings or Settings()
    by = by or f"orch cancel by {who()}"
    if request:
        request_cancel(connection, run_id, by)
    lease = Lease(connection, run_id, settings.lease_ttl)
    if not lease.acquire():
        return False
    try:
        state = connection.hget(keys.run(run_id), "state")
        if state is not None and state.decode() != RunState.RUNNING.value:
            return False  # finished meanwhile (e.g. its coordinator just applied the request)
        coordinator, _ = restore_coordinator(connection, run_id, lease, settings=settings)
        if not coordinator.scheduler.finished:
            coordinator.cancel(by)
        return True
    finally:
        lease.release()


def serve_coordinator(connection: redis.Redis, *, settings: Optional[Settings] = None, poll: float = 0.5,
                      stop: Optional[threading.Event] = None, schedules: bool = True) -> None:
    """Drive every active run that has no live coordinator, each in its own thread, and fire the
    schedules that are due (unless ``schedules`` is false), until ``stop``.

    A run submitted with ``--detach`` has no lease at all; a run whose
    coordinator died has a lease that lapses ``lease_ttl`` seconds later. Both
    are adopted within ``poll`` seconds after that. Several services may run:
    the lease makes exactly one of them drive each run, a schedule's fenced
    claim exactly one of them fire each tick. A run a schedule starts is driven at once.
    """
    from orchestrator.schedule_service import ScheduleService

    settings = settings or Settings()
    stop = stop or threading.Event()
    driving: dict[str, threading.Thread] = {}
    lock = threading.Lock()

    def drive(run_id: str) -> None:
        try:
            state, _ = resume_run(connection, run_id, settings=settings)
            log.info("run %s finished: %s", run_id, state.value)
        except RunBusyError:
            pass
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception:
            log.exception("run %s: coordinator failed; another coordinator may adopt it", run_id)

    def adopt(run_id: str) -> None:
        with lock:
            if run_id in driving and driving[run_id].is_alive():
                return
            thread = threading.Thread(target=drive, args=(run_id,), name=f"run-{run_id}", daemon=True)
            driving[run_id] = thread
            for finished in [other for other, t in driving.items() if not t.is_alive()]:
                del driving[finished]
            thread.start()

    if schedules:
        service = ScheduleService(connection, settings=settings, on_started=adopt)
        threading.Thread(target=service.serve, args=(stop,), name="schedules", daemon=True).start()
    while not stop.is_set():
        try:
            for raw in connection.smembers(keys.ACTIVE):
                run_id = raw.decode() if isinstance(raw, bytes) else raw
                with lock:
                    if run_id in driving and driving[run_id].is_alive():
                        continue
                if not connection.exists(keys.run(run_id)):
                    connection.srem(keys.ACTIVE, run_id)
                    continue
                if connection.exists(keys.lease(run_id)):
                    continue
                log.info("adopting run %s", run_id)
                adopt(run_id)
        except redis.RedisError as exc:
            log.warning("coordinator service: Redis error (%s); retrying", exc)
        stop.wait(poll)
