"""Prometheus metrics: the aggregation (pure), the Redis hash and its flush script (fakeredis), the
exposition parsed back with prometheus_client's parser, and a distributed run on fakeredis."""
from __future__ import annotations

import threading
from typing import Any

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import dist_tasks
import orchestrator.distributed as distributed
from orchestrator import Task, Workflow
from orchestrator import metrics_store as store
from orchestrator.actions import RunFinished, RunRerun, Transition
from orchestrator.coordinator import Step
from orchestrator.metrics import CONTENT_TYPE, cumulative_buckets, metrics_text, waiting_unserved
from shared import keys
from shared.states import FailureKind, RunState, TaskState
from shared.workers import LEAN, RQ, WorkerInfo, beat
from test_distributed_fake import FakeCluster

P, Q, R, T = TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING
S, F, C, K = TaskState.SUCCESS, TaskState.FAILURE, TaskState.CANCELLED, TaskState.SKIPPED


def samples(connection: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape: (sample name, sorted labels) -> value."""
    body, content_type = metrics_text(connection)
    assert content_type == CONTENT_TYPE
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------------- pure aggregation
def test_field_round_trips_any_label_characters() -> None:
    field = store.metric_field(store.TASK_ATTEMPTS, 'wf "x"', "a:b,c]\n", "success")
    assert store.parse_field(field) == (store.TASK_ATTEMPTS, ('wf "x"', "a:b,c]\n", "success"))
    assert store.parse_field(field.encode()) == store.parse_field(field)
    for junk in (b"", b"nope", b"[]", b'["a", 1]', b'{"a": 1}', b"\xff"):
        with pytest.raises(ValueError):
            store.parse_field(junk)


@pytest.mark.parametrize("seconds, le", [(0.0, "0.01"), (0.01, "0.01"), (0.0100001, "0.05"), (3600.0, "3600.0"),
                                         (3600.5, "+Inf"), (-2.0, "0.01")])
def test_an_observation_lands_in_the_first_bucket_at_or_above_it(seconds: float, le: str) -> None:
    tally = store.Tally()
    tally.observe(store.TASK_DURATION, ["wf", "t"], seconds)
    assert tally.take() == {store.metric_field(store.TASK_DURATION + store.BUCKET, "wf", "t", le): 1.0,
                            store.metric_field(store.TASK_DURATION + store.SUM, "wf", "t"): max(0.0, seconds)}
    assert not tally


def test_cumulative_buckets_add_up_to_the_count() -> None:
    pairs = cumulative_buckets({"0.5": 2.0, "+Inf": 1.0, "10.0": 3.0}, store.DURATION_BUCKETS)
    assert pairs[0] == ("0.01", 0.0)
    assert dict(pairs)["0.5"] == 2.0 and dict(pairs)["5.0"] == 2.0 and dict(pairs)["10.0"] == 5.0
    assert pairs[-1] == ("+Inf", 6.0)
    regrouped = dict(cumulative_buckets({"0.3": 1.0, "7.0": 1.0, "1e9": 1.0, "junk": 5.0}, store.DURATION_BUCKETS))
    assert (regrouped["0.25"], regrouped["0.5"], regrouped["10.0"], regrouped["+Inf"]) == (0.0, 1.0, 2.0, 3.0)


class FakeTask:
    def __init__(self, map_over: tuple = (), map_parent: Any = None) -> None:
        self.map_over, self.map_parent = map_over, map_parent


def test_a_step_counts_the_attempts_that_ended_and_nothing_else() -> None:
    tasks = {"a": FakeTask(), "b": FakeTask(), "c": FakeTask(), "d": FakeTask(), "e": FakeTask(),
             "m": FakeTask(map_over=("a",)), "m[0]": FakeTask(map_parent="m"), "m[1]": FakeTask(map_parent="m")}
    step = Step(transitions=[
        Transition("a", R, S, 1, 10.0),
        Transition("b", R, T, 1, 10.0, "ValueError: x", FailureKind.ERROR),
        Transition("c", R, F, 2, 10.0, "lost", FailureKind.LOST),
        Transition("d", Q, C, 1, 10.0, "cancelled", FailureKind.CANCELLED),
        Transition("e", P, F, 0, 10.0, "upstream", FailureKind.UPSTREAM),  # never ran: not an attempt
        Transition("e", P, Q, 1, 10.0),  # a dispatch, and a start: not ends
        Transition("a", Q, R, 1, 10.0),
        Transition("m", R, S, 1, 10.0),  # the mapped task itself: its children are its attempts
        Transition("m[0]", R, S, 1, 10.0),
        Transition("m[1]", R, K, 1, 10.0),
        Transition("zzz", R, S, 1, 10.0),  # not a task of the run: ignored
    ], attempt_starts={"a": 9.75, "b": 4.0, "m[0]": 9.0}, finished=RunFinished(RunState.FAILURE, 10.0),
        rerun=RunRerun(1.0))
    tally = store.Tally()
    store.tally_step(tally, "wf", step, tasks)
    got = {store.parse_field(field): amount for field, amount in tally.take().items()}
    assert got == {
        (store.TASK_ATTEMPTS, ("wf", "a", "success")): 1.0,
        (store.TASK_ATTEMPTS, ("wf", "b", "error")): 1.0,
        (store.TASK_RETRIES, ("wf", "b")): 1.0,
        (store.TASK_ATTEMPTS, ("wf", "c", "lost")): 1.0,
        (store.TASK_ATTEMPTS, ("wf", "d", "cancelled")): 1.0,
        (store.TASK_ATTEMPTS, ("wf", "m", "success")): 1.0,
        (store.TASK_ATTEMPTS, ("wf", "m", "skipped")): 1.0,
        (store.TASK_DURATION + store.BUCKET, ("wf", "a", "0.25")): 1.0,
        (store.TASK_DURATION + store.SUM, ("wf", "a")): 0.25,
        (store.TASK_DURATION + store.BUCKET, ("wf", "b", "10.0")): 1.0,
        (store.TASK_DURATION + store.SUM, ("wf", "b")): 6.0,
        (store.TASK_DURATION + store.BUCKET, ("wf", "m", "1.0")): 1.0,
        (store.TASK_DURATION + store.SUM, ("wf", "m")): 1.0,
        (store.RUNS_FINISHED, ("wf", "failure")): 1.0,
        (store.RUN_RETRIES, ("wf",)): 1.0,
    }


# --------------------------------------------------------------- the hash and its flush
def test_flush_adds_many_fields_atomically_across_writers() -> None:
    server = fakeredis.FakeServer()
    conn = fakeredis.FakeRedis(server=server)
    fields = {store.metric_field(store.TASK_ATTEMPTS, "wf", f"t{i}", "success"): 1.0
              for i in range(store.FIELDS_PER_CALL * 2 + 7)}
    writers = [threading.Thread(target=store.add_to_metrics, args=(fakeredis.FakeRedis(server=server), fields))
               for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stored = conn.hgetall(keys.METRICS)
    assert len(stored) == len(fields)
    assert {float(v) for v in stored.values()} == {4.0}
    assert all(v == b"4" for v in stored.values()), "whole numbers are stored as such"
    store.add_to_metrics(conn, {store.metric_field(store.TASK_DURATION + store.SUM, "wf", "t"): 0.1})
    store.add_to_metrics(conn, {store.metric_field(store.TASK_DURATION + store.SUM, "wf", "t"): 0.2})
    assert float(conn.hget(keys.METRICS, store.metric_field(store.TASK_DURATION + store.SUM, "wf", "t"))) == 0.1 + 0.2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_run_metrics_flush_at_most_once_a_second_and_keep_what_a_failed_flush_held() -> None:
    server = fakeredis.FakeServer()
    conn = fakeredis.FakeRedis(server=server)
    clock = Clock()
    metrics = store.RunMetrics(conn, "wf", {"a": FakeTask()}, clock=clock)
    metrics.count(Step(transitions=[Transition("a", R, S, 1, 10.0)]))
    metrics.flush_if_due()
    assert not conn.exists(keys.METRICS), "flushed before its interval"
    clock.now += store.FLUSH_INTERVAL
    metrics.flush_if_due()
    field = store.metric_field(store.TASK_ATTEMPTS, "wf", "a", "success")
    assert conn.hget(keys.METRICS, field) == b"1"

    metrics.count(Step(transitions=[Transition("a", R, S, 1, 10.0)]))
    server.connected = False
    with pytest.raises(redis.ConnectionError):
        metrics.flush()
    server.connected = True
    metrics.count(Step(transitions=[Transition("a", R, S, 1, 10.0)]))
    metrics.flush()
    assert conn.hget(keys.METRICS, field) == b"3"


def test_a_large_flush_goes_a_thousand_fields_a_call_and_a_cut_keeps_the_unsent(monkeypatch) -> None:
    server = fakeredis.FakeServer()
    conn = fakeredis.FakeRedis(server=server)
    names = [f"t{i}" for i in range(2 * store.FIELDS_PER_CALL + 500)]
    metrics = store.RunMetrics(conn, "wf", {name: FakeTask() for name in names})
    metrics.count(Step(transitions=[Transition(name, R, S, 1, 10.0) for name in names]))
    sizes: list[int] = []
    add = metrics._add

    def counted(increments: dict) -> None:
        sizes.append(len(increments))
        if len(sizes) == 2:
            raise redis.ConnectionError("cut")
        add(increments)

    monkeypatch.setattr(metrics, "_add", counted)
    with pytest.raises(redis.ConnectionError):  # the second call is cut off: the first went through
        metrics.flush()
    assert sizes[0] == store.FIELDS_PER_CALL and len(metrics.tally.pending) == len(names) - store.FIELDS_PER_CALL
    metrics.flush()
    assert sizes[2:] == [store.FIELDS_PER_CALL, 500]
    stored = {store.parse_field(f)[1][1] for f in conn.hkeys(keys.METRICS)
              if store.parse_field(f)[0] == store.TASK_ATTEMPTS}
    assert stored == set(names)
    assert all(conn.hget(keys.METRICS, store.metric_field(store.TASK_ATTEMPTS, "wf", n, "success")) == b"1"
               for n in names)


def test_a_refused_flush_is_logged_and_dropped_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    conn = fakeredis.FakeRedis()
    metrics = store.RunMetrics(conn, "wf", {"a": FakeTask()})
    metrics.count(Step(transitions=[Transition("a", R, S, 1, 10.0)]))
    conn.set(keys.METRICS, "not a hash")  # WRONGTYPE: what a refusal (OOM, NOPERM) looks like to the flush
    with caplog.at_level("WARNING", logger="orch.metrics"):
        metrics.flush()
    assert "metrics of workflow 'wf': Redis refused 1 increments" in caplog.text
    assert not metrics.tally


def test_schedule_lag_is_recorded_on_a_pipeline_with_its_round_trip() -> None:
    conn = fakeredis.FakeRedis()
    pipe = conn.pipeline(transaction=True)
    store.record_schedule_lag(pipe, "nightly", 0.3)
    store.record_schedule_lag(pipe, "nightly", 42.0)
    assert not conn.exists(keys.METRICS)
    pipe.execute()
    store.record_schedule_lag(conn, "hourly", 0.01)
    for command in store.schedule_lag_commands("hourly", 7.0):
        conn.execute_command(*command)
    found = samples(conn)
    assert value(found, "orch_schedule_lag_seconds_count", schedule="nightly") == 2
    assert value(found, "orch_schedule_lag_seconds_sum", schedule="nightly") == pytest.approx(42.3)
    assert value(found, "orch_schedule_lag_seconds_bucket", schedule="nightly", le="0.5") == 1
    assert value(found, "orch_schedule_lag_seconds_bucket", schedule="nightly", le="60.0") == 2
    assert value(found, "orch_schedule_lag_seconds_count", schedule="hourly") == 2
    assert value(found, "orch_schedule_lag_seconds_sum", schedule="hourly") == pytest.approx(7.01)


def test_damaged_fields_are_skipped_not_fatal() -> None:
    conn = fakeredis.FakeRedis()
    conn.hset(keys.METRICS, mapping={"garbage": "1", store.metric_field(store.RUNS_STARTED, "wf"): "x",
                                     store.metric_field(store.RUNS_STARTED, "a", "b"): "1",
                                     store.metric_field(store.RUNS_STARTED, "ok"): "2"})
    found = samples(conn)
    assert value(found, "orch_runs_started_total", workflow="ok") == 2
    assert [k for k in found if k[0] == "orch_runs_started_total"] == [("orch_runs_started_total",
                                                                       (("workflow", "ok"),))]


# ------------------------------------------------------------------------------- gauges
def test_queue_gauges_say_which_waiting_jobs_no_live_worker_runs() -> None:
    conn = fakeredis.FakeRedis()
    conn.rpush(keys.lean_queue("gpu"), "a", "b", "c")
    conn.sadd(keys.QUEUES, "gpu", "idle")
    conn.rpush("rq:queue:mixed", "j1", "j2")
    conn.sadd("rq:queues", "rq:queue:mixed")
    conn.rpush(keys.lean_queue("mixed"), "x")
    beat(conn, WorkerInfo("w-lean", LEAN, ("mixed", "default")), ttl=60)
    found = samples(conn)
    assert value(found, "orch_queue_depth", queue="gpu") == 3
    assert value(found, "orch_queue_unserved_tasks", queue="gpu") == 3
    assert value(found, "orch_queue_depth", queue="mixed") == 3
    assert value(found, "orch_queue_unserved_tasks", queue="mixed") == 2, "RQ jobs with only a lean worker"
    assert {("orch_queue_depth", (("queue", q),)) for q in ("default", "idle")} <= set(found)
    assert value(found, "orch_workers_alive", kind="lean") == 1
    assert value(found, "orch_workers_alive", kind="rq") == 0

    beat(conn, WorkerInfo("w-gpu", RQ, ("gpu", "mixed")), ttl=60)
    found = samples(conn)
    assert value(found, "orch_queue_unserved_tasks", queue="gpu") == 3, "lean jobs with only an RQ worker"
    assert value(found, "orch_queue_unserved_tasks", queue="mixed") == 0
    assert value(found, "orch_workers_alive", kind="rq") == 1


def test_waiting_unserved_is_pure() -> None:
    workers = [WorkerInfo("a", LEAN, ("q",)), WorkerInfo("b", RQ, ("r",))]
    assert waiting_unserved("q", 2, 5, workers) == 5
    assert waiting_unserved("r", 2, 5, workers) == 2
    assert waiting_unserved("s", 2, 5, workers) == 7
    assert waiting_unserved("s", 0, 0, []) == 0


# ---------------------------------------------------- a distributed run on fakeredis
@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    return FakeCluster(monkeypatch, queues=("default", "io"))


def test_a_distributed_run_keeps_its_counters_in_redis(cluster: FakeCluster) -> None:
    wf = Workflow("metered")
    wf.add_task(Task("ok", dist_tasks.square, args=(3,)))
    wf.add_task(Task("flaky", dist_tasks.fail_until, args=(2,), max_retries=2, retry_delay=0.01, queue="io"))
    wf.add_task(Task("bad", dist_tasks.always_fail))
    wf.add_task(Task("after_bad", dist_tasks.identity, args=(1,), dependencies=["bad"]))
    run_id, state = cluster.run(wf)
    assert state is RunState.FAILURE
    found = samples(cluster.conn)
    assert value(found, "orch_runs_started_total", workflow="metered") == 1
    assert value(found, "orch_runs_finished_total", workflow="metered", state="failure") == 1
    assert value(found, "orch_task_attempts_total", workflow="metered", task="ok", outcome="success") == 1
    assert value(found, "orch_task_attempts_total", workflow="metered", task="flaky", outcome="error") == 1
    assert value(found, "orch_task_attempts_total", workflow="metered", task="flaky", outcome="success") == 1
    assert value(found, "orch_task_retries_total", workflow="metered", task="flaky") == 1
    assert value(found, "orch_task_attempts_total", workflow="metered", task="bad", outcome="error") == 1
    assert value(found, "orch_task_retries_total", workflow="metered", task="bad") == 0
    assert not [k for k in found if dict(k[1]).get("task") == "after_bad"], "an upstream failure is no attempt"
    assert value(found, "orch_task_duration_seconds_count", workflow="metered", task="flaky") == 2
    assert value(found, "orch_task_duration_seconds_count", workflow="metered", task="ok") == 1
    assert 0 <= value(found, "orch_task_duration_seconds_sum", workflow="metered", task="ok") < 5
    assert cluster.conn.smembers(keys.QUEUES) == {b"default", b"io"}

    state, _ = distributed.retry_run(cluster.conn, run_id)  # a rerun from failure: adopted from Redis alone
    assert state is RunState.FAILURE
    found = samples(cluster.conn)
    assert value(found, "orch_run_retries_total", workflow="metered") == 1
    assert value(found, "orch_runs_started_total", workflow="metered") == 1
    assert value(found, "orch_runs_finished_total", workflow="metered", state="failure") == 2
    assert value(found, "orch_task_attempts_total", workflow="metered", task="bad", outcome="error") == 2
    assert value(found, "orch_task_attempts_total", workflow="metered", task="flaky", outcome="error") == 1

    cluster.run(wf)
    found = samples(cluster.conn)
    assert value(found, "orch_runs_started_total", workflow="metered") == 2
    assert value(found, "orch_runs_finished_total", workflow="metered", state="failure") == 3
    assert value(found, "orch_task_attempts_total", workflow="metered", task="flaky", outcome="error") == 2


def test_a_scheduled_run_counts_as_started_through_the_schedules_fenced_commit(tmp_path: Any) -> None:
    from orchestrator.schedules import add_schedule, trigger_schedule

    conn = fakeredis.FakeRedis()
    add_schedule(conn, "nightly", "schedule_tasks:marking", every=3600, params={"directory": str(tmp_path)})
    run_id = trigger_schedule(conn, "nightly")
    workflow = conn.hget(keys.run(run_id), "workflow").decode()
    found = samples(conn)
    assert value(found, "orch_runs_started_total", workflow=workflow) == 1
    assert value(found, "orch_runs_active") == 1
    assert ("orch_queue_depth", (("queue", "default"),)) in found
