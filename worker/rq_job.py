"""The RQ job function: runs one attempt of one task inside RQ's work horse.

The coordinator enqueues ``worker.rq_job.run_task`` with plain string and
number arguments (RQ stores them with its JSON serializer, so no worker ever
unpickles data from Redis). The attempt's outcome goes to the run's event
stream, where the coordinator reads it; RQ's own bookkeeping (registries,
``rq info``) follows from whether this function returns or raises.

Under any RQ worker this function reports the attempt's start and outcome
itself. In the work horse of an :class:`~worker.rq_worker.OrchWorker` it does
neither: that worker's parent reports the start before forking, and the
outcome is handed over (:func:`holding_outcomes`) for the worker to send inside
RQ's own transaction that finishes the job, so an attempt costs no round trip
that RQ does not already make.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Iterator, Optional

import redis
from rq import get_current_job

from shared import codec, keys, upstream
from shared.config import max_result_bytes
from shared.context import TaskContext, running
from shared.errors import TaskTimeout, WorkflowError
from shared.jobs import JobRefused, check_job_args
from shared.messages import FAILED, STARTED, Outcome
from shared.params import ParamsCache
from shared.signing import configured_signer
from shared.allow import worker_allowlist
from shared.refs import import_reference
from worker import task_log
from worker.execute import describe_exception, exception_types, run_attempt


_held: Optional[list[Outcome]] = None
"""Where :func:`run_task` leaves its outcome instead of sending it; ``None`` outside
:func:`holding_outcomes`."""


_PARAMS = ParamsCache()
"""The parameters of the runs this process ran tasks of, read once per run (persistent lean work processes
keep them across jobs)."""


class TaskFailedOnWorker(WorkflowError):
    """Raised after reporting a failed attempt, so that RQ files the job as failed too."""


def publish(connection: Any, outcome: Outcome) -> None:
    """Append ``outcome`` to its run's event stream, signed with this worker's key if it has one:
    one XADD, sent now (a client) or queued (a pipeline). Only to a stream that exists (the
    coordinator opens it with the run): a forged job naming a made-up run leaves nothing behind."""
    connection.xadd(keys.events(outcome.run_id), outcome.to_fields(configured_signer()), nomkstream=True)


@contextlib.contextmanager
def holding_outcomes() -> Iterator[list[Outcome]]:
    """While in this block, :func:`run_task` in this process neither reports the start (the
    caller's worker did, before forking) nor sends the outcome: it appends the outcome to the
    list yielded, and the caller must send every outcome it finds there."""
    global _held
    held: list[Outcome] = []
    _held = held
    try:
        yield held
    finally:
        _held = None


def run_task(
    run_id: str,
    task: str,
    attempt: int,
    ref: str,
    payload: str,
    timeout: Optional[float] = None,
    max_result_bytes: Optional[int] = None,
    signature: Optional[str] = None,
) -> None:
    """Run attempt ``attempt`` of ``task`` (function ``ref``, arguments in ``payload``) and report it
    (or, within :func:`holding_outcomes`, hold its outcome for the worker to send).

    With signing on, a job whose ``signature`` is missing or wrong is refused (a ``TaskRefused``
    failure) before anything is imported or decoded."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("run_task runs inside an RQ job only (no current job)")
    connection = job.connection
    worker = job.worker_name
    if not (isinstance(run_id, str) and isinstance(task, str) and type(attempt) is int and attempt >= 1):
        raise TaskFailedOnWorker("not a job of orch: run id and task must be strings, attempt a positive integer")
    held = _held
    try:
        check_job_args(configured_signer(), (run_id, task, attempt, ref, payload, timeout, max_result_bytes),
                       signature)
    except JobRefused as exc:
        outcome = Outcome(run_id=run_id, task=task, attempt=attempt, status=FAILED, at=time.time(),
                          error=f"TaskRefused: {exc}", worker=worker)
    else:
        if held is None:
            publish(connection, Outcome(run_id=run_id, task=task, attempt=attempt, status=STARTED, at=time.time(),
                                        worker=worker))
        outcome = attempt_outcome(connection, run_id, task, attempt, ref, payload, timeout, max_result_bytes,
                                  worker)
    if held is None:
        publish(connection, outcome)
    else:
        held.append(outcome)
    if outcome.status == FAILED:
        raise TaskFailedOnWorker(f"task {task!r} attempt {attempt}: {outcome.error}")


def attempt_outcome(connection: redis.Redis, run_id: str, task: str, attempt: int, ref: str, payload: str,
                    timeout: Optional[float], max_result_bytes: Optional[int], worker: Optional[str],
                    kill_at: Optional[float] = None) -> Outcome:
    """Import the task, decode its arguments, run it (with ``timeout`` raised in-process, if given)
    and return the outcome, its log captured into Redis meanwhile (:mod:`worker.task_log`; all of
    it sent before this returns). ``kill_at``: a monotonic time at which something outside may kill
    this process (the log is flushed just before). Shared by the RQ job function and the lean
    worker's work processes."""
    with task_log.capturing(task_log.redis_sink(connection, run_id, task, attempt), flush_before=kill_at):
        return _run(connection, run_id, task, attempt, ref, payload, timeout, max_result_bytes, worker)


def _run(connection: redis.Redis, run_id: str, task: str, attempt: int, ref: str, payload: str,
         timeout: Optional[float], max_result_bytes: Optional[int], worker: Optional[str]) -> Outcome:
    started = time.time()
    try:
        worker_allowlist().check(ref, worker or "?")  # before anything is imported
        func = import_reference(ref)
        args, kwargs = codec.decode(payload)
    except (WorkflowError, ValueError, TypeError) as exc:
        error = describe_exception(exc)
        task_log.note(error)
        return Outcome(run_id=run_id, task=task, attempt=attempt, status=FAILED, at=time.time(),
                       error=error, worker=worker, started_at=started, types=exception_types(exc))

    def fetch_result(name: str) -> Any:
        blob = connection.hget(keys.results(run_id), name)
        return None if blob is None else codec.decode(blob)

    def fetch_params() -> dict[str, Any]:
        return _PARAMS.get(connection, run_id)

    context = TaskContext(run_id=run_id, task=task, attempt=attempt, fetch_result=fetch_result,
                          fetch_params=fetch_params)
    with running(context), _time_limit(timeout):
        return run_attempt(func, args, kwargs, run_id=run_id, task=task, attempt=attempt, worker=worker,
                           max_result_bytes=result_limit(max_result_bytes), timeout_errors=(TaskTimeout,),
                           upstream_result=fetch_result if upstream.MARK in payload else None)


def result_limit(requested: Any) -> int:
    """The largest result this attempt may return: the smaller of the coordinator's limit (sent
    with the job) and this worker's own ``ORCH_MAX_RESULT_BYTES``."""
    own = max_result_bytes()
    try:
        return own if requested is None else min(own, int(requested))
    except (TypeError, ValueError):
        return own


class _time_limit:
    """Raise :class:`TaskTimeout` in this (main) thread after ``seconds``, with sub-second precision.

    RQ's own limit (``signal.alarm``) counts whole seconds; this replaces it for
    the attempt. A task that swallows the exception is killed by the worker's
    parent process shortly after (see :mod:`worker.rq_worker`).
    """

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds if threading.current_thread() is threading.main_thread() else None

    def _expired(self, signum: int, frame: Any) -> None:
        raise TaskTimeout(f"attempt ran past its timeout of {self.seconds:g}s")

    def __enter__(self) -> None:
        if self.seconds:
            self._previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: Any) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
