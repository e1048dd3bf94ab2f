"""Chaos: workers are killed without warning all through a 500-task run.

A real ``redis-server`` (the ``redis_server`` fixture) and real ``orch worker``
subprocesses (``ORCH_HEARTBEAT_TTL=2``). The coordinator runs in this process, on a
layered DAG of 10 x 50 short tasks (20-50 ms; each task reads the results of two tasks
of the layer above and records every execution in Redis). Meanwhile a chaos thread,
every 2-3 s, picks a random worker, freezes its whole process tree (SIGSTOP to its
process group, so it cannot fork or report any more), SIGKILLs the group and every
descendant (work horses and lean work processes run in process groups of their own),
and starts a replacement worker.

The run must succeed with every result right and committed exactly once, from the
current attempt; every retried attempt must be one a killed worker held. Run with
``-s`` to see the figures (kills, attempts lost and retried, detection times, run time).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import cluster_tasks
from bench.procs import alive, descendants, orch_command, send_signal
from cluster_tasks import ProgressLog, check_run, diagnose_stall, is_rq_dequeue_gap, lost_worker, summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEARTBEAT_TTL = 2.0
LAYERS, WIDTH = 10, 50
STALL_SECONDS = 15.0
RUN_LIMIT = 200.0





class Workers:
    """``orch worker`` subprocesses named ``chaos-N``, each in a session of its own."""

    def __init__(self, url: str, mode: str, concurrency: int, log_dir: Path) -> None:
        self.url, self.mode, self.concurrency, self.log_dir = url, mode, concurrency, log_dir
        self.live: dict[str, subprocess.Popen] = {}
        self.killed: dict[str, float] = {}
        self.all: list[subprocess.Popen] = []
        self.family: set[int] = set()
        self._count = 0
        self._lock = threading.Lock()

    def start(self) -> str:
        with self._lock:
            self._count += 1
            name = f"chaos-{self._count}"
        cmd = [*orch_command(), "worker", "--redis-url", self.url, "--path", str(Path(__file__).parent),
               "--queues", "default", "--mode", self.mode, "--name", name, "--concurrency", str(self.concurrency)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ORCH_HEARTBEAT_TTL": str(HEARTBEAT_TTL),
               cluster_tasks.HOST_ENV: name}
        with open(self.log_dir / f"worker-{name}.log", "ab") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        with self._lock:
            self.live[name] = process
            self.all.append(process)
        return name

    def kill(self, name: str) -> float:
        """Freeze the worker's process group, then SIGKILL it and every descendant; return the time."""
        with self._lock:
            process = self.live.pop(name)
        send_signal(process.pid, signal.SIGSTOP, group=True)
        family = descendants(process.pid)
        at = time.time()
        send_signal(process.pid, signal.SIGKILL, group=True)
        for pid in family:
            send_signal(pid, signal.SIGKILL)
        self.family.update(family)
        process.wait(timeout=10)
        self.killed[name] = at
        return at

    def stop_all(self) -> list[int]:
        """Kill every worker still running (and all its descendants); return pids that would not die."""
        for process in self.all:
            if process.poll() is None:
                send_signal(process.pid, signal.SIGSTOP, group=True)
                self.family.update(descendants(process.pid))
                send_signal(process.pid, signal.SIGKILL, group=True)
        for pid in self.family:
            send_signal(pid, signal.SIGKILL)
        for process in self.all:
            process.wait(timeout=10)
        time.sleep(0.2)
        return [pid for pid in self.family if alive(pid)]

    def registered(self, conn) -> set[str]:
        from rq import Worker

        from shared import keys

        if self.mode == "lean":
            names = {keys.slot_worker(m.decode()) for m in conn.smembers(keys.LEAN_WORKERS)}
            return {n for n in names if conn.exists(keys.alive(n))}
        return {w.name for w in Worker.all(connection=conn)}


@pytest.fixture
def workers_factory(tmp_path):
    made: list[Workers] = []

    def make(url: str, mode: str, concurrency: int) -> Workers:
        made.append(Workers(url, mode, concurrency, tmp_path))
        return made[-1]

    try:
        yield make
    finally:
        survivors = [pid for w in made for pid in w.stop_all()]
        assert not survivors, f"worker processes survived SIGKILL: {survivors}"


@pytest.mark.parametrize("mode, n_workers, concurrency", [("rq", 4, 1), ("lean", 3, 1)])
def test_500_tasks_survive_workers_killed_every_few_seconds(redis_server, workers_factory, tmp_path, mode,
                                                            n_workers, concurrency) -> None:
    from orchestrator.distributed import run_distributed
    from orchestrator.run_store import request_cancel
    from shared.config import Settings

    conn = redis_server.client()
    workers = workers_factory(redis_server.url, mode, concurrency)
    for _ in range(n_workers):
        workers.start()
    deadline = time.monotonic() + 30
    while len(workers.registered(conn)) < n_workers:
        assert time.monotonic() < deadline, f"workers did not register: {logs(tmp_path)}"
        time.sleep(0.05)

    tag = uuid.uuid4().hex[:12]
    wf = cluster_tasks.make_layered(redis_server.url, tag, layers=LAYERS, width=WIDTH)
    progress = ProgressLog(wf.tasks)
    outcome: dict = {}
    run_ids: list[str] = []

    def coordinate() -> None:
        try:
            outcome["state"] = run_distributed(wf, redis_server.url, on_progress=progress,
                                               on_submitted=run_ids.append,
                                               settings=Settings(heartbeat_ttl=HEARTBEAT_TTL))[1]
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    seed = random.randrange(1 << 30)
    stop = threading.Event()
    kills: list[tuple[str, float]] = []
    chaos_errors: list[BaseException] = []

    def chaos() -> None:
        rng = random.Random(seed)
        wait = 1.0  # the first kill comes early: the run is short
        try:
            while not stop.wait(wait):
                victim = rng.choice(sorted(workers.live))
                kills.append((victim, workers.kill(victim)))
                workers.start()
                wait = rng.uniform(2.0, 3.0)
        except BaseException as exc:  # noqa: BLE001
            chaos_errors.append(exc)

    started = time.time()
    coordinator = threading.Thread(target=coordinate, name="coordinator", daemon=True)
    chaos_thread = threading.Thread(target=chaos, name="chaos", daemon=True)
    coordinator.start()
    chaos_thread.start()
    stalled = None
    try:
        while coordinator.is_alive():
            coordinator.join(0.5)
            if run_ids and time.time() - progress.last_at > STALL_SECONDS:
                stalled = diagnose_stall(conn, run_ids[0], mode, alive_workers=workers.live)
                break
            assert time.time() - started < RUN_LIMIT, "the run took too long"
    finally:
        stop.set()
        chaos_thread.join(30)
        if coordinator.is_alive() and run_ids:
            request_cancel(conn, run_ids[0], "test_chaos: stalled")  # ends the coordinator thread
            coordinator.join(30)
    finished = time.time()
    assert not chaos_errors, chaos_errors
    if stalled is not None:
        pytest.fail(f"the run stalled (seed {seed}, kills {kills}): {json.dumps(stalled, indent=1)}\n"
                    f"{logs(tmp_path)}")
    assert "error" not in outcome, f"coordinator raised {outcome.get('error')!r}"
    assert str(outcome.get("state")) == "success", f"run ended {outcome.get('state')} (seed {seed})"

    from cluster_tasks import snapshot

    snap = snapshot(conn, run_ids[0], tag)
    figures = check_run(snap, cluster_tasks.layered_expected(LAYERS, WIDTH), progress.records)
    run_end = progress.records[-1]["at"]
    kills = [(victim, at) for victim, at in kills if at < run_end]  # not the ones after the run's end
    assert len(kills) >= 2, f"only {len(kills)} kill(s) happened during the run: too short a run to test"
    moves = progress.records
    killed_at = dict(kills)
    # Every WorkerLost names a killed worker and comes after its death.
    detections = []
    in_transit = figures.lost_by_worker.pop("?", [])
    # An attempt lost between a worker's dequeue and its start names no worker (RQ does not record
    # who took a job): it must follow some kill by about a heartbeat TTL (plus the check interval).
    for move in in_transit:
        assert "died before starting it" in move["error"], move
        assert any(at < move["at"] < at + HEARTBEAT_TTL + 4.0 for at in killed_at.values()), (move, kills)
    for worker, lost in figures.lost_by_worker.items():
        assert worker in killed_at, f"attempts of a worker never killed were declared lost: {worker} {lost[:3]}"
        assert all(m["at"] > killed_at[worker] for m in lost), (worker, killed_at[worker], lost[:3])
        detections.append(min(m["at"] for m in lost) - killed_at[worker])
    assert not detections or max(detections) < HEARTBEAT_TTL + 4.0, detections
    # Every attempt a worker held when it was killed was declared lost (and so retried), unless
    # its success was already reported.
    hit = 0
    for victim, at in kills:
        last: dict[str, dict] = {}
        for move in moves:
            if move["at"] < at:
                last[move["task"]] = move
        held = [(t, m["attempt"]) for t, m in last.items() if m["finish"] == "running" and m["worker"] == victim]
        hit += bool(held)
        for task, attempt in held:
            fate = [m for m in moves if m["task"] == task and m["attempt"] == attempt and m["at"] >= at
                    and m["finish"] in ("success", "retrying", "failure")]
            assert fate, f"{task} attempt {attempt}, running on {victim} when it was killed, never ended"
            if fate[0]["finish"] == "success":
                assert fate[0]["at"] < at + 2.0, (task, attempt, victim, fate[0])  # its report was on the wire
            else:
                assert fate[0]["kind"] == "lost" and lost_worker(fate[0]["error"]) == victim, fate[0]
    assert figures.lost_attempts >= 1 or hit == 0, "kills hit busy workers, yet no attempt was lost"

    print(f"\n[chaos {mode}] {figures.tasks} tasks ({LAYERS} layers x {WIDTH}), {n_workers} workers x "
          f"{concurrency} slot(s), seed {seed}; run time {finished - started:.2f}s\n"
          f"[chaos {mode}] {len(kills)} workers killed ({hit} while running an attempt); attempts failed as "
          f"WorkerLost and retried: {figures.lost_attempts}; tasks retried: {len(figures.retried_tasks)}; "
          f"task bodies run more than once: {len(figures.executed_twice_or_more)}; executions in all: "
          f"{figures.executions}\n"
          f"[chaos {mode}] detection (kill -> first WorkerLost of that worker): {summary(detections)}")


class AttemptStranded(AssertionError):
    """The run is stuck on an attempt a dead RQ worker had dequeued."""


def test_rq_attempt_taken_by_a_worker_that_died_before_starting_it_is_retried(redis_server, workers_factory) -> None:
    """A worker dies right after RQ's dequeue moved a job to the intermediate queue, before the job
    started: the attempt must still be retried on a live worker (as in lean mode, where the job
    sits in the dead worker's in-flight list and is recovered)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from orchestrator import Task, Workflow
    from orchestrator.distributed import run_distributed
    from orchestrator.run_store import request_cancel
    from shared.config import Settings

    conn = redis_server.client()
    tag = uuid.uuid4().hex[:12]
    wf = Workflow("dequeue-gap")
    wf.add_task(Task("only", cluster_tasks.fan_root, args=(redis_server.url, tag, 0.01), max_retries=3))
    outcome: dict = {}
    run_ids: list[str] = []

    def coordinate() -> None:
        try:
            outcome["state"] = run_distributed(wf, redis_server.url, on_submitted=run_ids.append,
                                               settings=Settings(heartbeat_ttl=HEARTBEAT_TTL))[1]
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    from shared.workers import RQ, WorkerInfo, beat

    # The RQ-mode worker that is about to die, as the registry saw it: the job is sent to RQ.
    beat(conn, WorkerInfo("doomed", RQ, ("default",)), ttl=HEARTBEAT_TTL)
    coordinator = threading.Thread(target=coordinate, name="coordinator", daemon=True)
    coordinator.start()
    queue = Queue("default", connection=conn, serializer=JSONSerializer)
    deadline = time.monotonic() + 10
    while not queue.get_job_ids():
        assert time.monotonic() < deadline, "the attempt was never enqueued"
        time.sleep(0.02)
    # What a worker's dequeue does (rq.Queue.lmove), by a worker that then dies on the spot.
    taken = conn.lmove(queue.key, queue.intermediate_queue_key)
    assert taken is not None
    workers = workers_factory(redis_server.url, "rq", 1)
    healthy = workers.start()  # a healthy worker, ready to run a retry
    deadline = time.monotonic() + 30
    while healthy not in workers.registered(conn):
        assert time.monotonic() < deadline, "the healthy worker did not register"
        time.sleep(0.05)
    diagnosis = None
    try:
        coordinator.join(3 * HEARTBEAT_TTL + 8)
    finally:
        diagnosis = diagnose_stall(conn, run_ids[0], "rq") if coordinator.is_alive() and run_ids else None
        if coordinator.is_alive() and run_ids:
            request_cancel(conn, run_ids[0], "test: the attempt was stranded")
            coordinator.join(30)
    if diagnosis is not None and is_rq_dequeue_gap(diagnosis, dead_workers=()):
        raise AttemptStranded(f"the run did not finish: {json.dumps(diagnosis['stuck'])}")
    assert "error" not in outcome, f"coordinator raised {outcome.get('error')!r}"
    assert str(outcome.get("state")) == "success", f"run ended {outcome.get('state')}: {diagnosis}"


def logs(tmp_path: Path, chars: int = 1500) -> str:
    return "\n".join(f"----- {p.name} -----\n{p.read_text(errors='replace')[-chars:]}"
                     for p in sorted(tmp_path.glob("*.log")))
