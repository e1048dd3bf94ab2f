"""Distributed runs end to end: a real ``redis-server`` and real ``orch worker`` processes.

Each test submits a workflow from this process (``Workflow.run(redis_url=...)``,
which coordinates the run here) to worker subprocesses started by the
``orch_workers`` fixture, and checks results, task states, errors, the run in
Redis and timings (with generous bounds: CI machines are slow and shared).
Faults are injected by the tasks themselves: sleeping past a timeout,
swallowing the timeout, ``os._exit``, SIGKILL of their own work horse.

Every test that runs workers runs twice, once per worker mode (the ``mode``
fixture): ``orch worker`` (lean, the default) and ``orch worker --mode rq`` (the
RQ-compatible path); runs are submitted with no transport option, so each test
also shows that a submission follows the workers it finds. Where a check is about
RQ itself (its job counts, its queues), the lean run checks the same property
its own way (task records, the lean queue and in-flight lists).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

import dist_tasks
from dist_tasks import run_meta, state_counts, task_records
from orchestrator import Task, Workflow
from orchestrator.run_store import read_result, read_run
from shared import keys
from shared.states import TaskState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(params=["rq", "lean"])
def mode(request: pytest.FixtureRequest) -> str:
    """The worker mode of a test: its workers' ``--mode`` (submissions follow it by themselves)."""
    return request.param


def states(wf: Workflow) -> dict[str, str]:
    return {name: task.state.value for name, task in wf.tasks.items()}


def run(wf: Workflow, url: str, mode: str) -> tuple[dict, float]:
    started = time.monotonic()
    results = wf.run(redis_url=url)
    elapsed = time.monotonic() - started
    client = redis.Redis.from_url(url)
    try:
        assert run_meta(client, wf.last_run_id)["transport"] == "auto"
    finally:
        client.close()
    return results, elapsed


def assert_queues_empty(client, mode: str, *names: str, workers: tuple = ()) -> None:
    """No job left waiting; in lean mode, none left in a worker's hands either (a lean worker
    drops a job from its in-flight list in the same script that reports its outcome)."""
    for name in names or ("default",):
        if mode == "lean":
            assert client.llen(keys.lean_queue(name)) == 0, f"jobs left in {keys.lean_queue(name)}"
        else:
            assert Queue(name, connection=client, serializer=JSONSerializer).count == 0, f"jobs left in {name}"
    if mode == "lean":
        for worker in workers:
            for n in range(worker.concurrency):
                slot = keys.lean_slot(worker.name, n)
                assert client.llen(keys.inflight(slot)) == 0, f"jobs left in {slot}'s hands"


def test_example_dag_gives_the_same_results_as_a_local_run(redis_server, orch_workers, mode) -> None:
    workers = orch_workers(1, mode=mode)
    # The example as users write it: its tasks call get_task_result on the module-level workflow,
    # which locally holds the results (forked children inherit them) and on a worker reads Redis.
    wf = dist_tasks.workflow
    local = wf.run()
    assert states(wf) == {"extract": "success", "transform": "success"}
    results, _ = run(wf, redis_server.url, mode)

    assert results == local == dist_tasks.EXAMPLE_RESULTS
    assert states(wf) == {"extract": "success", "transform": "success"}
    assert all(task.attempts == 1 and task.error is None for task in wf)
    client = redis_server.client()
    assert read_run(client, wf.last_run_id).state == "success"
    assert {name: record["state"] for name, record in task_records(client, wf.last_run_id).items()} == {
        "extract": "success", "transform": "success"}
    assert read_result(client, wf.last_run_id, "transform") == [2, 4, 6, 8, 10]
    assert_queues_empty(client, mode, workers=workers)


def test_fan_out_of_100_tasks_over_4_workers(redis_server, orch_workers, mode) -> None:
    workers = orch_workers(4, mode=mode)
    n = 100
    wf = Workflow("fan-out")
    wf.add_task(Task("root", dist_tasks.root_value))
    for i in range(n):
        wf.add_task(Task(f"item{i}", dist_tasks.fan_item, dependencies=["root"], args=(i,)))
    wf.add_task(Task("join", dist_tasks.fan_join, dependencies=[f"item{i}" for i in range(n)], args=(n,)))

    results, elapsed = run(wf, redis_server.url, mode)

    assert len(results) == n + 2, sorted(set(wf.tasks) - set(results))
    assert all(results[f"item{i}"] == 7 + i for i in range(n))
    assert results["join"] == {"count": n, "sum": 7 * n + sum(range(n))}
    assert all(task.attempts == 1 for task in wf)
    assert elapsed < 60
    client = redis_server.client()
    assert state_counts(task_records(client, wf.last_run_id)) == {"success": n + 2}
    assert_queues_empty(client, mode, workers=workers)

    names = {w.name for w in workers}
    records = task_records(client, wf.last_run_id)
    if mode == "rq":
        # The work was shared: RQ counts each worker's successful jobs (give the last count a moment to land).
        deadline = time.monotonic() + 5
        while True:
            done = {w.name: w.successful_job_count for w in Worker.all(connection=client) if w.name in names}
            if sum(done.values()) >= n + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    else:
        # Lean workers keep no job counts: count the task records each worker's name is on.
        done = {name: sum(1 for record in records.values() if record["worker"] == name) for name in names}
    assert sum(done.values()) == n + 2, done
    assert sum(1 for count in done.values() if count > 0) >= 2, f"one worker ran everything: {done}"
    # The task records name the worker that ran each task.
    ran_by = {record["worker"] for record in records.values()}
    assert ran_by <= names and len(ran_by) >= 2, ran_by
    assert {task.worker for task in wf} == ran_by


def test_chain_of_20_tasks(redis_server, orch_workers, mode) -> None:
    orch_workers(2, mode=mode)
    wf = Workflow("chain")
    for i in range(20):
        wf.add_task(Task(f"step{i}", dist_tasks.chain_step, dependencies=[f"step{i - 1}"] if i else [], args=(i,)))
    wf.add_task(Task("end", dist_tasks.chain_end, dependencies=["step19"]))

    results, elapsed = run(wf, redis_server.url, mode)

    assert results == {**{f"step{i}": i for i in range(20)}, "end": 19}
    order = sorted(wf.tasks.values(), key=lambda t: t.started_at)
    assert [t.name for t in order] == [f"step{i}" for i in range(20)] + ["end"]
    for before, after in zip(order, order[1:]):
        assert after.started_at >= before.finished_at - 0.05, (before, after)
    assert elapsed < 60


def test_retry_waits_its_delay(redis_server, orch_workers, mode, tmp_path: Path) -> None:
    orch_workers(1, mode=mode)
    log = tmp_path / "attempts.log"
    wf = Workflow("retry")
    wf.add_task(Task("flaky", dist_tasks.fail_then_log, args=(str(log), 2), max_retries=2, retry_delay=0.5))

    results, _ = run(wf, redis_server.url, mode)

    flaky = wf.tasks["flaky"]
    assert results == {"flaky": 2}
    assert (flaky.state, flaky.attempts, flaky.error) == (TaskState.SUCCESS, 2, None)
    lines = dist_tasks.read_log(str(log))
    assert [text for text, _ in lines] == ["start 1", "end 1", "start 2", "end 2"]
    gap = lines[2][1] - lines[1][1]
    assert 0.5 <= gap <= 1.5, f"retry started {gap:.3f}s after the failed attempt ended"
    assert task_records(redis_server.client(), wf.last_run_id)["flaky"]["attempt"] == 2


def test_timeout_fails_the_attempt_and_the_worker_runs_the_next_task(redis_server, orch_workers, mode) -> None:
    (worker,) = orch_workers(1, mode=mode)
    wf = Workflow("timeout")
    wf.add_task(Task("slow", dist_tasks.sleep_for, args=(30,), timeout=1))
    wf.add_task(Task("next", dist_tasks.add, args=(2, 3)))  # queued behind 'slow' on the only worker

    results, elapsed = run(wf, redis_server.url, mode)

    slow, after = wf.tasks["slow"], wf.tasks["next"]
    assert slow.state is TaskState.FAILURE and slow.attempts == 1
    assert slow.error.startswith("TaskTimeout") and "timeout of 1s" in slow.error
    assert slow.duration is not None and slow.duration < 4, slow.duration
    assert results == {"next": 5}
    assert after.started_at >= slow.finished_at - 0.5
    assert elapsed < 15
    assert worker.alive()
    assert task_records(redis_server.client(), wf.last_run_id)["slow"]["error"] == slow.error


def test_task_that_swallows_its_timeout_is_killed_and_the_worker_survives(redis_server, orch_workers, mode) -> None:
    (worker,) = orch_workers(1, mode=mode)
    wf = Workflow("stubborn")
    wf.add_task(Task("stubborn", dist_tasks.swallow_everything, args=(60,), timeout=1))
    wf.add_task(Task("next", dist_tasks.add, args=(1, 1)))

    results, elapsed = run(wf, redis_server.url, mode)

    stubborn = wf.tasks["stubborn"]
    assert stubborn.state is TaskState.FAILURE and stubborn.attempts == 1
    assert stubborn.error.startswith("TaskTimeout") and "killed" in stubborn.error, stubborn.error
    if mode == "rq":
        # killed by the worker's parent kill_grace (2 s) after the timeout, checked every second
        assert stubborn.duration is not None and 2 <= stubborn.duration < 8, stubborn.duration
    else:
        # the lean worker's parent kills the work process at the timeout itself (nothing is raised in it);
        # the lower bound allows for the 'started' event reaching the coordinator late
        assert "timeout of 1s" in stubborn.error, stubborn.error
        assert stubborn.duration is not None and 0.5 <= stubborn.duration < 8, stubborn.duration
    assert results == {"next": 2}
    assert elapsed < 20
    assert worker.alive()


def test_work_horse_death_fails_the_task_and_the_worker_keeps_serving(redis_server, orch_workers, mode) -> None:
    (worker,) = orch_workers(1, mode=mode)
    wf = Workflow("crashes")
    wf.add_task(Task("exits", dist_tasks.exit_hard, args=(3,)))
    wf.add_task(Task("killed", dist_tasks.kill_self))
    wf.add_task(Task("child", dist_tasks.identity, dependencies=["killed"], args=(1,)))
    wf.add_task(Task("next", dist_tasks.add, args=(4, 4)))

    results, elapsed = run(wf, redis_server.url, mode)

    exits, killed = wf.tasks["exits"], wf.tasks["killed"]
    assert exits.state is TaskState.FAILURE and killed.state is TaskState.FAILURE
    assert "worker process died" in exits.error and "exit code 3" in exits.error, exits.error
    assert "worker process died" in killed.error and "signal 9" in killed.error, killed.error
    assert wf.tasks["child"].state is TaskState.FAILURE and "'killed'" in wf.tasks["child"].error
    assert results == {"next": 8}
    assert elapsed < 20
    assert worker.alive()
    records = task_records(redis_server.client(), wf.last_run_id)
    assert records["exits"]["error"] == exits.error and records["killed"]["error"] == killed.error


def test_failing_task_fails_its_dependents(redis_server, orch_workers, mode) -> None:
    orch_workers(2, mode=mode)
    wf = Workflow("failing")
    wf.add_task(Task("bad", dist_tasks.always_fail, args=("broken input",), max_retries=1, retry_delay=0.1))
    wf.add_task(Task("child", dist_tasks.identity, dependencies=["bad"], args=(1,)))
    wf.add_task(Task("grandchild", dist_tasks.identity, dependencies=["child"], args=(2,)))
    wf.add_task(Task("independent", dist_tasks.square, args=(12,)))

    results, _ = run(wf, redis_server.url, mode)

    bad = wf.tasks["bad"]
    assert results == {"independent": 144}
    assert bad.state is TaskState.FAILURE and bad.attempts == 2
    assert bad.error == "ValueError: broken input (attempt 2)"
    assert bad.traceback and "always_fail" in bad.traceback
    for name in ("child", "grandchild"):
        assert wf.tasks[name].state is TaskState.FAILURE and wf.tasks[name].attempts == 0
        assert "'bad'" in wf.tasks[name].error
    client = redis_server.client()
    assert read_run(client, wf.last_run_id).state == "failure"
    assert state_counts(task_records(client, wf.last_run_id)) == {"failure": 3, "success": 1}
    traceback = client.hget(keys.tracebacks(wf.last_run_id), "bad")
    assert traceback is not None and b"ValueError: broken input (attempt 2)" in traceback


def test_task_not_importable_on_the_worker_fails_clearly(redis_server, orch_workers, mode) -> None:
    (worker,) = orch_workers(1, mode=mode)
    wf = Workflow("missing")
    wf.add_task(Task("ghost", "dist_tasks:missing"))
    wf.add_task(Task("after", dist_tasks.identity, dependencies=["ghost"], args=(1,)))

    results, elapsed = run(wf, redis_server.url, mode)

    ghost = wf.tasks["ghost"]
    assert results == {}
    assert ghost.state is TaskState.FAILURE and ghost.attempts == 1
    assert "dist_tasks:missing" in ghost.error and "no attribute" in ghost.error, ghost.error
    assert wf.tasks["after"].state is TaskState.FAILURE
    assert elapsed < 15
    assert worker.alive()


def test_one_worker_with_concurrency_runs_tasks_in_parallel(redis_server, orch_workers, mode) -> None:
    (worker,) = orch_workers(1, mode=mode, concurrency=2)
    wf = Workflow("parallel")
    for i in range(4):
        wf.add_task(Task(f"sleep{i}", dist_tasks.sleep_for, args=(1.0,)))

    results, elapsed = run(wf, redis_server.url, mode)

    assert results == {f"sleep{i}": "slept" for i in range(4)}
    # At most 2 at a time, and 2 at some point (intervals shrunk by 0.1 s for clock jitter).
    edges = sorted([(t.started_at + 0.1, 1) for t in wf] + [(t.finished_at - 0.1, -1) for t in wf])
    running = most = 0
    for _, delta in edges:
        running += delta
        most = max(most, running)
    assert most == 2, [(t.name, t.started_at, t.finished_at) for t in wf]
    assert elapsed < 8, elapsed
    if mode == "rq":
        assert len({task.worker for task in wf}) == 2  # RQ: one registered worker per concurrency slot
    else:
        assert {task.worker for task in wf} == {worker.name}  # lean: one worker, two work processes


def test_redis_server_fixture_restarts_on_the_same_port(redis_server) -> None:
    """The fixture's stop()/start() that fault tests rely on: same port, same URL, server up again."""
    import redis

    client = redis_server.client(socket_connect_timeout=1)
    client.set("k", "v")
    port, url = redis_server.port, redis_server.url
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    redis_server.start()
    assert (redis_server.port, redis_server.url) == (port, url)
    assert redis.Redis.from_url(url).ping()
    assert client.get("k") is None  # started without persistence: an empty server
