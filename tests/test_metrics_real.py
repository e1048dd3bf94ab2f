"""``orch coordinator --metrics-port`` with a real redis-server and real ``orch worker`` processes:
workflows that succeed, fail, retry and map, then ``/metrics`` fetched over HTTP, parsed with
prometheus_client's parser and checked against the runs done; the counters survive a restart."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dist_tasks
from bench.procs import free_port, orch_command, send_signal
from orchestrator import Task, Workflow
from orchestrator.distributed import run_distributed
from orchestrator.metrics import metrics_text
from orchestrator.metrics_store import (TASK_ATTEMPTS, add_to_metrics, count_run_started, metric_field,
                                        record_schedule_lag)
from orchestrator.run_views import wait_until_final
from shared.connection import connect
from shared.states import RunState
from shared.workers import WorkerInfo, beat
from tests.test_acl import acl_server, url  # noqa: F401  (a fixture, and the README users' URLs)
from tests.test_redis_access import started  # noqa: F401  (the fixture acl_server uses)

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsCoordinator:
    """One ``orch coordinator --metrics-port PORT`` process (its own session)."""

    def __init__(self, url: str, port: int, directory: Path) -> None:
        self.url, self.port, self.directory = url, port, directory
        self.process: Optional[subprocess.Popen] = None
        self.log_path = directory / f"coordinator-{port}.log"

    def command(self) -> list[str]:
        return [*orch_command(), "coordinator", "--redis-url", self.url, "--poll", "0.1",
                "--metrics-port", str(self.port)]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=str(self.directory),
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.scrape()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"orch coordinator --metrics-port did not serve:\n{self.log()}", pytrace=False)
                time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        send_signal(process.pid, signal.SIGINT, group=True)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            send_signal(process.pid, signal.SIGKILL, group=True)
            process.wait(timeout=10)

    def scrape(self) -> tuple[str, Samples]:
        """``(content type, samples)`` of one GET /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            body, content_type = reply.read().decode(), reply.headers["Content-Type"]
        return content_type, {(s.name, tuple(sorted(s.labels.items()))): s.value
                              for family in text_string_to_metric_families(body) for s in family.samples}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture
def metrics_coordinator(redis_server: Any, tmp_path: Path) -> Iterator[Callable[[], MetricsCoordinator]]:
    started: list[MetricsCoordinator] = []

    def start() -> MetricsCoordinator:
        coordinator = MetricsCoordinator(redis_server.url, free_port(), tmp_path)
        started.append(coordinator)
        coordinator.start()
        return coordinator

    try:
        yield start
    finally:
        for coordinator in started:
            coordinator.stop()
            print(f"----- log of orch coordinator :{coordinator.port} -----\n{coordinator.log()}")


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def workflows() -> list[Workflow]:
    ok = Workflow("m-ok")
    ok.add_task(Task("first", dist_tasks.square, args=(3,)))
    ok.add_task(Task("second", dist_tasks.identity, args=(1,), dependencies=["first"]))
    flaky = Workflow("m-flaky")
    flaky.add_task(Task("flaky", dist_tasks.fail_until, args=(2,), max_retries=2, retry_delay=0.05))
    bad = Workflow("m-bad")
    bad.add_task(Task("bad", dist_tasks.always_fail))
    bad.add_task(Task("never", dist_tasks.identity, args=(1,), dependencies=["bad"]))
    mapped = Workflow("m-map")
    mapped.add_task(Task("items", "authoring_tasks:numbers", args=(4,)))
    mapped.add_task(Task("inverse", "map_helpers:inverse", ["items"], map_over="items"))
    return [ok, flaky, bad, mapped]


def test_metrics_over_http_match_the_runs_done_and_survive_a_restart(redis_server, orch_workers,
                                                                     metrics_coordinator) -> None:
    orch_workers(1, concurrency=2)
    coordinator = metrics_coordinator()
    client = redis_server.client()
    ok, flaky, bad, mapped = workflows()
    # Two paths: this process coordinates some runs itself; the service adopts the detached ones.
    assert run_distributed(ok, redis_server.url)[1] is RunState.SUCCESS
    assert run_distributed(ok, redis_server.url)[1] is RunState.SUCCESS
    assert run_distributed(flaky, redis_server.url)[1] is RunState.SUCCESS
    detached = [run_distributed(wf, redis_server.url, detach=True)[0] for wf in (bad, mapped)]
    assert [wait_until_final(client, run_id, poll=0.05) for run_id in detached] == ["failure", "failure"]
    record_schedule_lag(client, "nightly", 1.5)

    content_type, found = coordinator.scrape()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(found, "orch_runs_started_total", workflow="m-ok") == 2
    assert value(found, "orch_runs_finished_total", workflow="m-ok", state="success") == 2
    assert value(found, "orch_task_attempts_total", workflow="m-ok", task="second", outcome="success") == 2
    assert value(found, "orch_task_duration_seconds_count", workflow="m-ok", task="first") == 2
    assert 0 < value(found, "orch_task_duration_seconds_sum", workflow="m-ok", task="first") < 30
    assert value(found, "orch_task_attempts_total", workflow="m-flaky", task="flaky", outcome="error") == 1
    assert value(found, "orch_task_attempts_total", workflow="m-flaky", task="flaky", outcome="success") == 1
    assert value(found, "orch_task_retries_total", workflow="m-flaky", task="flaky") == 1
    assert value(found, "orch_runs_finished_total", workflow="m-bad", state="failure") == 1
    assert value(found, "orch_task_attempts_total", workflow="m-bad", task="bad", outcome="error") == 1
    assert not [key for key in found if ("task", "never") in key[1]], "a task that never ran has no attempt"
    # a mapped task's children count under its name: inverse(0) fails, the other three succeed
    assert value(found, "orch_task_attempts_total", workflow="m-map", task="inverse", outcome="success") == 3
    assert value(found, "orch_task_attempts_total", workflow="m-map", task="inverse", outcome="error") == 1
    assert value(found, "orch_runs_finished_total", workflow="m-map", state="failure") == 1
    assert value(found, "orch_schedule_lag_seconds_count", schedule="nightly") == 1
    assert value(found, "orch_workers_alive", kind="lean") == 1
    assert value(found, "orch_queue_depth", queue="default") == 0
    assert value(found, "orch_runs_active") == 0

    # A task on a queue no live worker serves: waiting, and said so.
    stuck = Workflow("m-stuck")
    stuck.add_task(Task("waits", dist_tasks.identity, args=(1,), queue="nobody"))
    stuck_id = run_distributed(stuck, redis_server.url, detach=True)[0]
    deadline = time.monotonic() + 20
    while value(coordinator.scrape()[1], "orch_queue_unserved_tasks", queue="nobody") != 1:
        assert time.monotonic() < deadline, "the waiting task was never reported unserved"
        time.sleep(0.1)
    found = coordinator.scrape()[1]
    assert value(found, "orch_queue_depth", queue="nobody") == 1
    assert value(found, "orch_queue_unserved_tasks", queue="default") == 0
    assert value(found, "orch_runs_active") == 1

    counters = {key: v for key, v in found.items() if key[0].endswith(("_total", "_count", "_sum", "_bucket"))}
    coordinator.stop()
    coordinator.start()
    after = coordinator.scrape()[1]
    assert {key: v for key, v in after.items() if key in counters} == counters
    assert subprocess.run([*orch_command(), "cancel", stuck_id, "--redis-url", redis_server.url],
                          capture_output=True, timeout=60).returncode == 0
    assert wait_until_final(client, stuck_id, poll=0.05) == "cancelled"
    deadline = time.monotonic() + 10
    while value(coordinator.scrape()[1], "orch_runs_finished_total", workflow="m-stuck", state="cancelled") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert value(coordinator.scrape()[1], "orch_queue_depth", queue="nobody") == 0
    client.close()


def test_a_taken_metrics_port_is_one_clear_error(redis_server, metrics_coordinator, tmp_path: Path) -> None:
    first = metrics_coordinator()
    second = subprocess.run(MetricsCoordinator(redis_server.url, first.port, tmp_path).command(),
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert second.returncode == 2
    assert f"error: cannot serve metrics on 127.0.0.1:{first.port}: " in second.stderr
    assert "pick a free --metrics-port" in second.stderr
    assert "Traceback" not in second.stderr


def test_the_readme_acl_users_can_keep_and_read_metrics(acl_server: str) -> None:
    """The coordinator user can flush (Lua, HMGET, HSET) and count a run; the read-only user can scrape."""
    coordinator = connect(url("coordinator", acl_server))
    add_to_metrics(coordinator, {metric_field(TASK_ATTEMPTS, "wf", "t", "success"): 2.0})
    pipe = coordinator.pipeline(transaction=True)
    count_run_started(pipe, "wf", ["default"])
    pipe.execute()
    record_schedule_lag(coordinator, "nightly", 0.2)
    beat(coordinator, WorkerInfo("w1", "lean", ("default",)), ttl=60)
    reader = connect(url("reader", acl_server))
    body, _ = metrics_text(reader)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert value(found, "orch_task_attempts_total", workflow="wf", task="t", outcome="success") == 2
    assert value(found, "orch_runs_started_total", workflow="wf") == 1
    assert value(found, "orch_schedule_lag_seconds_count", schedule="nightly") == 1
    assert value(found, "orch_workers_alive", kind="lean") == 1
    assert ("orch_queue_depth", (("queue", "default"),)) in found
    coordinator.close()
    reader.close()
