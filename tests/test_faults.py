"""Fault injection with real processes and a real ``redis-server``: the README's "Reliability" section.

Every test starts real ``orch worker`` processes (the default lean worker and,
where it applies, ``orch worker --mode rq`` too; submissions pick each queue's
job form by themselves), real ``orch submit`` / ``orch coordinator`` / ``orch
resume`` / ``orch cancel`` processes or an in-process coordinator, and then
kills, stops or starves them. Executions are counted with Redis ``INCR`` by the
tasks themselves (``tests/fault_tasks.py``), so "not run again" and "committed
exactly once" are checked, not assumed.

Heartbeat and lease TTLs are 2 s here (``ORCH_HEARTBEAT_TTL`` / ``ORCH_LEASE_TTL``
in the environment of every process started and of this one), except in the
test that checks detection with the default 10 s. The figures the README
quotes (worker-loss detection, coordinator takeover, Redis-restart recovery)
are printed by the tests that measure them (``-s`` shows them).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue
from rq.serializers import JSONSerializer

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # workers import fault_tasks by that name; so must this process
    sys.path.insert(0, str(TESTS_DIR))

import fault_tasks  # noqa: E402
from fault_helpers import (AofRedis, Background, Processes, closed_port, counters,  # noqa: E402
                           fast_processes, pid_alive, results_hash, run_id_from, run_meta, task_records, wait_for)
from fault_helpers import procs  # noqa: E402,F401  (a fixture)
from orchestrator import Task, Workflow  # noqa: E402
from orchestrator.distributed import RunBusyError, resume_run  # noqa: E402
from shared import keys  # noqa: E402
from shared.states import TaskState  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODES = ["rq", "lean"]
FIGURES: dict[str, float] = {}


def figure(name: str, seconds: float) -> None:
    """Record a measured figure (printed by the test, and again after the module with -s)."""
    FIGURES[name] = seconds
    print(f"[figure] {name}: {seconds:.2f} s")


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    yield
    if FIGURES:
        print("\nfault-tolerance figures measured by tests/test_faults.py:")
        for name, seconds in FIGURES.items():
            print(f"  {name}: {seconds:.2f} s")


def client_of(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


# =============================================================================
# 1. A work horse dies: os._exit, segfault, SIGKILL
# =============================================================================
@pytest.mark.parametrize("mode", MODES)
def test_work_horse_death_fails_the_attempt_at_once_and_it_is_retried(procs: Processes, mode: str) -> None:
    (worker,) = procs.workers(1, mode=mode)
    url = procs.redis_url
    wf = Workflow(f"horse-death-{mode}")
    for how in ("exit", "segv", "kill"):
        wf.add_task(Task(how, fault_tasks.crash_first, args=(url, how, how), max_retries=1))
    wf.add_task(Task("next", fault_tasks.value, dependencies=["exit", "segv", "kill"], args=(url, "next", 42)))

    run = Background(wf, url)
    results = run.join(60)

    assert results == {"exit": "ok 2", "segv": "ok 2", "kill": "ok 2", "next": 42}
    expected = {"exit": "exit code 3", "segv": "signal 11 (SIGSEGV)", "kill": "signal 9 (SIGKILL)"}
    for how, detail in expected.items():
        failed = run.progress.first(how, "retrying", attempt=1)
        assert failed is not None, run.progress.of(how)
        error = failed[1].error
        assert error == f"WorkerCrash: worker process died: {detail}", error
        # "at once": the failure is seen within about a second of the attempt's start
        started = run.progress.first(how, "running", attempt=1)
        assert started is not None
        assert failed[0] - started[0] < 2.5, (how, failed[0] - started[0])
        task = wf.tasks[how]
        assert (task.state, task.attempts, task.error) == (TaskState.SUCCESS, 2, None)
    # the same worker served every attempt and the task after them, and is still up
    assert {task.worker for task in wf} == {worker.worker_name}
    assert worker.alive()
    assert counters(client_of(url)) == {"exit": 2, "segv": 2, "kill": 2, "next": 1}
    assert task_records(client_of(url), wf.last_run_id)["kill"]["attempt"] == 2


def test_task_ignoring_its_timeout_is_killed_after_the_grace_and_the_worker_survives(procs: Processes) -> None:
    # The RQ-compatible worker's own rule: the task gets TaskTimeout at the limit, and the parent
    # kills the horse ORCH_KILL_GRACE later (the default worker kills at the limit: test_distributed_real).
    (worker,) = procs.workers(1, mode="rq", env={"ORCH_KILL_GRACE": "1"})
    url = procs.redis_url
    wf = Workflow("stubborn")
    wf.add_task(Task("stubborn", fault_tasks.swallow_timeout, args=(60,), timeout=1))
    wf.add_task(Task("next", fault_tasks.value, args=(url, "next", "served")))

    started = time.monotonic()
    run = Background(wf, url)
    results = run.join(40)

    stubborn = wf.tasks["stubborn"]
    assert results == {"next": "served"}
    assert stubborn.state is TaskState.FAILURE and stubborn.attempts == 1
    assert stubborn.error == "TaskTimeout: attempt ran past its timeout of 1s and was killed", stubborn.error
    # killed by the worker's parent after timeout (1 s) + ORCH_KILL_GRACE (1 s), checked every second
    running = run.progress.first("stubborn", "running")
    failed = run.progress.first("stubborn", "failure")
    assert running and failed
    assert 2.0 <= failed[0] - running[0] <= 4.5, failed[0] - running[0]
    assert time.monotonic() - started < 20
    assert worker.alive() and wf.tasks["next"].worker == worker.worker_name


# =============================================================================
# 2. A whole worker dies (SIGKILL of its process group, its work horse / work processes too)
# =============================================================================
def _kill_the_worker_running(run: Background, workers: list, task: str) -> tuple[Any, Any, float]:
    """Wait until ``task`` runs, SIGKILL its worker's whole family; return (victim, survivor, kill time)."""
    wf = run.workflow
    wait_for(lambda: wf.tasks[task].state is TaskState.RUNNING and wf.tasks[task].worker, 30,
             f"{task} to run")
    by_name = {w.worker_name: w for w in workers}
    victim = by_name[wf.tasks[task].worker]
    survivor = next(w for w in workers if w is not victim)
    time.sleep(0.3)  # let the attempt settle into its sleep
    victim.signal_all(signal.SIGKILL)
    killed_at = time.monotonic()
    return victim, survivor, killed_at


@pytest.mark.parametrize("mode", MODES)
def test_dead_worker_is_detected_and_its_attempt_retried_on_another(procs: Processes, mode: str,
                                                                    tmp_path: Path) -> None:
    workers = procs.workers(2, mode=mode)
    url = procs.redis_url
    wf = Workflow(f"worker-death-{mode}")
    wf.add_task(Task("long", fault_tasks.slow_first, args=(url, "long", str(tmp_path), 20, "first", "second"),
                     max_retries=1))
    wf.add_task(Task("after", fault_tasks.value, dependencies=["long"], args=(url, "after", "done")))

    run = Background(wf, url)
    victim, survivor, killed_at = _kill_the_worker_running(run, workers, "long")
    horse = int((tmp_path / "long.1.pid").read_text())

    lost = wait_for(lambda: run.progress.first("long", "retrying", attempt=1), 15, "WorkerLost")
    detection = lost[0] - killed_at
    results = run.join(30)

    assert lost[1].error.startswith(f"WorkerLost: worker {victim.worker_name} "), lost[1].error
    assert detection <= 2 + 2.0, f"worker loss noticed {detection:.2f}s after the kill (TTL 2 s)"
    figure(f"worker-loss detection, {mode} mode, ORCH_HEARTBEAT_TTL=2", detection)
    assert results == {"long": "second", "after": "done"}
    assert wf.tasks["long"].attempts == 2 and wf.tasks["long"].worker == survivor.worker_name
    assert not victim.alive() and not pid_alive(horse)
    assert survivor.alive()
    assert counters(client_of(url)) == {"long": 2, "after": 1}


@pytest.mark.parametrize("mode", MODES)
def test_dead_worker_is_detected_within_10_s_with_the_default_heartbeat_ttl(
        procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    from shared.config import Settings

    monkeypatch.delenv("ORCH_HEARTBEAT_TTL")
    default_ttl = Settings().heartbeat_ttl
    workers = procs.workers(2, mode=mode, env={"ORCH_HEARTBEAT_TTL": ""})  # the default
    url = procs.redis_url
    wf = Workflow("worker-death-default")
    wf.add_task(Task("long", fault_tasks.slow_first, args=(url, "long", str(tmp_path), 30, "first", "second"),
                     max_retries=1))

    run = Background(wf, url)
    victim, survivor, killed_at = _kill_the_worker_running(run, workers, "long")
    lost = wait_for(lambda: run.progress.first("long", "retrying", attempt=1), 25, "WorkerLost")
    detection = lost[0] - killed_at
    results = run.join(20)

    # rq: its heartbeat lapsed; lean: the same lapse, seen as its in-flight list left behind
    assert lost[1].error.startswith(f"WorkerLost: worker {victim.worker_name} "), lost[1].error
    # the heartbeat key was last renewed up to a second before the kill: TTL - 1 s at the earliest;
    # the README promises TTL + 2 s at the latest (10 s with the default TTL); 1 s of margin for slow CI
    assert default_ttl - 1.5 <= detection <= default_ttl + 2 + 1.0, \
        f"worker loss noticed {detection:.2f}s after the kill (default TTL {default_ttl:g} s)"
    figure(f"worker-loss detection, {mode} mode, default ORCH_HEARTBEAT_TTL={default_ttl:g}", detection)
    assert results == {"long": "second"}
    assert wf.tasks["long"].worker == survivor.worker_name


# =============================================================================
# 3. The coordinator dies
# =============================================================================
def _lease_holder(client: redis.Redis, run_id: str) -> Any:
    value = client.get(keys.lease(run_id))
    return value.decode() if value is not None else None


@pytest.mark.parametrize("mode", MODES)
def test_resume_after_the_coordinator_was_killed_runs_nothing_twice(procs: Processes, mode: str) -> None:
    workers = procs.workers(2, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    submit = procs.start("submit", ["submit", "tests/fault_tasks.py:resumable", "--redis-url", url, "-q"])
    run_id = run_id_from(submit)

    # kill the coordinator mid-run, while 'slow' (1.5 s) is recorded running and items go on beside it
    def midway() -> dict:
        records = task_records(client, run_id)
        done = sum(r["state"] == "success" for r in records.values())
        return records if records.get("slow", {}).get("state") == "running" and done >= 2 else {}

    wait_for(midway, 30, "'slow' to be recorded running")
    submit.signal_all(signal.SIGKILL)
    submit.wait(5)
    killed_records = task_records(client, run_id)
    running_then = sorted(name for name, r in killed_records.items() if r["state"] == "running")
    # the workers finish what they hold meanwhile (their outcomes wait in the stream), then die,
    # and their heartbeat keys lapse (2 s): the outcomes must win over the lapsed heartbeats
    def all_reported() -> bool:
        finished = {fields[b"task"].decode() for _, fields in client.xrange(keys.events(run_id))
                    if fields.get(b"status") in (b"succeeded", b"failed")}
        return all(name in finished for name, r in killed_records.items() if r["state"] in ("running", "queued"))

    wait_for(all_reported, 15, "the workers to report what they held")
    for worker in workers:
        worker.signal_all(signal.SIGKILL)
    wait_for(lambda: not client.keys("orch:alive:*"), 15, "the dead workers' heartbeat keys to lapse")
    assert run_meta(client, run_id)["state"] == "running"
    waiting = client.xlen(keys.events(run_id))
    assert waiting > 0, "no outcome waited in the stream"
    assert task_records(client, run_id) == killed_records  # nobody drove the run meanwhile

    # the dead coordinator's lease lapses (2 s), then `orch resume` takes over, with fresh workers
    wait_for(lambda: _lease_holder(client, run_id) is None, 5, "the dead coordinator's lease to lapse")
    procs.workers(2, mode=mode)
    resumed = procs.orch(["resume", run_id, "-q"], timeout=60)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    status = procs.orch(["status", run_id])
    assert status.returncode == 0, status.stderr + status.stdout
    assert "success" in status.stdout

    expected = fault_tasks.resumable_results()
    assert results_hash(client, run_id) == expected
    assert counters(client) == dict.fromkeys(expected, 1), "a task ran twice"
    records = task_records(client, run_id)
    assert {r["state"] for r in records.values()} == {"success"}
    assert all(r["attempt"] == 1 for r in records.values())
    meta = run_meta(client, run_id)
    assert meta["state"] == "success" and not client.sismember(keys.ACTIVE, run_id)
    assert "slow" in running_then and all(records[name]["attempt"] == 1 for name in running_then)
    print(f"outcomes waiting in the stream at resume: {waiting}; running when killed: {running_then}; "
          f"tasks done when the coordinator died: {sum(r['state'] == 'success' for r in killed_records.values())}")


@pytest.mark.parametrize("mode", MODES)
def test_standby_coordinator_drives_detached_runs_and_adopts_orphaned_ones(procs: Processes, mode: str) -> None:
    procs.workers(2, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    service = procs.start("coordinator", ["coordinator", "--redis-url", url, "--poll", "0.2"])

    # --detach: prints the run id and returns at once; the service drives the run
    started = time.monotonic()
    detached = procs.orch(["submit", "tests/fault_tasks.py:long_chain", "--detach"], timeout=30)
    returned = time.monotonic() - started
    assert detached.returncode == 0, detached.stderr
    run_id = detached.stdout.strip()
    assert run_id and len(run_id.splitlines()) == 1, detached.stdout
    assert returned < 5, f"--detach took {returned:.1f}s"
    assert run_meta(client, run_id)["state"] == "running"

    # while the service drives it, nobody else can: resume raises RunBusyError, `orch resume` exits 2
    wait_for(lambda: _lease_holder(client, run_id), 5, "the service to adopt the detached run")
    with pytest.raises(RunBusyError):
        resume_run(client, run_id)
    busy = procs.orch(["resume", run_id, "-q"])
    last = busy.stderr.strip().splitlines()[-1]
    assert busy.returncode == 2 and last.startswith("error: ") and "lease" in last, busy.stderr
    wait_for(lambda: run_meta(client, run_id)["state"] != "running", 30, "the detached run to finish")
    assert run_meta(client, run_id)["state"] == "success"
    assert results_hash(client, run_id) == fault_tasks.long_chain_results()
    assert counters(client) == dict.fromkeys(fault_tasks.long_chain_results(), 1)
    client.delete(*client.keys(fault_tasks.COUNTER_PREFIX + "*"))

    # a foreground coordinator is SIGKILLed mid-run: the service adopts the run once its lease lapses
    submit = procs.start("submit", ["submit", "tests/fault_tasks.py:resumable", "--redis-url", url, "-q"])
    run_id = run_id_from(submit)
    wait_for(lambda: sum(r["state"] == "success" for r in task_records(client, run_id).values()) >= 2, 30,
             "two tasks to succeed")
    old = _lease_holder(client, run_id)
    assert old is not None
    submit.signal_all(signal.SIGKILL)
    killed_at = time.monotonic()
    adopted = wait_for(lambda: (_lease_holder(client, run_id) or old) != old, 10, "the service to adopt the run")
    takeover = time.monotonic() - killed_at
    wait_for(lambda: run_meta(client, run_id)["state"] != "running", 30, "the adopted run to finish")
    finished = time.monotonic() - killed_at

    assert adopted and takeover <= 2 + 1.5, f"adopted {takeover:.2f}s after the kill (lease 2 s, poll 0.2 s)"
    figure("coordinator takeover by a standby (ORCH_LEASE_TTL=2)", takeover)
    assert run_meta(client, run_id)["state"] == "success"
    assert results_hash(client, run_id) == fault_tasks.resumable_results()
    assert counters(client) == dict.fromkeys(fault_tasks.resumable_results(), 1), "a task ran twice"
    assert finished < 15
    assert service.alive()


@pytest.mark.parametrize("mode", MODES)
def test_stale_coordinator_that_wakes_up_after_another_took_over_is_fenced(procs: Processes, mode: str) -> None:
    procs.workers(2, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    stale = procs.start("stale", ["submit", "tests/fault_tasks.py:long_chain", "--redis-url", url, "-q"])
    run_id = run_id_from(stale)
    wait_for(lambda: task_records(client, run_id).get("step2", {}).get("state") == "success", 30,
             "step2 to succeed")

    # freeze the driving coordinator past its lease; a standby adopts the run and finishes it
    stale.signal_all(signal.SIGSTOP)
    service = procs.start("coordinator", ["coordinator", "--redis-url", url, "--poll", "0.2"])
    wait_for(lambda: run_meta(client, run_id)["state"] != "running", 40, "the standby to finish the run")
    assert run_meta(client, run_id)["state"] == "success"
    final_records = task_records(client, run_id)
    final_results = results_hash(client, run_id)

    # wake the stale coordinator: it must stop (LeaseLost) and write nothing
    stale.signal_all(signal.SIGCONT)
    code = stale.wait(15)
    time.sleep(1.0)  # anything it might still have enqueued would have started by now

    assert code != 0, stale.describe()
    assert "another coordinator holds its lease" in stale.stderr(), stale.describe()
    assert run_meta(client, run_id)["state"] == "success"
    assert task_records(client, run_id) == final_records
    assert results_hash(client, run_id) == final_results == fault_tasks.long_chain_results()
    assert counters(client) == dict.fromkeys(fault_tasks.long_chain_results(), 1), "a task ran twice"
    assert Queue("default", connection=client, serializer=JSONSerializer).count == 0
    assert service.alive()


def test_a_lapsed_lease_is_not_taken_back_after_another_coordinator_held_it(redis_server: Any) -> None:
    """The fencing rule behind the stale-coordinator test, on every path a stale coordinator can take."""
    from orchestrator import dag
    from orchestrator.lease import Lease, LeaseLost
    from orchestrator.run_spec import RunSpec
    from orchestrator.run_store import create_run

    client = redis_server.client()
    no_tasks = RunSpec.build([], dag.analyse({}), [])

    def new_run(run_id: str, holder: Lease) -> None:
        holder.held = True
        create_run(client, run_id, "wf", no_tasks, lease_token=holder.token, lease_ttl=0.2)

    # nobody else took it: the coordinator takes its own lapsed lease back (a pause, a Redis outage)
    alone = Lease(client, "run-a", 0.2)
    new_run("run-a", alone)
    time.sleep(0.3)
    assert client.get(keys.lease("run-a")) is None
    assert alone.acquire() and alone.holder() == alone.token
    time.sleep(0.3)
    alone.apply([("HSET", keys.run("run-a"), "note", "written")])  # a step re-takes it the same way
    assert client.hget(keys.run("run-a"), "note") == b"written" and alone.holder() == alone.token

    # another coordinator adopted the run and died (its lease lapsed too): the stale one stays out
    stale, other = Lease(client, "run-b", 0.2), Lease(client, "run-b", 0.2)
    new_run("run-b", stale)
    time.sleep(0.3)
    assert other.acquire()
    client.delete(keys.lease("run-b"))
    assert not stale.acquire()
    with pytest.raises(LeaseLost):  # a step's writes are refused as well
        stale.apply([("HSET", keys.run("run-b"), "state", "corrupted")])
    assert client.hget(keys.run("run-b"), "state") == b"running"

    # the run finished (and released its lease): nobody who drove it before takes it again
    done = Lease(client, "run-c", 0.2)
    new_run("run-c", done)
    client.srem(keys.ACTIVE, "run-c")
    client.delete(keys.lease("run-c"))
    assert not done.acquire()
    with pytest.raises(LeaseLost):
        done.apply([("HSET", keys.run("run-c"), "state", "corrupted")])


# =============================================================================
# 4. Redis restarts; Redis unreachable at submit
# =============================================================================
@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    """A redis-server of this test's own with append-only persistence (fsync always)."""
    server = AofRedis(tmp_path / "aof-redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aof_procs(aof_redis: AofRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Processes]:
    with fast_processes(aof_redis.url, tmp_path, monkeypatch,
                        before_stop=lambda: aof_redis.process or aof_redis.start()) as started:
        yield started


@pytest.mark.parametrize("mode", MODES)
def test_run_survives_a_redis_restart(aof_redis: AofRedis, aof_procs: Processes, mode: str) -> None:
    workers = aof_procs.workers(2, mode=mode)
    url = aof_redis.url
    n = 30
    wf = Workflow(f"redis-restart-{mode}")
    for i in range(n):
        wf.add_task(Task(f"t{i}", fault_tasks.value, args=(url, f"t{i}", i * i, 0.2), max_retries=2))
    wf.add_task(Task("sum", fault_tasks.fan_sum, dependencies=[f"t{i}" for i in range(n)],
                     args=(url, "sum", [f"t{i}" for i in range(n)])))

    run = Background(wf, url)
    run_id = run.wait_run_id()
    client = aof_redis.client()
    wait_for(lambda: sum(r["state"] == "success" for r in task_records(client, run_id).values()) >= 6, 30,
             "six tasks to succeed")
    client.close()
    aof_redis.stop()                       # SIGTERM: a clean shutdown, the AOF is complete
    stopped_at = time.monotonic()
    time.sleep(1.5)
    aof_redis.start()                      # same port, same data directory
    restarted_at = time.monotonic()
    moves_before = len(run.progress.moves)
    progressed = wait_for(lambda: [at for at, move in list(run.progress.moves)[moves_before:]
                                   if move.finish is TaskState.SUCCESS], 30, "progress after the restart")
    recovery = progressed[0] - restarted_at
    results = run.join(60)

    expected = {**{f"t{i}": i * i for i in range(n)}, "sum": sum(i * i for i in range(n))}
    assert results == expected
    client = aof_redis.client()
    assert run_meta(client, run_id)["state"] == "success"
    assert results_hash(client, run_id) == expected
    retried = {move.task: move.error for _, move in run.progress.moves if move.finish is TaskState.RETRYING}
    ran = counters(client)
    print(f"attempts retried across the restart: {retried}; executions > 1: "
          f"{ {k: v for k, v in ran.items() if v > 1} }; outage {restarted_at - stopped_at:.2f}s")
    assert all(w.alive() for w in workers), "a worker died with Redis"
    figure(f"first task committed after Redis came back (1.5 s outage), {mode} mode", recovery)
    assert recovery < 10


@pytest.mark.parametrize("url, message", [
    (f"redis://127.0.0.1:{closed_port()}/0", "error: cannot reach Redis at redis://127.0.0.1:"),
    ("http://127.0.0.1:6379/0", "error: malformed Redis URL"),
    ("redis://127.0.0.1:notaport/0", "error: malformed Redis URL"),
])
def test_submit_without_a_usable_redis_exits_2_with_one_line(url: str, message: str, tmp_path: Path) -> None:
    procs = Processes(tmp_path, url)
    started = time.monotonic()
    done = procs.orch(["submit", "tests/fault_tasks.py:tiny", "--redis-url", url], with_url=False, timeout=60)
    elapsed = time.monotonic() - started

    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert elapsed < 20, f"took {elapsed:.1f}s to give up"


# =============================================================================
# 5. A late result from a superseded attempt
# =============================================================================
@pytest.mark.parametrize("mode", MODES)
def test_late_result_of_a_superseded_attempt_is_ignored(procs: Processes, mode: str, tmp_path: Path) -> None:
    workers = procs.workers(2, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    wf = Workflow(f"late-{mode}")
    wf.add_task(Task("late", fault_tasks.slow_first, args=(url, "late", str(tmp_path), 5, "old", "new"),
                     max_retries=1))
    # keeps the run open (on the other worker) until the late report has been read
    wf.add_task(Task("after", fault_tasks.after_gate, dependencies=["late"], args=(url, "late-read", "late")))

    run = Background(wf, url)
    run_id = run.wait_run_id()
    wait_for(lambda: wf.tasks["late"].state is TaskState.RUNNING and wf.tasks["late"].worker, 30, "late to run")
    time.sleep(0.3)
    frozen = next(w for w in workers if w.worker_name == wf.tasks["late"].worker)
    survivor = next(w for w in workers if w is not frozen)
    frozen.signal_all(signal.SIGSTOP)      # cut off: no heartbeat, attempt 1 frozen mid-sleep

    lost = wait_for(lambda: run.progress.first("late", "retrying", attempt=1), 15, "attempt 1 to be lost")
    assert lost[1].error.startswith("WorkerLost"), lost[1].error
    wait_for(lambda: run.progress.first("late", "success"), 15, "attempt 2 to succeed")
    assert wf.tasks["late"].worker == survivor.worker_name

    frozen.signal_all(signal.SIGCONT)      # attempt 1 wakes up and reports "old"
    wait_for(lambda: (tmp_path / "late.returning").exists(), 15, "attempt 1 to return")

    def late_report() -> bool:
        for _, fields in client.xrange(keys.events(run_id)):
            if (fields.get(b"task"), fields.get(b"attempt"), fields.get(b"status")) == (b"late", b"1", b"succeeded"):
                return True
        return False

    wait_for(late_report, 10, "attempt 1's report in the run's stream")
    time.sleep(0.5)                        # the coordinator blocks on XREAD: it has read it by now
    client.set("fault:gate:late-read", "1")
    results = run.join(30)

    assert results == {"late": "new", "after": {"seen": "new"}}
    assert [move.finish.value for _, move in run.progress.of("late")] == ["queued", "running", "retrying",
                                                                           "queued", "running", "success"]
    assert results_hash(client, run_id)["late"] == "new"
    record = task_records(client, run_id)["late"]
    assert (record["state"], record["attempt"], record["worker"]) == ("success", 2, survivor.worker_name)
    assert counters(client) == {"late": 2}
    assert frozen.alive() and survivor.alive()


# =============================================================================
# 6. Cancellation
# =============================================================================
def _queue_length(client: redis.Redis, mode: str) -> int:
    if mode == "lean":
        return int(client.llen(keys.lean_queue("default")))
    return Queue("default", connection=client, serializer=JSONSerializer).count


def _assert_cancelled(client: redis.Redis, run_id: str, mode: str, pid: int, by: str) -> None:
    meta = run_meta(client, run_id)
    assert meta["state"] == "cancelled", meta
    assert meta.get("cancelled_by", "").startswith(by), meta.get("cancelled_by")
    assert meta.get("cancelled_at")
    records = task_records(client, run_id)
    assert {name: r["state"] for name, r in records.items()} == {
        "long": "cancelled", "queued0": "cancelled", "queued1": "cancelled", "queued2": "cancelled",
        "child": "cancelled"}, records
    wait_for(lambda: not pid_alive(pid), 5, f"the running attempt (pid {pid}) to be stopped")
    assert _queue_length(client, mode) == 0, "queued jobs were left in the queue"
    assert not client.sismember(keys.ACTIVE, run_id)
    time.sleep(0.5)  # nothing queued may start after the cancel
    assert counters(client) == {"long": 1}, "a cancelled task ran"


@pytest.mark.parametrize("mode", MODES)
def test_orch_cancel_stops_a_running_run(procs: Processes, mode: str, tmp_path: Path) -> None:
    (worker,) = procs.workers(1, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    wf = fault_tasks.build_cancellable(url, str(tmp_path))
    run = Background(wf, url)
    run_id = run.wait_run_id()
    pid = int(wait_for(lambda: (tmp_path / "long.pid").exists() and (tmp_path / "long.pid").read_text(), 30,
                       "the long task to start"))
    assert _queue_length(client, mode) == 3

    done = procs.orch(["cancel", run_id])
    assert done.returncode == 0, done.stderr
    assert "cancelled" in done.stdout, done.stdout
    results = run.join(15)

    assert results == {}
    assert all(task.state is TaskState.CANCELLED for task in wf)
    _assert_cancelled(client, run_id, mode, pid, "orch cancel by ")
    assert worker.alive()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sig, code, by", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM"),
                                           (signal.SIGHUP, 129, "SIGHUP")])
def test_ctrl_c_on_a_foreground_submit_cancels_the_run(procs: Processes, tmp_path: Path, mode: str,
                                                       sig: int, code: int, by: str) -> None:
    """Ctrl-C, a CI job's timeout (SIGTERM) and a closed terminal (SIGHUP) alike cancel the run."""
    procs.workers(1, mode=mode)
    client = client_of(procs.redis_url)
    submit = procs.start("submit", ["submit", "tests/fault_tasks.py:cancellable", "--redis-url", procs.redis_url,
                                    "-q"])
    run_id = run_id_from(submit)
    pid = int(wait_for(lambda: (tmp_path / "long.pid").exists() and (tmp_path / "long.pid").read_text(), 30,
                       "the long task to start"))

    os.killpg(submit.pid, sig)   # what a terminal does on Ctrl-C, or a CI runner on its timeout
    exited = submit.wait(15)

    assert exited == code, submit.describe()
    assert f"run cancelled ({by})" in submit.stderr(), submit.describe()
    assert "Traceback" not in submit.stderr()
    _assert_cancelled(client, run_id, mode, pid, by)


@pytest.mark.parametrize("mode", MODES)
def test_orch_cancel_adopts_a_run_nobody_drives(procs: Processes, tmp_path: Path, mode: str) -> None:
    procs.workers(1, mode=mode)
    client = client_of(procs.redis_url)
    submit = procs.start("submit", ["submit", "tests/fault_tasks.py:cancellable", "--redis-url", procs.redis_url,
                                    "-q"])
    run_id = run_id_from(submit)
    pid = int(wait_for(lambda: (tmp_path / "long.pid").exists() and (tmp_path / "long.pid").read_text(), 30,
                       "the long task to start"))
    submit.signal_all(signal.SIGKILL)      # the coordinator dies, no standby: nobody drives the run
    submit.wait(5)

    started = time.monotonic()
    done = procs.orch(["cancel", run_id])
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stderr
    assert "cancelled" in done.stdout, done.stdout
    assert elapsed < 2 + 5, f"orch cancel took {elapsed:.1f}s"
    _assert_cancelled(client, run_id, mode, pid, "orch cancel by ")


# =============================================================================
# 7. Hostile input
# =============================================================================
def test_garbage_and_forged_stream_entries_are_logged_and_ignored(procs: Processes,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orch.coordinator")
    procs.workers(1)
    url = procs.redis_url
    client = client_of(url)
    wf = Workflow("hostile-stream")
    wf.add_task(Task("gate", fault_tasks.gate, args=(url, "hostile")))
    wf.add_task(Task("a", fault_tasks.value, dependencies=["gate"], args=(url, "a", {"x": [1, 2]})))
    wf.add_task(Task("b", fault_tasks.value, dependencies=["a"], args=(url, "b", "bee")))

    run = Background(wf, url)
    run_id = run.wait_run_id()
    wait_for(lambda: wf.tasks["gate"].state is TaskState.RUNNING, 30, "gate to run")
    events = keys.events(run_id)
    unreadable = [
        {"garbage": "1"},                                                           # no status at all
        {"status": "succeeded", "run": run_id},                                     # truncated
        {"status": "succeeded", "run": run_id, "task": "gate", "attempt": "x", "at": "1"},
        {"status": "failed", "run": run_id, "task": "gate", "attempt": "0", "at": "1"},
        {"status": "failed", "run": run_id, "task": "gate", "attempt": "1", "at": "1", "kind": "bogus"},
        {"status": "succeeded", "run": run_id, "task": "gate", "attempt": "1", "at": "soon"},
        {"status": "exploded", "run": run_id, "task": "gate", "attempt": "1", "at": "1"},
        {b"\xff\xfe": b"\x00\xff"},                                                 # not UTF-8
    ]
    foreign = [
        {"status": "succeeded", "run": run_id, "task": "no such task", "attempt": "1", "at": "1", "result": "1"},
        {"status": "succeeded", "run": "another-run", "task": "gate", "attempt": "1", "at": "1", "result": "1"},
        {"status": "failed", "run": run_id, "task": "t" * 200_000, "attempt": "1", "at": "1",
         "error": "e" * 1_000_000},                                                 # huge fields
    ]
    stale = [  # well-formed, but not from the current attempt: the scheduler ignores them
        {"status": "succeeded", "run": run_id, "task": "gate", "attempt": "7", "at": "1", "result": '"forged"'},
        {"status": "failed", "run": run_id, "task": "gate", "attempt": "99999999999999999999", "at": "1",
         "error": "x" * 100_000},
    ]
    for fields in unreadable + foreign + stale:
        client.xadd(events, fields)
    time.sleep(1.0)
    assert run.thread.is_alive(), "the coordinator died"
    assert wf.tasks["gate"].state is TaskState.RUNNING and wf.tasks["gate"].attempts == 1
    client.set("fault:gate:hostile", "1")
    results = run.join(30)

    assert results == {"gate": "opened", "a": {"x": [1, 2]}, "b": "bee"}
    assert all(task.attempts == 1 for task in wf)
    assert run_meta(client, run_id)["state"] == "success"
    assert results_hash(client, run_id) == results
    ignored = [r for r in caplog.records if r.name == "orch.coordinator" and "ignored" in r.getMessage()]
    assert len(ignored) == len(unreadable) + len(foreign), [r.getMessage()[:200] for r in ignored]
    assert all("\n" not in r.getMessage() for r in ignored)


def _forge_rq_jobs(client: redis.Redis) -> None:
    """Jobs no coordinator wrote: bad arguments for the orch job function, and broken RQ jobs."""
    from rq.job import Job

    queue = Queue("default", connection=client, serializer=JSONSerializer)
    job_function = "worker.rq_job.run_task"
    queue.enqueue(job_function, "nonsense")                                         # missing arguments
    queue.enqueue(job_function, "forged-run", "t", "1", "fault_tasks:echo", "not json", None, None)
    queue.enqueue(job_function, "forged-run", "t", "x", "time:sleep", "[[1.5],{}]", None, None)  # attempt "x"
    queue.enqueue(job_function, "forged-run", "t", 1, "time:sleep", "[[1.5],{}]", "soon", None)  # timeout "soon"
    queue.enqueue(job_function, None, ["t"], {"a": 1}, 5, 6, "seven", "eight")     # wrong types everywhere
    queue.enqueue(job_function, "forged-run", "t", 1, "fault_tasks:echo", '[["x"],{}]', None, "lots")
    queue.enqueue(job_function, *(["x" * 100_000] * 7))                               # huge arguments
    client.rpush(queue.key, "no-such-job")                                          # an id without a job
    broken = Job.create("fault_tasks:echo", args=(1,), connection=client, serializer=JSONSerializer,
                        id="broken-job")
    broken.save()
    client.hset(broken.key, "data", b"\x00garbage, not zlib nor JSON")
    client.rpush(queue.key, broken.id)


def _forge_lean_jobs(client: redis.Redis) -> None:
    junk = [
        "not json", "[1, 2]", '{"a": 1}', "[]", "null", "\xff\xfe",
        json.dumps(["forged-run", "t", "x", "fault_tasks:echo", '[[1],{}]', None, None]),
        json.dumps(["forged-run", "t", 1, "fault_tasks:echo", "not json", None, None]),
        json.dumps([None, None, 1, None, None, None, None]),
        json.dumps([["r"], {"t": 1}, 1, 5, 6, "seven", "eight"]),
        json.dumps(["forged-run", "t", 1, "time:sleep", '[[0.5],{}]', "soon", "lots"]),
        json.dumps(["x" * 100_000] * 7),
    ]
    client.rpush(keys.lean_queue("default"), *junk)


@pytest.mark.parametrize("mode", MODES)
def test_forged_jobs_do_not_crash_the_worker(procs: Processes, mode: str) -> None:
    (worker,) = procs.workers(1, mode=mode)
    url = procs.redis_url
    client = client_of(url)
    (_forge_lean_jobs if mode == "lean" else _forge_rq_jobs)(client)
    wait_for(lambda: _queue_length(client, mode) == 0 and client.llen("rq:queue:default") == 0, 30,
             "the forged jobs to be taken")
    odd = "odd name: 'single' \"double\" ünïcødé ✓ a/b\\c {x} %s"
    wf = Workflow(f"after-forgery-{mode}")
    wf.add_task(Task(odd, fault_tasks.value, args=(url, "odd", "fine")))
    wf.add_task(Task("child of odd", fault_tasks.after_gate, dependencies=[odd], args=(url, "open", odd)))
    client.set("fault:gate:open", "1")
    results = Background(wf, url).join(30)

    assert results == {odd: "fine", "child of odd": {"seen": "fine"}}
    assert results_hash(client, wf.last_run_id) == results
    assert set(task_records(client, wf.last_run_id)) == {odd, "child of odd"}
    assert worker.alive(), worker.describe()
    assert {task.worker for task in wf} == {worker.worker_name}


@pytest.mark.parametrize("mode", MODES)
def test_a_job_whose_payload_does_not_decode_fails_its_task(procs: Processes, mode: str) -> None:
    from rq.job import Job

    url = procs.redis_url
    client = client_of(url)
    wf = Workflow("bad-payload")
    wf.add_task(Task("victim", fault_tasks.echo, args=("fine",)))
    wf.add_task(Task("child", fault_tasks.echo, dependencies=["victim"], args=(1,)))
    # No worker yet, so the form is pinned: the job waits in the queue, where it gets damaged.
    run = Background(wf, url, transport=mode)
    run_id = run.wait_run_id()
    if mode == "rq":
        queue = Queue("default", connection=client, serializer=JSONSerializer)
        wait_for(lambda: queue.count == 1, 10, "the job to be queued")
        job = Job.fetch(queue.job_ids[0], connection=client, serializer=JSONSerializer)
        args = list(job.args)
        args[4] = "{not json"
        job.args = tuple(args)
        job.save()
    else:
        entries = keys.lean_queue("default")
        wait_for(lambda: client.llen(entries) == 1, 10, "the job to be queued")
        entry = json.loads(client.lindex(entries, 0))
        entry[4] = "{not json"
        client.lset(entries, 0, json.dumps(entry))
    (worker,) = procs.workers(1, mode=mode)
    results = run.join(30)

    victim = wf.tasks["victim"]
    assert results == {}
    assert victim.state is TaskState.FAILURE and victim.attempts == 1
    assert victim.error.startswith("SerializationError: cannot decode value"), victim.error
    assert wf.tasks["child"].error == "upstream task 'victim' failed"
    assert run_meta(client, run_id)["state"] == "failure"
    assert worker.alive()


def test_a_result_over_the_size_limit_fails_its_task(procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    (small,) = procs.workers(1, env={"ORCH_MAX_RESULT_BYTES": "1000"})
    url = procs.redis_url
    wf = Workflow("big-results")
    wf.add_task(Task("fits", fault_tasks.big, args=(900,)))
    wf.add_task(Task("too big for the worker", fault_tasks.big, args=(5000,)))
    results = Background(wf, url).join(30)

    assert results == {"fits": "x" * 900}
    failed = wf.tasks["too big for the worker"]
    assert failed.state is TaskState.FAILURE
    assert failed.error.startswith("SerializationError: result of task 'too big for the worker' is 5002 bytes "
                                   "encoded, over the limit of 1000"), failed.error
    assert small.alive()

    # the coordinator's own limit (it travels with each job) holds too
    monkeypatch.setenv("ORCH_MAX_RESULT_BYTES", "300")
    wf = Workflow("big-results-2")
    wf.add_task(Task("fits", fault_tasks.big, args=(200,)))
    wf.add_task(Task("too big for the coordinator", fault_tasks.big, args=(900,)))
    results = Background(wf, url).join(30)
    assert results == {"fits": "x" * 200}
    assert "over the limit of 300" in wf.tasks["too big for the coordinator"].error


# ------------------------------------------------------------ decoders, fuzzed
# shared.codec.decode and shared.messages.Outcome.from_fields are fuzzed in tests/test_codec.py;
# here: the two places that take them from Redis and must never fall over.
_text_or_bytes = st.one_of(st.text(max_size=30), st.binary(max_size=30))
_field_names = st.one_of(st.sampled_from(["run", "task", "attempt", "status", "at", "result", "error", "kind",
                                          "traceback", "worker", "started_at", "log", "by"]), _text_or_bytes)
_field_values = st.one_of(_text_or_bytes, st.sampled_from(["started", "succeeded", "failed", "cancel", "run-1",
                                                           "a", "1", "0", "-1", "nan", "inf", "1e400", "error",
                                                           "timeout", "lost", "[1]", "{}"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_field_names, _field_values, max_size=12))
def test_the_coordinator_reads_any_stream_entry_without_raising(fields: dict) -> None:
    from orchestrator import dag
    from orchestrator.backends.rq import RQBackend
    from orchestrator.run_spec import RunSpec
    from shared.events import RunCancelled, TaskFailed, TaskStarted, TaskSucceeded

    tasks = {"a": Task("a", fault_tasks.echo)}
    spec = RunSpec.build(list(tasks.values()), dag.analyse(tasks), ["fault_tasks:echo"])
    backend = RQBackend(None, "run-1", tasks, spec)  # type: ignore[arg-type]
    for event in backend._events_of(fields):
        assert isinstance(event, (RunCancelled, TaskStarted, TaskSucceeded, TaskFailed))
        if isinstance(event, (TaskStarted, TaskSucceeded, TaskFailed)):
            assert event.task == "a" and event.attempt >= 1


class _ForgedJob:
    def __init__(self, func_name: Any, args: Any) -> None:
        self.func_name = func_name
        self.args = args


_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(_json_values, max_size=9))
def test_the_rq_worker_parent_reads_any_job_arguments_without_raising(args: list) -> None:
    from worker.rq_worker import JOB_FUNCTION, attempt_of

    found = attempt_of(_ForgedJob(JOB_FUNCTION, args))  # type: ignore[arg-type]
    if found is not None:
        run_id, task, attempt, timeout = found
        assert isinstance(run_id, str) and isinstance(task, str) and attempt >= 1
        assert timeout is None or timeout > 0
    assert attempt_of(_ForgedJob("other:function", args)) is None  # type: ignore[arg-type]
