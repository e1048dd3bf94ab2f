"""``orch worker``: an RQ worker that also reports attempts RQ alone would lose.

RQ already dequeues, forks a work horse per job, enforces a job timeout,
heartbeats, registers itself (``rq info`` lists it) and shuts down gracefully
(first SIGTERM/SIGINT: finish the job in hand; second: kill it). What it does
not do, and this class adds:

- when the work horse dies without reporting (SIGKILL, segfault,
  ``os._exit``), publish a failed outcome for the attempt so the coordinator
  knows at once ("worker process died: signal 9");
- kill a horse whose task ignored its timeout ``kill_grace`` seconds after the
  limit (RQ waits 60 s more), and report it as a timeout;
- keep a heartbeat key ``orch:alive:{worker}`` with a short TTL, renewed every
  second by a thread of the parent process, busy or idle (RQ's own worker key
  lives 60 s and more), so the coordinator can tell within seconds that a
  worker died or was cut off, and which queues have a live worker
  (:mod:`shared.workers`).

It reports an attempt's start and outcome without a round trip of its own:
the start goes in the transaction in which RQ's parent process registers the
execution, before it forks; the outcome, which the job function hands over
(:func:`worker.rq_job.holding_outcomes`), in the transaction in which the work
horse files the job as finished or failed. So the coordinator learns of an
outcome exactly when RQ's registries show the job done, and a job costs the
worker no round trip that it does not cost a plain RQ worker (fewer, in fact:
:mod:`worker.rq_bookkeeping`).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Optional

from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from shared.config import Settings, heartbeat_socket_timeout
from shared.jobs import JOB_FUNCTION, JobRefused, check_job_args
from shared.signing import configured_signer
from shared.messages import FAILED, STARTED, Outcome
from shared.states import FailureKind
from shared.allow import worker_allowlist
from shared.workers import RQ, WorkerInfo, beat, retire
from worker import task_log
from worker.rq_allow import CheckedJob
from worker.execute import death_error, timeout_error
from worker.rq_bookkeeping import QuietBookkeeping
from worker.rq_job import holding_outcomes, publish

MONITORING_INTERVAL = 1
"""Seconds between the parent's checks on a running horse (RQ's default is 30)."""


def attempt_of(job: Job) -> Optional[tuple[str, str, int, Optional[float]]]:
    """``(run_id, task, attempt, timeout)`` of an orch job, or ``None`` for any other job.

    Also ``None`` for an orch job whose arguments no coordinator wrote (forged or
    damaged, or with signing on, not signed with this worker's key): its work horse
    fails it, and this parent process must not crash on it nor vouch for it.
    """
    try:
        if job.func_name != JOB_FUNCTION:
            return None
        args = list(job.args) + [None] * 8
    except Exception:  # undecodable job data: RQ fails the job itself
        return None
    run_id, task, attempt, _ref, _payload, timeout = args[:6]
    if not isinstance(run_id, str) or not isinstance(task, str) or isinstance(attempt, bool):
        return None
    try:
        check_job_args(configured_signer(), tuple(args[:7]), args[7])
    except JobRefused:  # its work horse refuses it; nothing to report for it from here
        return None
    try:
        attempt = int(attempt)
        timeout = None if timeout is None else float(timeout)
    except (TypeError, ValueError, OverflowError):
        return None
    if attempt < 1 or (timeout is not None and not timeout > 0):
        return None
    return run_id, task, attempt, timeout


def prepare_horses() -> None:
    """Make, once in the worker's parent process, what every forked work horse would otherwise make
    anew for its one job: the log capture's installation (:func:`worker.task_log.install`: the
    streams and the root logger's handler, set as a lean work process sets them for its life), the
    allowlist and the signer. In a fresh fork, making them cost about 0.8 ms of CPU per job, most of
    it copying the pages they touch (``Logger.setLevel`` writes to every logger); a horse now only
    checks them. The parent's own output and logging pass through unchanged (no capture is open in it).
    """
    task_log.install()
    worker_allowlist()
    configured_signer()


class OrchWorker(QuietBookkeeping, Worker):
    """A forking RQ worker for orch jobs (plain RQ jobs on the same queues still work), without
    RQ's repeated writes of its own state between jobs (:mod:`worker.rq_bookkeeping`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_monitoring_interval", MONITORING_INTERVAL)
        kwargs.setdefault("job_class", CheckedJob)  # nothing imported that the allowlist refuses
        super().__init__(*args, **kwargs)
        settings = Settings()
        self.kill_grace = settings.kill_grace
        self.heartbeat_ttl = settings.heartbeat_ttl
        self._timed_out_job: Optional[str] = None
        self._beating = threading.Event()
        self._start: Optional[Outcome] = None
        self._held: list[Outcome] = []
        self._on_pipeline = 0

    def register_birth(self) -> None:
        super().register_birth()
        prepare_horses()
        info = WorkerInfo(self.name, RQ, tuple(self.queue_names()))
        pool = self.connection.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": heartbeat_socket_timeout(self.heartbeat_ttl)}
        own = type(self.connection)(connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs))
        self._beat(own, info)
        threading.Thread(target=self._heartbeat_loop, args=(own, info), name="orch-heartbeat", daemon=True).start()

    def _beat(self, connection: Any, info: WorkerInfo) -> None:
        pipe = connection.pipeline(transaction=False)
        beat(pipe, info, self.heartbeat_ttl)
        pipe.execute()

    def _heartbeat_loop(self, connection: Any, info: WorkerInfo) -> None:
        """Every second, on its own connection (the work horse forked meanwhile never uses it)."""
        while not self._beating.wait(1.0):
            try:
                self._beat(connection, info)
            except Exception as exc:  # Redis away: the next beat tries again
                self.log.warning("orch heartbeat failed: %s", exc)

    def register_death(self) -> None:
        self._beating.set()
        try:
            pipe = self.connection.pipeline(transaction=False)
            retire(pipe, self.name)
            pipe.execute()
        finally:
            super().register_death()

    def prepare_execution(self, job: Job) -> Any:
        """Before the fork: report the attempt started, in RQ's own transaction (see :meth:`set_state`).

        Reporting from here, not from the work horse, narrows the window in
        which a dying worker could hold an attempt nobody knows it started.
        """
        found = attempt_of(job)
        if found is not None:
            run_id, task, attempt, _ = found
            self._start = Outcome(run_id=run_id, task=task, attempt=attempt, status=STARTED, at=time.time(),
                                  worker=self.name)
        try:
            execution = super().prepare_execution(job)
            if self._start is not None:  # RQ's transaction did not carry it: send it on its own
                publish(self.connection, self._start)
        finally:
            self._start = None
        return execution

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's ``prepare_execution`` marks the worker busy on the pipeline that registers the
        execution: the start report of :meth:`prepare_execution` joins it."""
        super().set_state(state, pipeline=pipeline)
        if self._start is not None and pipeline is not None and state == WorkerStatus.BUSY:
            publish(pipeline, self._start)
            self._start = None

    def perform_job(self, job: Job, queue: Any) -> bool:
        """In the work horse: run the job, its outcome sent with RQ's finishing transaction.

        Whatever outcome no finishing transaction carried (RQ took another path) is sent
        on its own before the horse exits, so none is lost.
        """
        with holding_outcomes() as self._held:
            try:
                return super().perform_job(job, queue)
            finally:
                while self._held:
                    publish(self.connection, self._held.pop(0))

    def cleanup_execution(self, job: Job, pipeline: Any) -> None:
        """RQ calls this on the pipeline that files the job finished or failed: the held outcomes join it."""
        super().cleanup_execution(job, pipeline)
        for outcome in self._held:
            publish(pipeline, outcome)
        self._on_pipeline = len(self._held)

    def handle_job_success(self, job: Job, queue: Any, started_job_registry: Any) -> None:
        self._on_pipeline = 0
        super().handle_job_success(job, queue, started_job_registry)
        del self._held[:self._on_pipeline]  # sent: RQ returns only once its transaction went through

    def handle_job_failure(self, job: Job, queue: Any, started_job_registry: Any = None, exc_string: str = "") -> None:
        self._on_pipeline = 0
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)
        del self._held[:self._on_pipeline]  # sent with RQ's transaction, which it gives up only when Redis is gone

    def maintain_heartbeats(self, job: Job) -> None:
        super().maintain_heartbeats(job)
        found = attempt_of(job)
        timeout = found[3] if found else None
        if timeout and self.current_job_working_time > timeout + self.kill_grace and self.horse_pid:
            self.log.warning("job %s ignored its %ss timeout; killing its work horse", job.id, timeout)
            self._timed_out_job = job.id
            self.kill_horse(signal.SIGKILL)

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        found = attempt_of(job)
        if found is None:
            return
        run_id, task, attempt, timeout = found
        if self._timed_out_job == job.id:
            self._timed_out_job = None
            kind = FailureKind.TIMEOUT
            assert timeout is not None  # only a job with a timeout times out
            error = timeout_error(timeout)
        else:
            kind = FailureKind.CRASHED
            error = death_error(None if ret_val is None else os.waitstatus_to_exitcode(ret_val))
        publish(self.connection, Outcome(run_id=run_id, task=task, attempt=attempt, status=FAILED, at=time.time(),
                                         error=error, kind=kind, worker=self.name))


def serve(
    connection: Any,
    queues: list[str],
    *,
    concurrency: int = 1,
    burst: bool = False,
    name: Optional[str] = None,
    logging_level: str = "INFO",
) -> None:
    """Serve ``queues`` until stopped (or, with ``burst``, until they are empty).

    ``concurrency`` > 1 runs that many worker processes under RQ's
    ``WorkerPool``, which restarts any that die.
    """
    if concurrency > 1:
        from rq.worker_pool import WorkerPool

        pool = WorkerPool(queues, connection=connection, num_workers=concurrency, worker_class=OrchWorker,
                          serializer=JSONSerializer)
        pool.start(burst=burst, logging_level=logging_level)
        return
    worker = OrchWorker(queues, connection=connection, name=name)
    worker.work(burst=burst, logging_level=logging_level)
