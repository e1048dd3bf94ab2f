"""How ``orch worker`` (RQ mode) reports attempts, on a real redis-server.

The start goes out in the transaction in which RQ registers the execution, the
outcome in the transaction in which the work horse files the job finished or
failed (``worker.rq_worker``). These tests pin what that must keep: one start
and one outcome per attempt, the start first; RQ's own records already final
when the outcome is seen; a dead work horse still reported as a crash; and no
report lost when RQ finishes a job down a path that carries none.
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable

import pytest
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from orchestrator.run_store import open_event_stream
from shared import codec, keys
from shared.connection import connect
from shared.jobs import JOB_FUNCTION
from shared.messages import FAILED, STARTED, SUCCEEDED, Outcome
from shared.states import FailureKind
from worker import rq_job
from worker.rq_worker import OrchWorker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RUN = "run-reports"
QUEUE = "reports"


def _enqueue(client: Any, jobs: dict[str, tuple[str, tuple]]) -> Queue:
    """Enqueue one orch job per task, ``{task: (ref, args)}``, as the coordinator does (the run's
    stream opened first: workers report only to it)."""
    if not client.exists(keys.events(RUN)):
        open_event_stream(client, RUN)
    queue = Queue(QUEUE, connection=client, serializer=JSONSerializer)
    queue.enqueue_many([
        Queue.prepare_data(JOB_FUNCTION, args=(RUN, task, 1, ref, codec.encode([list(args), {}]).decode(), None, None),
                           job_id=_job_id(task), result_ttl=60, timeout=60)
        for task, (ref, args) in jobs.items()])
    return queue


def _job_id(task: str) -> str:
    return f"orch-{RUN}-{task}-1"


def _reports(client: Any) -> dict[str, list[Outcome]]:
    """The run's stream, in order, by task."""
    by_task: dict[str, list[Outcome]] = {}
    for _id, fields in client.xrange(keys.events(RUN)):
        outcome = Outcome.from_fields(fields)
        by_task.setdefault(outcome.task, []).append(outcome)
    return by_task


def test_each_attempt_reports_its_start_then_its_outcome_once(redis_server: Any, orch_workers: Callable) -> None:
    client = redis_server.client()
    _enqueue(client, {"adds": ("dist_tasks:add", (2, 3)), "fails": ("dist_tasks:always_fail", ("bad row 7",)),
                      "dies": ("dist_tasks:kill_self", ())})
    (worker,) = orch_workers(1, mode="rq", queues=[QUEUE])
    name = Worker.all(connection=client)[0].name

    def finished() -> bool:
        reports = _reports(client)
        return all(len(reports.get(task, [])) >= 2 for task in ("adds", "fails", "dies"))

    _wait(finished, "every attempt to report an outcome")
    reports = _reports(client)
    assert {task: [r.status for r in rs] for task, rs in reports.items()} == {
        "adds": [STARTED, SUCCEEDED], "fails": [STARTED, FAILED], "dies": [STARTED, FAILED]}
    assert all(r.worker == name and r.attempt == 1 for rs in reports.values() for r in rs)
    assert codec.decode(reports["adds"][1].result) == 5
    assert reports["fails"][1].error == "ValueError: bad row 7 (attempt 1)"
    assert reports["fails"][1].kind is FailureKind.ERROR and "Traceback" in reports["fails"][1].traceback
    assert reports["dies"][1].kind is FailureKind.CRASHED
    assert reports["dies"][1].error == "WorkerCrash: worker process died: signal 9 (SIGKILL)"
    assert worker.alive()


def test_an_outcome_is_seen_only_once_rq_filed_the_job(redis_server: Any, orch_workers: Callable) -> None:
    """The outcome is in RQ's finishing transaction: whoever reads it finds RQ's records final."""
    client = redis_server.client()
    queue = _enqueue(client, {"adds": ("dist_tasks:add", (2, 3)), "fails": ("dist_tasks:always_fail", ())})
    orch_workers(1, mode="rq", queues=[QUEUE])
    last = "0-0"
    seen: dict[str, tuple[str, Any]] = {}
    while len(seen) < 2:
        for _stream, entries in client.xread({keys.events(RUN): last}, block=30_000) or []:
            for last, fields in entries:
                outcome = Outcome.from_fields(fields)
                if outcome.status != STARTED:
                    job = Job.fetch(_job_id(outcome.task), connection=client, serializer=JSONSerializer)
                    seen[outcome.task] = (outcome.status, job.get_status())
    assert seen == {"adds": (SUCCEEDED, JobStatus.FINISHED), "fails": (FAILED, JobStatus.FAILED)}
    assert _job_id("fails") in queue.failed_job_registry.get_job_ids()
    assert _job_id("adds") in queue.finished_job_registry.get_job_ids()


@pytest.mark.parametrize("rq_path", ["RQ's own transactions", "a path that carries no report"])
def test_no_report_is_lost_whichever_path_rq_takes(redis_server: Any, monkeypatch: pytest.MonkeyPatch,
                                                    rq_path: str) -> None:
    """In this process (no fork): the parent's and the work horse's halves of one job, one after the other."""
    if rq_path != "RQ's own transactions":  # as if RQ set no state and cleaned up no execution on a pipeline
        monkeypatch.setattr(OrchWorker, "set_state", Worker.set_state)
        monkeypatch.setattr(OrchWorker, "cleanup_execution", Worker.cleanup_execution)
    client = connect(redis_server.url)
    queue = _enqueue(client, {"adds": ("dist_tasks:add", (2, 3)), "fails": ("dist_tasks:always_fail", ())})
    worker = OrchWorker([queue], connection=client)
    for task in ("adds", "fails"):
        job = Job.fetch(_job_id(task), connection=client, serializer=JSONSerializer)
        worker.prepare_execution(job)
        worker.perform_job(job, queue)
    assert {task: [r.status for r in rs] for task, rs in _reports(client).items()} == {
        "adds": [STARTED, SUCCEEDED], "fails": [STARTED, FAILED]}
    assert rq_job._held is None  # run_task in this process reports on its own again


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def test_between_jobs_rq_shows_the_worker_as_it_would_without_the_left_out_writes(
        redis_server: Any, orch_workers: Callable) -> None:
    """``worker.rq_bookkeeping`` leaves out repeated writes: RQ still sees an idle worker on its
    queue, counting its jobs, whose key lives RQ's worker TTL (not the shorter one set during a job)."""
    client = redis_server.client()
    _enqueue(client, {f"t{i}": ("dist_tasks:add", (i, 1)) for i in range(5)})
    orch_workers(1, mode="rq", queues=[QUEUE])
    (rq_worker,) = Worker.all(connection=client)

    def settled() -> bool:
        rq_worker.refresh()
        return rq_worker.successful_job_count == 5 and rq_worker.get_state() == "idle"

    _wait(settled, "the worker to run the 5 jobs and go idle")
    assert client.ttl(rq_worker.key) > 61 + 5
    shown = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", redis_server.url],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert f"{QUEUE}      | 0, 0 executing, 5 finished, 0 failed" in shown.stdout, shown.stdout
    assert f"): idle {QUEUE}. jobs: 5 finished, 0 failed" in shown.stdout, shown.stdout
    assert rq_worker.name in shown.stdout, shown.stdout


def test_a_connections_retry_is_copied_shallowly_and_the_copies_stay_apart() -> None:
    """redis-py deep-copies a client's Retry for each connection (one per job in a work horse): ours copies
    without a deep walk, and a copy changed does not change the original."""
    import copy

    retry = connect("redis://127.0.0.1:1/0", check=False).connection_pool.connection_kwargs["retry"]
    copied = copy.deepcopy(retry)
    assert copied is not retry and copied == retry and copied.get_retries() == 8
    copied.update_retries(1)
    assert retry.get_retries() == 8


def test_a_worker_parent_prepared_for_its_horses_prints_and_logs_as_before() -> None:
    """prepare_horses() installs the log capture in the RQ worker's parent (each forked horse then only
    opens its attempt's log): the parent's own output and log records still reach its streams."""
    code = ("import logging, sys\n"
            "from worker.rq_worker import prepare_horses\n"
            "from worker import task_log\n"
            "logging.basicConfig(level='INFO', format='%(levelname)s %(message)s')\n"
            "prepare_horses()\n"
            "assert task_log._installed is not None\n"
            "print('parent prints', flush=True)\n"
            "logging.getLogger('orch.worker').info('parent logs')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "parent prints\n"
    assert "INFO parent logs" in done.stderr
