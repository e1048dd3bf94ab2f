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
- keep a heartbeat key ``orch:alive:{worker}`` with a short TTL renewed every
  second while a job runs (RQ's own worker key lives 60 s and more), so the
  coordinator can tell within seconds that a worker died or was cut off.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import keys
from shared.config import Settings
from shared.messages import FAILED, STARTED, Outcome
from shared.states import FailureKind
from worker.execute import death_error, timeout_error
from worker.rq_job import START_REPORTED_BY_WORKER, publish

JOB_FUNCTION = "worker.rq_job.run_task"
MONITORING_INTERVAL = 1
"""Seconds between the parent's checks on a running horse (RQ's default is 30)."""


def attempt_of(job: Job) -> Optional[tuple[str, str, int, Optional[float]]]:
    """``(run_id, task, attempt, timeout)`` of an orch job, or ``None`` for any other job.

    Also ``None`` for an orch job whose arguments no coordinator wrote (forged or
    damaged): its work horse fails it, and this parent process must not crash on it.
    """
    try:
        if job.func_name != JOB_FUNCTION:
            return None
        args = list(job.args) + [None] * 6
    except Exception:  # undecodable job data: RQ fails the job itself
        return None
    run_id, task, attempt, _ref, _payload, timeout = args[:6]
    if not isinstance(run_id, str) or not isinstance(task, str) or isinstance(attempt, bool):
        return None
    try:
        attempt = int(attempt)
        timeout = None if timeout is None else float(timeout)
    except (TypeError, ValueError, OverflowError):
        return None
    if attempt < 1 or (timeout is not None and not timeout > 0):
        return None
    return run_id, task, attempt, timeout


class OrchWorker(Worker):
    """A forking RQ worker for orch jobs (plain RQ jobs on the same queues still work)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("job_monitoring_interval", MONITORING_INTERVAL)
        super().__init__(*args, **kwargs)
        os.environ[START_REPORTED_BY_WORKER] = "1"
        settings = Settings()
        self.kill_grace = settings.kill_grace
        self.heartbeat_ttl_ms = int(settings.heartbeat_ttl * 1000)
        self._timed_out_job: Optional[str] = None

    def heartbeat(self, timeout: Optional[int] = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline=pipeline)
        target = pipeline if pipeline is not None else self.connection
        target.set(keys.alive(self.name), "1", px=self.heartbeat_ttl_ms)

    def prepare_execution(self, job: Job) -> Any:
        """Before the fork: renew the heartbeat and report the attempt started, in one round trip.

        Reporting from here, not from the work horse, narrows the window in
        which a dying worker could hold an attempt nobody knows it started.
        """
        pipe = self.connection.pipeline(transaction=False)
        pipe.set(keys.alive(self.name), "1", px=self.heartbeat_ttl_ms)
        found = attempt_of(job)
        if found is not None:
            run_id, task, attempt, _ = found
            pipe.xadd(keys.events(run_id), Outcome(run_id=run_id, task=task, attempt=attempt, status=STARTED,
                                                   at=time.time(), worker=self.name).to_fields())
        pipe.execute()
        return super().prepare_execution(job)

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
