"""The lean worker's work processes take and report their own jobs: what happens when one dies.

Real ``redis-server``, real ``orch worker --mode lean`` processes, an in-process
coordinator (``Background``). Each work process has its own in-flight list,
``orch:inflight:{worker}#{n}``; these tests kill work processes (or whole
workers) while jobs sit in those lists and check that nothing is lost:

- a work process SIGKILLed while it runs an attempt: its parent reports a
  ``WorkerCrash`` at once, the attempt is retried, the worker keeps serving;
- a work process stopped (SIGSTOP) right after a job landed in its list and
  before it reported the start, then killed: its parent puts the job back on
  the queue and it runs (once); the same with the whole worker killed: the
  coordinator fails the attempt as ``WorkerLost`` from the slot's list;
- a whole worker SIGKILLed with attempts in several slots' lists: every one is
  failed as ``WorkerLost`` within ``ORCH_HEARTBEAT_TTL`` + 2 s, the run
  completes on another worker;
- warm and cold shutdown.

The pure parts (what the parent makes of an entry left by a dead work process,
the shared record) are tested first, without Redis.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # workers import fault_tasks by that name; so must this process
    sys.path.insert(0, str(TESTS_DIR))

import fault_tasks  # noqa: E402
from fault_helpers import (FAST_ENV, Background, Processes, counters, descendants, pid_alive,  # noqa: E402
                           wait_for)
from fault_helpers import procs  # noqa: E402,F401  (a fixture)
from orchestrator import Task, Workflow  # noqa: E402
from orchestrator.run_store import open_event_stream  # noqa: E402
from shared import keys  # noqa: E402
from shared.jobs import job_message  # noqa: E402
from shared.states import FailureKind  # noqa: E402
from worker.settle import COLD, Death, Reason, verdict  # noqa: E402
from worker.slot_record import SlotRecord, Snapshot, State, attempt_id  # noqa: E402

TTL = float(FAST_ENV["ORCH_HEARTBEAT_TTL"])
ENTRY = job_message("run-1", "t", 2, "fault_tasks:echo", "[[1],{}]", None, None).encode()
OTHER = job_message("run-1", "u", 1, "fault_tasks:echo", "[[1],{}]", None, None).encode()


# ============================================================== the pure parts
def holding(entry: bytes, queue: int = 0, unreported: bool = False) -> Snapshot:
    run_id, task, attempt = json.loads(entry)[:3]
    return Snapshot(State.RUNNING, queue, attempt_id(run_id, task, attempt), 100.0, math.inf, 5.0, unreported)


def judge(entry: bytes, snapshot: Any, reason: Any = None, queues: int = 1, claimed: int = 0) -> Any:
    return verdict(entry, Death(-9, reason, snapshot, claimed), queues, "w")


def test_the_attempt_in_hand_of_a_crashed_work_process_fails_as_a_crash() -> None:
    judged = judge(ENTRY, holding(ENTRY))
    outcome = judged.outcome
    assert judged.action == "report" and judged.start is None
    assert (outcome.run_id, outcome.task, outcome.attempt, outcome.status) == ("run-1", "t", 2, "failed")
    assert outcome.error == "WorkerCrash: worker process died: signal 9 (SIGKILL)"
    assert outcome.kind is FailureKind.CRASHED and outcome.started_at == 100.0 and outcome.worker == "w"


def test_an_attempt_whose_start_was_not_reported_gets_its_start_reported_before_its_failure() -> None:
    snapshot = holding(ENTRY, unreported=True)
    start = judge(ENTRY, snapshot).start
    assert (start.status, start.task, start.attempt, start.at, start.worker) == ("started", "t", 2, 100.0, "w")
    assert judge(ENTRY, snapshot, claimed=snapshot.attempt).start is None  # the parent reported it already


def test_a_timeout_or_a_stop_is_reported_as_such_only_for_the_attempt_it_was_meant_for() -> None:
    snapshot = holding(ENTRY)
    timed_out = judge(ENTRY, snapshot, Reason(FailureKind.TIMEOUT, snapshot.attempt)).outcome
    assert timed_out.kind is FailureKind.TIMEOUT
    assert timed_out.error == "TaskTimeout: attempt ran past its timeout of 5s and was killed"
    stopped = judge(ENTRY, snapshot, Reason(FailureKind.CANCELLED, snapshot.attempt)).outcome
    assert (stopped.kind, stopped.error) == (FailureKind.CANCELLED, "Cancelled: attempt stopped on request")
    # the work process had moved on to another attempt when the kill landed: that one crashed
    other = judge(ENTRY, snapshot, Reason(FailureKind.TIMEOUT, snapshot.attempt + 1)).outcome
    assert other.kind is FailureKind.CRASHED


def test_a_job_taken_but_not_yet_in_hand_goes_back_to_its_queue_when_the_queue_is_known() -> None:
    blocking_on_2 = Snapshot(State.BLOCKING, 2, 0, 0.0, math.inf, 0.0)
    assert (judge(ENTRY, blocking_on_2, queues=3).action, judge(ENTRY, blocking_on_2, queues=3).queue) == \
        ("requeue", 2)
    taking = Snapshot(State.TAKING, -1, 0, 0.0, math.inf, 0.0)
    assert judge(ENTRY, taking).action == "requeue"  # one queue: it came from there
    unknown = judge(ENTRY, taking, queues=3)  # which of three queues? unknown
    assert unknown.action == "report" and unknown.outcome.kind is FailureKind.CRASHED
    assert unknown.outcome.started_at is None and unknown.start is None
    assert judge(ENTRY, holding(OTHER)).action == "requeue"
    assert judge(ENTRY, None).action == "requeue"  # a record torn by the death


def test_a_cold_shutdown_hands_the_job_in_hand_back_to_its_own_queue() -> None:
    judged = judge(ENTRY, holding(ENTRY, queue=1), COLD, queues=2)
    assert (judged.action, judged.queue) == ("requeue", 1)
    assert judge(ENTRY, Snapshot(State.TAKING, -1, 0, 0.0, math.inf, 0.0), COLD, queues=2).action == "report"


def test_unreadable_entries_are_dropped_and_malformed_ones_with_an_attempt_are_failed() -> None:
    assert judge(b"garbage", None).action == "drop"
    malformed = b'["run-1","t",3,"fault_tasks:echo","[[1],{}]",-1,null]'  # a negative timeout
    judged = judge(malformed, holding(malformed))
    assert judged.action == "report" and (judged.outcome.task, judged.outcome.attempt) == ("t", 3)


def test_the_slot_record_reads_back_what_was_written_and_none_when_a_write_was_cut_short() -> None:
    record = SlotRecord()
    assert record.read().state is State.IDLE
    record.set(State.RUNNING, queue=1, attempt=attempt_id("r", "t", 1), started=5.0, deadline=9.0, timeout=4.0)
    assert record.read() == Snapshot(State.RUNNING, 1, attempt_id("r", "t", 1), 5.0, 9.0, 4.0, False)
    record.claim(7)
    assert record.claimed() == 7 and record.read().state is State.RUNNING
    assert record.read().holds(attempt_id("r", "t", 1)) and not record.read().holds(attempt_id("r", "t", 2))
    record._fields.version += 1  # a writer killed between its two version stores
    assert record.read() is None


# ============================================================ real processes
def inflight(worker: Any, slot: int) -> str:
    return keys.inflight(keys.lean_slot(worker.worker_name, slot))


def work_processes(worker: Any, n: int) -> list[int]:
    """The pids of a lean worker's ``n`` work processes (its children; they run nothing else here)."""
    return wait_for(lambda: (lambda pids: pids if len(pids) == n else None)(descendants(worker.pid)), 10,
                    f"{n} work processes")


def frozen_with_a_job(client: redis.Redis, worker: Any, pid: int) -> bytes:
    """With the only work process of ``worker`` stopped (SIGSTOP), wait for the run's one job and make
    sure it sits in that work process's in-flight list: either its ``BLMOVE``, pending when it was
    stopped, took it there, or it waits in the queue and is moved there here, which is the same state
    (a take that happened, a start not reported)."""
    queue, slot_list = keys.lean_queue("default"), inflight(worker, 0)
    wait_for(lambda: client.llen(queue) or client.llen(slot_list), 20, "the job to be queued")
    if client.llen(slot_list) == 0:
        client.lmove(queue, slot_list, "LEFT", "RIGHT")
    entries = client.lrange(slot_list, 0, -1)
    assert len(entries) == 1 and client.llen(queue) == 0, entries
    return entries[0]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_work_process_killed_while_running_an_attempt_is_reported_as_a_crash_at_once(
        procs: Processes, tmp_path: Path) -> None:
    (worker,) = procs.workers(1, mode="lean", concurrency=2)
    url = procs.redis_url
    wf = Workflow("killed-work-process")
    wf.add_task(Task("victim", fault_tasks.slow_first, args=(url, "victim", str(tmp_path), 30, "first", "second"),
                     max_retries=1))
    wf.add_task(Task("after", fault_tasks.value, dependencies=["victim"], args=(url, "after", "done")))
    run = Background(wf, url, transport="lean")

    pid_file = tmp_path / "victim.1.pid"
    wait_for(pid_file.exists, 30, "attempt 1 to start")
    victim = int(pid_file.read_text())
    assert victim in descendants(worker.pid)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    failed = wait_for(lambda: run.progress.first("victim", "retrying", attempt=1), 10 * TTL, "the crash report")
    results = run.join(30)

    assert failed[1].error == "WorkerCrash: worker process died: signal 9 (SIGKILL)", failed[1].error
    # reported by the worker's parent, not noticed later through a heartbeat
    assert failed[0] - killed_at < TTL, failed[0] - killed_at
    assert results == {"victim": "second", "after": "done"}
    assert {task.worker for task in wf} == {worker.worker_name} and worker.alive()
    assert wf.tasks["victim"].attempts == 2
    client = redis.Redis.from_url(url)
    assert counters(client) == {"victim": 2, "after": 1}
    assert all(client.llen(inflight(worker, n)) == 0 for n in range(2))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_work_process_killed_after_taking_a_job_and_before_starting_it_loses_nothing(
        procs: Processes) -> None:
    (worker,) = procs.workers(1, mode="lean")
    url = procs.redis_url
    client = redis.Redis.from_url(url)
    (pid,) = work_processes(worker, 1)
    os.kill(pid, signal.SIGSTOP)
    wf = Workflow("taken-not-started")
    wf.add_task(Task("t", fault_tasks.value, args=(url, "t", "ran")))
    run = Background(wf, url, transport="lean")

    entry = frozen_with_a_job(client, worker, pid)
    time.sleep(0.5)  # whatever the coordinator would see, it has seen by now
    assert run.progress.first("t", "running") is None and counters(client) == {}
    os.kill(pid, signal.SIGKILL)
    results = run.join(30)

    # its parent found the job in the slot's list and put it back on the queue: it ran once, as attempt 1
    assert results == {"t": "ran"}
    assert (wf.tasks["t"].attempts, wf.tasks["t"].worker) == (1, worker.worker_name)
    assert counters(client) == {"t": 1} and worker.alive()
    assert client.llen(inflight(worker, 0)) == 0 and entry not in client.lrange(keys.lean_queue("default"), 0, -1)
    assert pid not in descendants(worker.pid) and len(work_processes(worker, 1)) == 1


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_worker_killed_while_its_work_process_held_a_job_not_yet_started_loses_nothing(
        procs: Processes) -> None:
    (worker,) = procs.workers(1, mode="lean")
    url = procs.redis_url
    client = redis.Redis.from_url(url)
    (pid,) = work_processes(worker, 1)
    os.kill(pid, signal.SIGSTOP)
    wf = Workflow("taken-not-started-worker-lost")
    wf.add_task(Task("t", fault_tasks.value, args=(url, "t", "ran"), max_retries=1))
    run = Background(wf, url, transport="lean")

    frozen_with_a_job(client, worker, pid)
    worker.signal_all(signal.SIGKILL)
    killed_at = time.monotonic()
    (survivor,) = procs.workers(1, mode="lean")
    lost = wait_for(lambda: run.progress.first("t", "retrying", attempt=1), 10 * TTL, "WorkerLost")
    results = run.join(30)

    assert lost[1].error == f"WorkerLost: worker {worker.worker_name} died holding this attempt", lost[1].error
    assert lost[0] - killed_at <= TTL + 2 + 1.0, lost[0] - killed_at
    assert results == {"t": "ran"} and wf.tasks["t"].worker == survivor.worker_name
    assert counters(client) == {"t": 1}
    assert client.llen(inflight(worker, 0)) == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_worker_killed_with_attempts_in_several_slots_has_each_failed_as_lost(
        procs: Processes, tmp_path: Path) -> None:
    (victim,) = procs.workers(1, mode="lean", concurrency=3)
    url = procs.redis_url
    client = redis.Redis.from_url(url)
    names = ["a", "b", "c"]
    wf = Workflow("worker-lost-several-slots")
    for name in names:
        wf.add_task(Task(name, fault_tasks.slow_first, args=(url, name, str(tmp_path), 30, "first", "second"),
                         max_retries=1))
    run = Background(wf, url, transport="lean")
    wait_for(lambda: all((tmp_path / f"{name}.1.pid").exists() for name in names), 30, "three attempts to run")
    held = [client.lrange(inflight(victim, n), 0, -1) for n in range(3)]
    assert all(len(entries) == 1 for entries in held), held  # one attempt in each slot's list
    (survivor,) = procs.workers(1, mode="lean", concurrency=3)

    victim.signal_all(signal.SIGKILL)
    killed_at = time.monotonic()
    lost = [wait_for(lambda name=name: run.progress.first(name, "retrying", attempt=1), 10 * TTL, f"{name} lost")
            for name in names]
    results = run.join(30)

    for at, move in lost:
        assert move.error == f"WorkerLost: worker {victim.worker_name} died holding this attempt", move.error
        assert at - killed_at <= TTL + 2 + 1.0, at - killed_at
    assert results == {name: "second" for name in names}
    assert {wf.tasks[name].worker for name in names} == {survivor.worker_name}
    assert all(client.llen(inflight(victim, n)) == 0 for n in range(3))
    # the dead worker's slots are forgotten by the next check that finds their lists empty (another run's)
    after = Workflow("after-the-loss")
    after.add_task(Task("x", fault_tasks.echo, args=(1,)))
    assert Background(after, url, transport="lean").join(30) == {"x": 1}
    assert not any(keys.slot_worker(m.decode()) == victim.worker_name for m in client.smembers(keys.LEAN_WORKERS))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_warm_shutdown_finishes_the_attempt_in_hand_and_takes_no_other(procs: Processes, tmp_path: Path) -> None:
    (worker,) = procs.workers(1, mode="lean")
    url = procs.redis_url
    client = redis.Redis.from_url(url)
    wf = Workflow("warm-shutdown")
    wf.add_task(Task("first", fault_tasks.slow_first, args=(url, "first", str(tmp_path), 2, "finished", "again")))
    wf.add_task(Task("second", fault_tasks.value, args=(url, "second", "later")))
    run = Background(wf, url, transport="lean")
    wait_for((tmp_path / "first.1.pid").exists, 30, "the first attempt to run")

    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert wait_for(lambda: run.progress.first("first", "success"), 10, "the attempt in hand to finish")
    assert run.progress.first("second", "running") is None
    assert client.llen(keys.lean_queue("default")) == 1  # left for another worker
    assert not client.exists(keys.alive(worker.worker_name))
    assert not any(keys.slot_worker(m.decode()) == worker.worker_name for m in client.smembers(keys.LEAN_WORKERS))

    procs.workers(1, mode="lean")
    assert run.join(30) == {"first": "finished", "second": "later"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cold_shutdown_hands_the_attempt_in_hand_back_to_its_queue(procs: Processes, tmp_path: Path) -> None:
    (worker,) = procs.workers(1, mode="lean")
    url = procs.redis_url
    client = redis.Redis.from_url(url)
    wf = Workflow("cold-shutdown")
    wf.add_task(Task("long", fault_tasks.slow_first_run, args=(url, "long", str(tmp_path), 30, "first", "again")))
    run = Background(wf, url, transport="lean")
    wait_for((tmp_path / "long.pid").exists, 30, "the attempt to run")
    task_process = int((tmp_path / "long.pid").read_text())
    (survivor,) = procs.workers(1, mode="lean")  # idle: the only job is in the first worker's hands

    worker.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.process.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 1
    assert not pid_alive(task_process)
    results = run.join(30)

    # handed back as it was (not failed): the same attempt ran again, on the other worker (the task's
    # record keeps the worker of the attempt's first start: the coordinator takes one start per attempt)
    assert results == {"long": "again"}
    assert wf.tasks["long"].attempts == 1 and survivor.alive()
    assert counters(client) == {"long": 2}
    assert client.llen(inflight(worker, 0)) == 0
    assert not any(keys.slot_worker(m.decode()) == worker.worker_name for m in client.smembers(keys.LEAN_WORKERS))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_starts_are_reported_while_an_attempt_runs_and_with_the_outcome_of_a_short_one(
        procs: Processes, tmp_path: Path) -> None:
    (worker,) = procs.workers(1, mode="lean")  # idle: each job is taken blocking, its start not reported
    url = procs.redis_url
    wf = Workflow("start-reports")
    wf.add_task(Task("long", fault_tasks.slow_first, args=(url, "long", str(tmp_path), 2, "done", "again")))
    wf.add_task(Task("short", fault_tasks.value, dependencies=["long"], args=(url, "short", "quick")))
    run = Background(wf, url, transport="lean")
    results = run.join(30)

    assert results == {"long": "done", "short": "quick"}
    for name in ("long", "short"):
        moves = [move.finish.value for _, move in run.progress.of(name)]
        assert moves == ["queued", "running", "success"], (name, moves)
    # the long attempt's start was reported by the worker's parent while it ran, not with its end
    running, success = run.progress.first("long", "running"), run.progress.first("long", "success")
    assert success[0] - running[0] > 1.0, success[0] - running[0]
    assert wf.tasks["long"].worker == wf.tasks["short"].worker == worker.worker_name


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_work_processes_take_no_job_while_their_parent_cannot_heartbeat(procs: Processes) -> None:
    (worker,) = procs.workers(1, mode="lean", concurrency=2)
    client = redis.Redis.from_url(procs.redis_url)
    work_processes(worker, 2)
    os.kill(worker.pid, signal.SIGSTOP)  # the parent only: its work processes run on
    try:
        wait_for(lambda: not client.exists(keys.alive(worker.worker_name)), 5 * TTL, "the heartbeat to lapse")
        # the coordinator now counts this worker lost: a job it took would be failed and run twice
        open_event_stream(client, "stalled")  # as its coordinator would: workers report only to it
        client.rpush(keys.lean_queue("default"), job_message("stalled", "t", 1, "fault_tasks:echo", "[[5],{}]",
                                                             None, None))
        time.sleep(1.5)
        assert client.llen(keys.lean_queue("default")) == 1
        assert all(client.llen(inflight(worker, n)) == 0 for n in range(2))
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # beating again: the job is taken and run
    wait_for(lambda: client.xlen(keys.events("stalled")) >= 1, 10, "the job to run")
    statuses = [(fields[b"status"], fields.get(b"start")) for _, fields in client.xrange(keys.events("stalled"))]
    assert statuses == [(b"succeeded", b"1")], statuses  # its start reported with its outcome
