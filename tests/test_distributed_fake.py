"""Distributed runs on fakeredis, in one process: fast, no subprocess, no real Redis.

The coordinator runs ``run_distributed`` with the real :class:`RQBackend` on a
FakeRedis client; an in-process RQ ``SimpleWorker`` (JSON serializer, as
``orch worker`` uses) executes the enqueued jobs. The backend is subclassed so
that each ``wait()`` first lets the worker drain the queues (``work(burst=True)``)
and then reads the outcomes with the parent's ``XREAD``: every step is the real
code path except the fork of a work horse.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import fakeredis
import pytest
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

import dist_tasks
from dist_tasks import run_meta, state_counts, task_records
import orchestrator.distributed as distributed
from orchestrator import Task, Workflow
from orchestrator.backends.rq import RQBackend
from orchestrator.run_store import read_result, read_run, request_cancel
from shared import codec, keys
from shared.config import Settings
from shared.errors import RunNotFoundError, SerializationError, UnimportableTasksError
from shared.states import RunState, TaskState
from shared.workers import RQ, WorkerInfo, beat

FAKE_URL = "redis://fake.invalid:6379/0"  # never dialled: the connection is passed in


class QuietSimpleWorker(SimpleWorker):
    """RQ's in-process worker, leaving the test process's SIGINT/SIGTERM handlers alone."""

    def _install_signal_handlers(self) -> None:
        pass


Hook = Callable[["RQBackend"], None]


class FakeCluster:
    """A FakeRedis server, a coordinator connection, and a worker pumped from the backend's ``wait``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, queues: tuple[str, ...] = ("default",)) -> None:
        self.server = fakeredis.FakeServer()
        self.conn = fakeredis.FakeRedis(server=self.server)
        self.queues = list(queues)
        self.hooks: list[Hook] = []
        """Called with the backend at the start of every ``wait()``, before the worker runs."""
        self.after_pump: list[Hook] = []
        """Called with the backend after the worker ran, just before the backend reads the stream."""
        self.pump_enabled = True
        self.waits = 0
        self.worker = QuietSimpleWorker(
            [Queue(q, connection=self.conn, serializer=JSONSerializer) for q in self.queues],
            connection=self.conn, serializer=JSONSerializer,
        )
        # Registered as a live RQ-mode worker, so submissions route these queues' jobs to RQ.
        beat(self.conn, WorkerInfo(self.worker.name, RQ, tuple(self.queues)), ttl=3600)
        self.registry_keys = set(self.conn.keys("*"))
        cluster = self

        class PumpedRQBackend(RQBackend):
            def wait(self, timeout: float):
                cluster.waits += 1
                for hook in list(cluster.hooks):
                    hook(self)
                if cluster.pump_enabled:
                    cluster.pump()
                cluster.pump_enabled = True
                for hook in list(cluster.after_pump):
                    hook(self)
                return super().wait(timeout)

        monkeypatch.setattr(distributed, "RQBackend", PumpedRQBackend)

    def pump(self) -> None:
        self.worker.work(burst=True, logging_level="WARNING")

    def run(self, workflow: Workflow, **options: Any) -> tuple[str, RunState]:
        for task in workflow.tasks.values():
            task.reset()
        return distributed.run_distributed(workflow, FAKE_URL, connection=self.conn, **options)

    def xadd(self, run_id: str, fields: dict) -> None:
        self.conn.xadd(keys.events(run_id), fields)

    def queue_length(self, name: str = "default") -> int:
        return Queue(name, connection=self.conn, serializer=JSONSerializer).count


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    return FakeCluster(monkeypatch, queues=("default", "io"))


def states(workflow: Workflow) -> dict[str, str]:
    return {name: task.state.value for name, task in workflow.tasks.items()}


def forged(run_id: str, task: str, attempt: int, status: str = "succeeded", **extra: Any) -> dict:
    fields = {"run": run_id, "task": task, "attempt": str(attempt), "status": status, "at": repr(time.time())}
    fields.update(extra)
    return fields


# ---------------------------------------------------------------------- the example
def test_example_dag_through_workflow_run(cluster: FakeCluster) -> None:
    wf = dist_tasks.make_example()
    submitted: list[str] = []
    results = wf.run(redis_url=FAKE_URL, connection=cluster.conn, on_submitted=submitted.append)

    assert results == dist_tasks.EXAMPLE_RESULTS
    assert submitted == [wf.last_run_id]
    for task in wf:
        assert task.state is TaskState.SUCCESS
        assert task.attempts == 1
        assert task.error is None and task.traceback is None
        assert task.started_at is not None and task.finished_at is not None
        assert task.finished_at >= task.started_at
    assert wf.tasks["transform"].started_at >= wf.tasks["extract"].finished_at - 0.01

    run = read_run(cluster.conn, wf.last_run_id)
    assert run.state == "success"
    assert run.workflow == "example"
    assert run.finished_at is not None and run.finished_at >= run.created_at
    assert run.cancelled_by is None
    assert json.loads(run_meta(cluster.conn, wf.last_run_id)["spec"])["names"] == ["extract", "transform"]
    records = task_records(cluster.conn, wf.last_run_id)
    assert {name: (r["state"], r["attempt"], r["error"]) for name, r in records.items()} == {
        "extract": ("success", 1, None), "transform": ("success", 1, None)}
    for name, value in dist_tasks.EXAMPLE_RESULTS.items():
        assert read_result(cluster.conn, wf.last_run_id, name) == value
    assert cluster.conn.hlen(keys.tracebacks(wf.last_run_id)) == 0
    assert cluster.queue_length() == 0


def test_results_are_codec_round_tripped(cluster: FakeCluster) -> None:
    """Non-JSON types the codec supports come back as themselves, through Redis."""
    import datetime
    import decimal

    value = {"t": (1, 2), "s": {3}, "b": b"\x00\xff", "d": datetime.date(2024, 1, 2),
             "n": decimal.Decimal("1.5"), 7: "int key"}
    wf = Workflow("codec")
    wf.add_task(Task("same", dist_tasks.identity, args=(value,)))
    run_id, state = cluster.run(wf)
    assert state is RunState.SUCCESS
    assert wf.tasks["same"].result == value
    assert read_result(cluster.conn, run_id, "same") == value


# ------------------------------------------------------------------------- failures
def test_failing_task_is_retried_with_delay_then_fails_its_dependents(cluster: FakeCluster) -> None:
    wf = Workflow("failing")
    wf.add_task(Task("bad", dist_tasks.always_fail, max_retries=2, retry_delay=0.15))
    wf.add_task(Task("child", dist_tasks.identity, dependencies=["bad"], args=(1,)))
    wf.add_task(Task("grandchild", dist_tasks.identity, dependencies=["child"], args=(2,)))
    wf.add_task(Task("other", dist_tasks.square, args=(9,)))
    wf.add_task(Task("flaky", dist_tasks.fail_until, args=(2,), max_retries=3, queue="io"))

    started = time.monotonic()
    run_id, state = cluster.run(wf)
    elapsed = time.monotonic() - started

    assert state is RunState.FAILURE
    assert elapsed >= 0.3 - 0.02, "two retry delays of 0.15 s were not waited"
    assert elapsed < 10
    bad = wf.tasks["bad"]
    assert bad.state is TaskState.FAILURE
    assert bad.attempts == 3  # max_retries + 1
    assert bad.error == "ValueError: boom (attempt 3)"
    assert bad.traceback and "ValueError: boom (attempt 3)" in bad.traceback and "always_fail" in bad.traceback
    for name in ("child", "grandchild"):
        task = wf.tasks[name]
        assert task.state is TaskState.FAILURE
        assert task.attempts == 0
        assert "'bad'" in task.error and "fail" in task.error
        assert task.traceback is None
    assert wf.tasks["other"].state is TaskState.SUCCESS and wf.tasks["other"].result == 81
    flaky = wf.tasks["flaky"]
    assert (flaky.state, flaky.attempts, flaky.result, flaky.error) == (TaskState.SUCCESS, 2, 2, None)
    assert wf.results == {"other": 81, "flaky": 2}

    assert read_run(cluster.conn, run_id).state == "failure"
    records = task_records(cluster.conn, run_id)
    assert records["bad"] == {**records["bad"], "state": "failure", "attempt": 3,
                              "error": "ValueError: boom (attempt 3)"}
    assert records["child"]["state"] == "failure" and "'bad'" in records["child"]["error"]
    assert records["flaky"]["state"] == "success" and records["flaky"]["attempt"] == 2
    assert state_counts(records) == {"failure": 3, "success": 2}
    tracebacks = {k.decode(): v.decode() for k, v in cluster.conn.hgetall(keys.tracebacks(run_id)).items()}
    assert set(tracebacks) >= {"bad"}
    assert "ValueError: boom (attempt 3)" in tracebacks["bad"]
    assert "child" not in tracebacks and "grandchild" not in tracebacks
    assert cluster.conn.hkeys(keys.results(run_id)) and set(
        k.decode() for k in cluster.conn.hkeys(keys.results(run_id))) == {"other", "flaky"}


def test_keys_get_retention_ttl_when_the_run_finishes(cluster: FakeCluster) -> None:
    wf = Workflow("ttl")
    wf.add_task(Task("ok", dist_tasks.add, args=(1, 2)))
    wf.add_task(Task("bad", dist_tasks.always_fail))
    during: list[tuple] = []

    def look(backend: RQBackend) -> None:
        # While the run is going: no TTL yet, the run is active and its coordinator holds the lease.
        during.append((cluster.conn.ttl(keys.run(backend.run_id)),
                       cluster.conn.sismember(keys.ACTIVE, backend.run_id),
                       cluster.conn.exists(keys.lease(backend.run_id))))

    cluster.hooks.append(look)
    run_id, state = cluster.run(wf, settings=Settings(retention=1234))

    assert state is RunState.FAILURE
    assert during and all(seen == (-1, 1, 1) for seen in during), during
    assert not cluster.conn.sismember(keys.ACTIVE, run_id)
    assert not cluster.conn.exists(keys.lease(run_id))
    for key in keys.all_of_run(run_id):
        if key == keys.maps(run_id):  # kept only by runs with mapped tasks
            assert not cluster.conn.exists(key)
            continue
        assert cluster.conn.exists(key), f"{key} missing"
        assert 1200 <= cluster.conn.ttl(key) <= 1234, key
    assert cluster.conn.ttl(keys.RUNS) == -1  # the index of runs is shared, never expires
    assert cluster.conn.zscore(keys.RUNS, run_id) is not None
    meta = {k.decode(): v.decode() for k, v in cluster.conn.hgetall(keys.run(run_id)).items()}
    assert meta["state"] == "failure" and meta["total"] == "2" and meta["workflow"] == "ttl"
    assert json.loads(meta["counts"]) == {"success": 1, "failure": 1}
    assert json.loads(meta["spec"])["names"] == ["ok", "bad"]


def test_unserializable_result_is_a_task_failure(cluster: FakeCluster) -> None:
    wf = Workflow("unserializable")
    wf.add_task(Task("obj", dist_tasks.unserializable_result))
    wf.add_task(Task("after", dist_tasks.identity, dependencies=["obj"], args=(1,)))
    run_id, state = cluster.run(wf)
    assert state is RunState.FAILURE
    obj = wf.tasks["obj"]
    assert obj.state is TaskState.FAILURE and obj.attempts == 1
    assert obj.error.startswith("SerializationError:")
    assert "'obj'" in obj.error and "cannot serialize" in obj.error and "object" in obj.error
    assert wf.tasks["after"].state is TaskState.FAILURE and "'obj'" in wf.tasks["after"].error
    assert task_records(cluster.conn, run_id)["obj"]["error"] == obj.error
    assert cluster.conn.hget(keys.results(run_id), "obj") is None


def test_result_over_the_size_limit_is_a_task_failure(cluster: FakeCluster) -> None:
    wf = Workflow("big")
    wf.add_task(Task("big", dist_tasks.big_result, args=(1000,)))
    wf.add_task(Task("small", dist_tasks.big_result, args=(10,)))
    run_id, state = cluster.run(wf, settings=Settings(max_result_bytes=100))
    assert state is RunState.FAILURE
    big = wf.tasks["big"]
    assert big.state is TaskState.FAILURE
    assert "SerializationError" in big.error and "over the limit of 100" in big.error and "'big'" in big.error
    assert wf.tasks["small"].state is TaskState.SUCCESS and wf.tasks["small"].result == "x" * 10
    assert cluster.conn.hget(keys.results(run_id), "big") is None


def test_task_timeout_in_the_job_function(cluster: FakeCluster) -> None:
    """The job function's own sub-second limit (here in the in-process worker's main thread)."""
    wf = Workflow("timeout")
    wf.add_task(Task("slow", dist_tasks.sleep_for, args=(5,), timeout=0.3))
    started = time.monotonic()
    run_id, state = cluster.run(wf)
    assert time.monotonic() - started < 3
    slow = wf.tasks["slow"]
    assert state is RunState.FAILURE and slow.state is TaskState.FAILURE
    assert slow.error.startswith("TaskTimeout") and "0.3" in slow.error


@pytest.mark.parametrize("ref, words", [
    ("no_such_module:func", ["no_such_module:func", "No module named"]),
    ("dist_tasks:missing", ["dist_tasks:missing", "no attribute"]),
])
def test_task_not_importable_on_the_worker_fails_naming_it(cluster: FakeCluster, ref: str, words: list) -> None:
    wf = Workflow("unimportable-on-worker")
    wf.add_task(Task("ghost", ref))
    wf.add_task(Task("after", dist_tasks.identity, dependencies=["ghost"], args=(1,)))
    wf.add_task(Task("fine", dist_tasks.add, args=(2, 3)))
    run_id, state = cluster.run(wf)
    assert state is RunState.FAILURE
    ghost = wf.tasks["ghost"]
    assert ghost.state is TaskState.FAILURE and ghost.attempts == 1
    assert ghost.error.startswith("TaskImportError")
    for word in words:
        assert word in ghost.error
    assert wf.tasks["after"].state is TaskState.FAILURE
    assert wf.tasks["fine"].result == 5
    assert task_records(cluster.conn, run_id)["ghost"]["error"] == ghost.error


# ------------------------------------------------------------- refused before writing
def _closure_task() -> Callable[[], int]:
    def inner() -> int:
        return 1
    return inner


def _main_function() -> Callable[[], int]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def main_func():\n    return 1\n", namespace)
    return namespace["main_func"]


def test_unimportable_tasks_are_refused_and_nothing_is_written(cluster: FakeCluster) -> None:
    wf = Workflow("unimportable")
    wf.add_task(Task("lam", lambda: 1))
    wf.add_task(Task("clo", _closure_task()))
    wf.add_task(Task("mainf", _main_function()))
    wf.add_task(Task("good", dist_tasks.identity, args=(1,)))
    with pytest.raises(UnimportableTasksError) as info:
        cluster.run(wf)
    message = str(info.value)
    assert [name for name, _ in info.value.problems] == ["lam", "clo", "mainf"]
    for name, why in [("lam", "lambda"), ("clo", "closure"), ("mainf", "__main__")]:
        assert f"task {name!r}" in message
        assert why in dict(info.value.problems)[name]
    assert "'good'" not in message
    assert set(cluster.conn.keys("*")) == cluster.registry_keys  # nothing but the worker's registration
    assert cluster.waits == 0
    assert all(task.state is TaskState.PENDING for task in wf)


def test_unencodable_arguments_are_refused_and_nothing_is_written(cluster: FakeCluster) -> None:
    wf = Workflow("unencodable")
    wf.add_task(Task("first", dist_tasks.identity, args=(1,)))
    wf.add_task(Task("bad_args", dist_tasks.identity, kwargs={"value": object()}))
    with pytest.raises(SerializationError) as info:
        cluster.run(wf)
    assert "'bad_args'" in str(info.value) and "object" in str(info.value)
    assert set(cluster.conn.keys("*")) == cluster.registry_keys
    assert cluster.waits == 0


# -------------------------------------------------------------- the event stream
def test_garbage_and_forged_events_are_ignored_with_a_log_line(
        cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="orch.coordinator")
    wf = dist_tasks.make_example()
    injected: list[str] = []

    def inject(backend: RQBackend) -> None:
        if injected:
            return
        injected.append(backend.run_id)
        run_id = backend.run_id
        cluster.xadd(run_id, {"hello": "world"})  # not an outcome at all
        cluster.xadd(run_id, {**forged(run_id, "extract", 1), "attempt": "one"})  # attempt not a number
        cluster.xadd(run_id, forged(run_id, "extract", 0))  # attempt < 1
        cluster.xadd(run_id, forged(run_id, "extract", 1, status="exploded"))  # unknown status
        cluster.xadd(run_id, forged(run_id, "extract", 1, kind="meltdown", status="failed"))  # unknown kind
        cluster.xadd(run_id, forged("some-other-run", "extract", 1, result=codec.encode("x")))  # other run
        cluster.xadd(run_id, forged(run_id, "no_such_task", 1, result=codec.encode("x")))  # unknown task
        cluster.xadd(run_id, {"status": "succeeded", "task": "extract", "attempt": "1"})  # no run, no at

    cluster.hooks.append(inject)
    run_id, state = cluster.run(wf)

    assert state is RunState.SUCCESS
    assert wf.results == dist_tasks.EXAMPLE_RESULTS
    assert all(task.attempts == 1 for task in wf)
    ignored = [r for r in caplog.records if r.name == "orch.coordinator" and "ignored" in r.getMessage()]
    assert len(ignored) == 8, [r.getMessage() for r in ignored]
    assert all(run_id in r.getMessage() for r in ignored)
    assert any("some-other-run" in r.getMessage() for r in ignored)
    assert any("no_such_task" in r.getMessage() for r in ignored)
    assert read_run(cluster.conn, run_id).state == "success"


def test_garbage_event_written_by_a_task_is_ignored(cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    """An entry XADDed from inside a running task (as a worker could) costs a log line, nothing more."""
    caplog.set_level(logging.ERROR, logger="orch.coordinator")
    wf = Workflow("task-writes-garbage")
    wf.add_task(Task("writer", dist_tasks.write_garbage_event))
    wf.add_task(Task("after", dist_tasks.identity, dependencies=["writer"], args=("done",)))
    run_id, state = cluster.run(wf)
    assert state is RunState.SUCCESS, {t.name: t.error for t in wf}
    assert wf.results == {"writer": "wrote", "after": "done"}
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_stale_outcomes_are_ignored(cluster: FakeCluster) -> None:
    wf = Workflow("stale")
    wf.add_task(Task("flaky", dist_tasks.fail_until, args=(2,), max_retries=1, retry_delay=0.2))
    wf.add_task(Task("after", dist_tasks.identity, dependencies=["flaky"], args=("real",)))
    done: set[str] = set()

    def inject(backend: RQBackend) -> None:
        run_id = backend.run_id
        if "early" not in done:
            done.add("early")
            # 'after' is pending (attempt 0): a report about its attempt 1 is not current
            cluster.xadd(run_id, forged(run_id, "after", 1, result=codec.encode("forged-after")))
            # 'flaky' is on attempt 1: reports about attempts 2 and 7 are not current
            cluster.xadd(run_id, forged(run_id, "flaky", 7, result=codec.encode("forged-7")))
            cluster.xadd(run_id, forged(run_id, "flaky", 2, status="started"))
        if wf.tasks["flaky"].state is TaskState.RETRYING and "late" not in done:
            done.add("late")
            # attempt 1 failed and was superseded: a late success for it must not count
            cluster.xadd(run_id, forged(run_id, "flaky", 1, result=codec.encode("forged-late")))

    cluster.hooks.append(inject)
    run_id, state = cluster.run(wf)

    assert done == {"early", "late"}
    assert state is RunState.SUCCESS
    assert wf.tasks["flaky"].result == 2 and wf.tasks["flaky"].attempts == 2
    assert wf.tasks["after"].result == "real" and wf.tasks["after"].attempts == 1
    assert read_result(cluster.conn, run_id, "flaky") == 2
    assert read_result(cluster.conn, run_id, "after") == "real"


# Regression tests: the coordinator once kept only the last event of each task in a batch, so a task whose
# started + succeeded outcomes came in one read lost its worker, and one whose success was followed by a
# stale or duplicate outcome in the same read lost its result.
def test_task_records_name_the_worker_that_ran_them(cluster: FakeCluster) -> None:
    """In this harness a task's started and succeeded outcomes always arrive in one read."""
    wf = dist_tasks.make_example()
    run_id, state = cluster.run(wf)
    assert state is RunState.SUCCESS
    assert {task.worker for task in wf} == {cluster.worker.name}
    assert {r["worker"] for r in task_records(cluster.conn, run_id).values()} == {cluster.worker.name}


def test_duplicate_outcome_right_after_a_success_keeps_the_result(cluster: FakeCluster) -> None:
    """An attempt reported twice (RQ may run a job twice after a reconnect) must not lose the result."""
    wf = dist_tasks.make_example()
    sent: list[str] = []

    def duplicate(backend: RQBackend) -> None:
        if not sent:
            sent.append(backend.run_id)
            # lands in the same read as extract's own started + succeeded entries
            cluster.xadd(backend.run_id, forged(backend.run_id, "extract", 1, status="started", worker="twin"))

    cluster.after_pump.append(duplicate)
    run_id, state = cluster.run(wf)
    assert wf.tasks["extract"].result == dist_tasks.EXAMPLE_RESULTS["extract"]
    assert read_result(cluster.conn, run_id, "extract") == dist_tasks.EXAMPLE_RESULTS["extract"]
    assert state is RunState.SUCCESS and wf.results == dist_tasks.EXAMPLE_RESULTS


# ------------------------------------------------------------------ isolation of runs
def test_two_runs_of_one_workflow_have_distinct_ids_and_results(cluster: FakeCluster) -> None:
    wf = Workflow("twice")
    wf.add_task(Task("extract", dist_tasks.extract_value, args=(1,)))
    wf.add_task(Task("transform", dist_tasks.transform_value, dependencies=["extract"]))
    first_id, state = cluster.run(wf)
    assert state is RunState.SUCCESS and wf.results["transform"] == {"seen": 1}
    wf.tasks["extract"].args = (2,)
    second_id, state = cluster.run(wf)
    assert state is RunState.SUCCESS and wf.results["transform"] == {"seen": 2}

    assert first_id != second_id
    assert read_result(cluster.conn, first_id, "transform") == {"seen": 1}
    assert read_result(cluster.conn, second_id, "transform") == {"seen": 2}
    assert read_result(cluster.conn, first_id, "extract") == {"data": 1}
    assert read_result(cluster.conn, second_id, "extract") == {"data": 2}
    assert {r.decode() for r in cluster.conn.zrange(keys.RUNS, 0, -1)} == {first_id, second_id}


def test_interleaved_runs_do_not_see_each_other(cluster: FakeCluster) -> None:
    """Run B is submitted and run to its end while run A has jobs queued; one worker serves both."""
    def make(value: int) -> Workflow:
        wf = Workflow("interleaved")
        wf.add_task(Task("extract", dist_tasks.extract_value, args=(value,)))
        wf.add_task(Task("transform", dist_tasks.transform_value, dependencies=["extract"]))
        return wf

    outer, inner = make(1), make(2)
    inner_ids: list[str] = []

    def nested(backend: RQBackend) -> None:
        if not inner_ids:
            inner_ids.append("running")
            inner_ids[0] = cluster.run(inner)[0]

    cluster.hooks.append(nested)
    outer_id, state = cluster.run(outer)

    assert state is RunState.SUCCESS
    assert inner_ids[0] != outer_id
    assert outer.results == {"extract": {"data": 1}, "transform": {"seen": 1}}
    assert inner.results == {"extract": {"data": 2}, "transform": {"seen": 2}}
    assert read_result(cluster.conn, outer_id, "transform") == {"seen": 1}
    assert read_result(cluster.conn, inner_ids[0], "transform") == {"seen": 2}


# ------------------------------------------------------------------------ cancelling
def test_cancel_request_cancels_unfinished_tasks(cluster: FakeCluster, tmp_path) -> None:
    marker = tmp_path / "b-ran"
    wf = Workflow("cancel")
    wf.add_task(Task("a", dist_tasks.add, args=(1, 1)))
    wf.add_task(Task("b", dist_tasks.write_pid, dependencies=["a"], args=(str(marker),)))
    wf.add_task(Task("c", dist_tasks.identity, dependencies=["b"], args=(3,)))
    cancelled: list[str] = []

    def cancel_after_a(backend: RQBackend) -> None:
        if wf.tasks["a"].state is TaskState.SUCCESS and not cancelled:
            cancelled.append(backend.run_id)
            assert wf.tasks["b"].state is TaskState.QUEUED
            request_cancel(cluster.conn, backend.run_id, "alice")
            cluster.pump_enabled = False  # the coordinator reads the request before b can start

    cluster.hooks.append(cancel_after_a)
    run_id, state = cluster.run(wf)

    assert cancelled == [run_id]
    assert state is RunState.CANCELLED
    assert states(wf) == {"a": "success", "b": "cancelled", "c": "cancelled"}
    assert wf.tasks["a"].result == 2
    for name in ("b", "c"):
        assert wf.tasks[name].error == "cancelled by alice"
        assert wf.tasks[name].finished_at is not None
    assert not marker.exists(), "the cancelled task's queued job still ran"
    assert cluster.queue_length() == 0, "the cancelled task's job was left in its queue"
    cluster.pump()  # nothing left for a worker to pick up
    assert not marker.exists()

    run = read_run(cluster.conn, run_id)
    assert run.state == "cancelled"
    assert run.cancelled_by == "alice"
    records = task_records(cluster.conn, run_id)
    assert {n: r["state"] for n, r in records.items()} == {"a": "success", "b": "cancelled", "c": "cancelled"}
    assert records["b"]["error"] == "cancelled by alice"


def test_cancel_of_a_running_task_ignores_its_late_result(cluster: FakeCluster) -> None:
    """The cancel request is read before the outcome of the attempt in flight: that attempt stays cancelled."""
    wf = Workflow("cancel-running")
    wf.add_task(Task("a", dist_tasks.add, args=(1, 1)))
    wf.add_task(Task("b", dist_tasks.identity, dependencies=["a"], args=("late",)))

    def cancel_once(backend: RQBackend) -> None:
        if wf.tasks["a"].state is TaskState.SUCCESS and not backend.__dict__.get("cancelled"):
            backend.__dict__["cancelled"] = True
            request_cancel(cluster.conn, backend.run_id, "bob")  # then b runs and reports success

    cluster.hooks.append(cancel_once)
    run_id, state = cluster.run(wf)
    assert state is RunState.CANCELLED
    assert states(wf) == {"a": "success", "b": "cancelled"}
    assert wf.tasks["b"].result is None
    assert cluster.conn.hget(keys.results(run_id), "b") is None
    assert read_run(cluster.conn, run_id).cancelled_by == "bob"


def test_cancel_of_an_unknown_run_raises(cluster: FakeCluster) -> None:
    with pytest.raises(RunNotFoundError):
        request_cancel(cluster.conn, "20000101T000000-000000000000", "alice")
    assert set(cluster.conn.keys("*")) == cluster.registry_keys


# ------------------------------------------------------ successes written with the next step
def test_successes_that_start_nothing_wait_for_the_next_write_and_survive_the_coordinator(monkeypatch) -> None:
    """A step that only records successes is kept in memory (the outcomes stay in the stream past the
    stored ``last_event``) and written with the next step that sends jobs, or after DEFER_WRITES; a
    coordinator that dies meanwhile loses nothing: its successor reads those outcomes again."""
    from orchestrator.backends import rq as rq_backend
    from orchestrator.coordinator import Coordinator
    from orchestrator.lease import Lease
    from orchestrator.scheduler import Scheduler
    from shared.messages import SUCCEEDED, Outcome

    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    beat(conn, WorkerInfo("w", RQ, ("default",)), ttl=3600)
    wf = Workflow("deferred")
    for name in ("x", "y", "z"):
        wf.add_task(Task(name, dist_tasks.identity, args=(name,)))
    wf.add_task(Task("after_x", dist_tasks.identity, ["x"], args=(1,)))
    lease = Lease(conn, "", Settings().lease_ttl)
    submission = distributed.submit_run(wf, conn, lease=lease)
    run_id = submission.run_id
    backend = RQBackend(conn, run_id, wf.tasks, submission.specs, lease=lease)
    coordinator = Coordinator(wf.tasks, backend, scheduler=Scheduler(wf.tasks.values(), submission.graph))
    coordinator.apply(coordinator.scheduler.start(time.time()))

    def report(task: str, value: str) -> None:
        outcome = Outcome(run_id=run_id, task=task, attempt=1, status=SUCCEEDED, at=time.time(),
                          result=codec.encode(value), worker="w")
        conn.xadd(keys.events(run_id), outcome.to_fields())

    def stored_state(task: str) -> str:
        return json.loads(conn.hget(keys.tasks(run_id), task))["state"]

    report("y", "Y")
    coordinator._step(backend.wait(0))
    assert wf.tasks["y"].state is TaskState.SUCCESS
    assert stored_state("y") == "queued" and conn.hget(keys.results(run_id), "y") is None, "not written yet"
    last_written = run_meta(conn, run_id)["last_event"]

    monkeypatch.setattr(rq_backend, "DEFER_WRITES", 0.0)
    backend.wait(0)  # due: written on its own
    assert stored_state("y") == "success" and codec.decode(conn.hget(keys.results(run_id), "y")) == "Y"
    assert run_meta(conn, run_id)["last_event"] != last_written
    monkeypatch.setattr(rq_backend, "DEFER_WRITES", 60.0)

    report("x", "X")  # sends after_x: written at once, with the success that released it
    coordinator._step(backend.wait(0))
    assert stored_state("x") == "success" and stored_state("after_x") == "queued"

    report("after_x", "done")
    coordinator._step(backend.wait(0))
    assert stored_state("after_x") == "queued", "deferred, then the coordinator dies"
    conn.delete(keys.lease(run_id))  # its lease lapses

    successor, tasks = distributed.restore_coordinator(conn, run_id, Lease(conn, run_id, 30.0))
    assert successor.backend.lease.acquire()
    report("z", "Z")
    assert successor.run() is RunState.SUCCESS
    assert {name: read_result(conn, run_id, name) for name in tasks} == {"x": "X", "y": "Y", "z": "Z",
                                                                         "after_x": "done"}
    assert {stored_state(name) for name in tasks} == {"success"}


def test_after_a_read_of_only_starts_the_coordinator_lets_reports_gather_before_reading_again(monkeypatch) -> None:
    """Starts are never urgent: a read that brought only starts is followed by a START_BATCH pause (the
    next reports then come in one read); a read with an outcome in it is followed by none."""
    from orchestrator.backends import rq as rq_backend
    from orchestrator.lease import Lease
    from shared.events import TaskStarted, TaskSucceeded
    from shared.messages import STARTED, SUCCEEDED, Outcome

    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    beat(conn, WorkerInfo("w", RQ, ("default",)), ttl=3600)
    wf = Workflow("pauses")
    wf.add_task(Task("x", dist_tasks.identity, args=(1,)))
    lease = Lease(conn, "", Settings().lease_ttl)
    submission = distributed.submit_run(wf, conn, lease=lease)
    backend = RQBackend(conn, submission.run_id, wf.tasks, submission.specs, lease=lease)
    pauses: list[float] = []
    monkeypatch.setattr(rq_backend.time, "sleep", pauses.append)

    def report(status: str) -> None:
        outcome = Outcome(run_id=submission.run_id, task="x", attempt=1, status=status, at=time.time(),
                          result=codec.encode(1) if status == SUCCEEDED else None, worker="w")
        conn.xadd(keys.events(submission.run_id), outcome.to_fields())

    report(STARTED)
    assert [type(e) for e in backend.wait(0.5)] == [TaskStarted] and pauses == []
    report(SUCCEEDED)
    assert [type(e) for e in backend.wait(0.5)] == [TaskSucceeded] and pauses == [rq_backend.START_BATCH]
    report(STARTED)
    backend.wait(0.5)
    assert pauses == [rq_backend.START_BATCH], "no pause after a read that brought an outcome"
