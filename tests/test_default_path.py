"""The defaults work together, a run never waits in silence, and the RQ path is one setting.

Real ``redis-server``, real ``orch worker`` and ``orch submit`` processes:

- ``orch worker`` and ``orch submit`` with no options run a workflow together
  (the lean path, which is the default);
- a run whose tasks wait on a queue that no live worker serves says so within
  5 s, in the progress output, in ``orch status`` and in the run record, and
  finishes once a worker of either kind comes (jobs sent before an RQ-mode
  worker appeared are moved to RQ's queue);
- a queue whose workers are merely busy is no warning;
- ``orch worker --mode rq`` is seen by RQ's own ``rq info``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.procs import orch_command
from dist_tasks import run_meta, task_records
from fault_helpers import wait_for
from shared import keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TESTS = Path(__file__).parent


def submit(url: str, target: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``orch submit TARGET`` in the background, stderr to a file (not a terminal: one line per event)."""
    err = tmp_path / "submit.err"
    process = subprocess.Popen([*orch_command(), "submit", str(TESTS / target), "--redis-url", url],
                               stdout=subprocess.PIPE, stderr=open(err, "wb"), stdin=subprocess.DEVNULL,
                               cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(TESTS)},
                               start_new_session=True)
    return process, err


def run_id_of(err: Path) -> str:
    for line in err.read_text().splitlines():
        if line.startswith("run id: "):
            return line.split()[-1]
    return ""


def finish(process: subprocess.Popen, seconds: float = 60) -> str:
    try:
        out, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return out.decode()


def test_default_worker_and_default_submit_run_together(redis_server, orch_workers, tmp_path) -> None:
    worker, = orch_workers(1)  # `orch worker --redis-url URL --path tests`: no mode option
    assert "--mode" not in " ".join(worker.process.args)
    process, err = submit(redis_server.url, "dist_tasks.py:make_example", tmp_path)
    out = finish(process)
    assert process.returncode == 0, err.read_text()[-2000:]
    assert "transform" in out and "success" in out
    client = redis_server.client()
    run_id = run_id_of(err)
    assert run_meta(client, run_id)["transport"] == "auto"
    assert {r["worker"] for r in task_records(client, run_id).values()} == {worker.name}
    assert "warning" not in err.read_text()


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_run_on_a_queue_nobody_serves_says_so_then_finishes_when_a_worker_comes(
        redis_server, orch_workers, tmp_path, mode) -> None:
    orch_workers(1, mode="lean")  # serves 'default' only: live, but not for 'gpu'
    client = redis_server.client()
    process, err = submit(redis_server.url, "dist_tasks.py:make_on_gpu", tmp_path)
    started = time.monotonic()
    try:
        run_id = wait_for(lambda: run_id_of(err), 30, "the run id on stderr")
        wait_for(lambda: "warning: 1 task waiting on queue 'gpu': no live worker serves it" in err.read_text(),
                 5 + (time.monotonic() - started), "the warning in the progress output")
        assert run_meta(client, run_id)["warning"] == "1 task waiting on queue 'gpu': no live worker serves it"
        status = subprocess.run([*orch_command(), "status", run_id, "--redis-url", redis_server.url],
                                capture_output=True, text=True, timeout=30)
        assert "warning: 1 task waiting on queue 'gpu': no live worker serves it" in status.stdout
        assert "first" in status.stdout and "queued" in status.stdout
        time.sleep(1.5)
        assert process.poll() is None, "the run goes on waiting: a worker may come"

        orch_workers(1, mode=mode, queues=["gpu"])
        out = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.read_text()[-2000:]
    assert "second" in out
    assert "every waiting task has a live worker again" in err.read_text()
    assert "warning" not in run_meta(client, run_id)
    if mode == "rq":
        # Sent as a lean job while no worker served 'gpu', moved to RQ's queue when the RQ worker came.
        assert client.llen(keys.lean_queue("gpu")) == 0
        assert client.exists(f"rq:job:{keys.job_id(run_id, 0, 1)}")


def test_busy_workers_are_not_a_warning(redis_server, orch_workers, tmp_path) -> None:
    orch_workers(1, mode="lean", concurrency=1)
    client = redis_server.client()
    process, err = submit(redis_server.url, "dist_tasks.py:make_busy_three", tmp_path)
    run_id = wait_for(lambda: run_id_of(err), 30, "the run id on stderr")
    while process.poll() is None:
        assert "warning" not in run_meta(client, run_id), "tasks waiting for a busy worker are no warning"
        time.sleep(0.2)
    assert process.returncode == 0, err.read_text()[-2000:]
    assert "warning" not in err.read_text()


def test_the_rq_path_is_one_worker_option_and_rq_info_sees_it(redis_server, orch_workers, tmp_path) -> None:
    worker, = orch_workers(1, mode="rq")
    process, err = submit(redis_server.url, "dist_tasks.py:make_example", tmp_path)
    finish(process)
    assert process.returncode == 0, err.read_text()[-2000:]
    run_id = run_id_of(err)
    assert client_has_rq_job(redis_server, run_id), "the run's jobs went through RQ"
    rq = shutil.which("rq") or str(Path(sys.executable).with_name("rq"))
    info = subprocess.run([rq, "info", "--url", redis_server.url], capture_output=True, text=True, timeout=30)
    assert info.returncode == 0, info.stderr
    assert "default" in info.stdout
    assert worker.name in info.stdout


def client_has_rq_job(redis_server, run_id: str) -> bool:
    client = redis_server.client()
    return bool(client.exists(f"rq:job:{keys.job_id(run_id, 0, 1)}"))


def test_a_running_task_is_recorded_running_within_a_second(redis_server, orch_workers, tmp_path) -> None:
    """Nothing else happens in this run while its one task sleeps: the 'running' record must not
    wait for a next event (it used to, so `orch status` showed the task queued until it ended)."""
    worker, = orch_workers(1)
    client = redis_server.client()
    process, err = submit(redis_server.url, "dist_tasks.py:make_one_nap", tmp_path)
    run_id = wait_for(lambda: run_id_of(err), 30, "the run id on stderr")
    record = wait_for(lambda: task_records(client, run_id).get("nap", {}).get("state") == "running"
                      and task_records(client, run_id)["nap"], 20, "'nap' recorded running")
    seen_at = time.time()
    assert record["worker"] == worker.name
    assert seen_at - record["started_at"] < 1.0 + 0.5, "recorded running more than a second after it started"
    assert process.poll() is None, "seen running while it still runs"
    finish(process)
    assert process.returncode == 0, err.read_text()[-2000:]
