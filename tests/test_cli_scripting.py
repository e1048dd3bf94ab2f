"""A CLI that scripts can rely on: exit codes, ``--wait``, ``--json`` shapes, filters, 80 columns,
and ``orch resume`` right after its coordinator died. Real redis-server and ``orch worker``s."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from bench.procs import orch_command
from orchestrator.cli import main
from orchestrator.report import runs_table
from orchestrator.run_store import RunSnapshot
from shared import keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TESTS = Path(__file__).parent


def invoke(*args: str, url: str):
    return CliRunner().invoke(main, [*args, "--redis-url", url], catch_exceptions=False)


def submit_and_wait(url: str, target: str) -> str:
    done = invoke("submit", str(TESTS / target), "-q", url=url)
    run_id = next(line.split()[-1] for line in done.output.splitlines() if line.startswith("run id: "))
    return run_id


def test_status_json_and_exit_codes(redis_server, orch_workers) -> None:
    orch_workers(1)
    url = redis_server.url
    run_id = submit_and_wait(url, "dist_tasks.py:make_example")
    result = invoke("status", run_id, "--json", url=url)
    assert result.exit_code == 0
    document = json.loads(result.output)
    assert set(document) >= {"run_id", "workflow", "state", "params", "created_at", "finished_at", "tasks"}
    assert document["run_id"] == run_id and document["workflow"] == "example" and document["state"] == "success"
    assert isinstance(document["created_at"], float) and document["finished_at"] >= document["created_at"]
    assert [t["name"] for t in document["tasks"]] == ["extract", "transform"], "in execution order"
    for task in document["tasks"]:
        assert set(task) >= {"name", "state", "attempts", "worker", "started_at", "finished_at", "duration", "error"}
        assert task["state"] == "success" and task["attempts"] == 1 and task["error"] is None
        assert task["duration"] >= 0 and task["worker"]
    assert invoke("status", run_id, "--wait", url=url).exit_code == 0, "--wait: 0 for a run that succeeded"

    failing = submit_and_wait(url, "dist_tasks.py:make_failing")
    assert invoke("status", failing, url=url).exit_code == 0
    assert invoke("status", failing, "--wait", url=url).exit_code == 1
    unknown = CliRunner().invoke(main, ["status", "nope", "--json", "--redis-url", url])
    assert unknown.exit_code == 2 and "error: no run 'nope' in this Redis" in unknown.output


def test_status_wait_blocks_until_the_run_is_final(redis_server, orch_workers) -> None:
    orch_workers(1)
    url = redis_server.url
    detached = invoke("submit", str(TESTS / "dist_tasks.py:make_one_nap"), "--detach", url=url)
    run_id = detached.output.strip().splitlines()[-1]
    coordinator = subprocess.Popen([*orch_command(), "coordinator", "--redis-url", url, "--poll", "0.2"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        started = time.monotonic()
        waited = subprocess.run([*orch_command(), "status", run_id, "--wait", "--json", "--redis-url", url],
                                capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        coordinator.terminate()
        coordinator.wait(10)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "success"
    assert elapsed >= 1.5, "returned before the 2 s task could have finished"


def test_runs_filters_and_json(redis_server, orch_workers) -> None:
    orch_workers(1)
    url = redis_server.url
    good = [submit_and_wait(url, "dist_tasks.py:make_example") for _ in range(2)]
    bad = submit_and_wait(url, "dist_tasks.py:make_failing")
    listed = json.loads(invoke("runs", "--json", url=url).output)
    assert [r["run_id"] for r in listed] == [bad, *reversed(good)], "newest first"
    for entry in listed:
        assert set(entry) >= {"run_id", "workflow", "state", "created_at", "finished_at", "counts"}
    assert listed[0]["counts"] == {"success": 1, "failure": 2}
    assert [r["run_id"] for r in json.loads(invoke("runs", "--json", "--state", "failure", url=url).output)] == [bad]
    only_example = json.loads(invoke("runs", "--json", "--workflow", "example", "--limit", "1", url=url).output)
    assert [r["run_id"] for r in only_example] == [good[-1]]
    assert json.loads(invoke("runs", "--json", "--workflow", "nope", url=url).output) == []
    text = invoke("runs", "--state", "success", url=url)
    assert text.exit_code == 0 and good[0] in text.output and bad not in text.output


def test_runs_table_fits_80_columns_without_splitting_words() -> None:
    snapshots = [RunSnapshot("20261201T231351-3dc4dbe28c3c", "nightly-etl-of-the-warehouse", "cancelled",
                             time.time(), None, None,
                             {"success": 120, "failure": 3, "pending": 40, "running": 4, "queued": 2}),
                 RunSnapshot("20261201T231352-3dc4dbe28c3d", "example", "success", time.time(), time.time(), None,
                             {"success": 2})]
    console = Console(width=80, record=True, force_terminal=False)
    console.print(runs_table(snapshots))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    for whole in ("20261201T231351-3dc4dbe28c3c", "cancelled", "120 success", "40 pending", "2 queued",
                  "4 running", "3 failure", "2 success"):
        assert whole in text, f"{whole!r} was split or cut:\n{text}"


def foreground_submit(url: str, target: str, env: dict, client) -> tuple[subprocess.Popen, str]:
    """``orch submit TARGET`` in its own session (so it can be killed whole); returns it and its run id."""
    process = subprocess.Popen([*orch_command(), "submit", str(TESTS / target), "-q", "--redis-url", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
                               text=True)
    deadline = time.monotonic() + 30
    while not client.zcard(keys.RUNS):
        assert time.monotonic() < deadline, "the run was never written"
        time.sleep(0.05)
    return process, client.zrange(keys.RUNS, 0, 0)[0].decode()


def test_resume_right_after_the_coordinator_died_waits_for_its_lease(redis_server, orch_workers, tmp_path) -> None:
    orch_workers(1)
    url = redis_server.url
    env = {**os.environ, "ORCH_LEASE_TTL": "8", "PYTHONPATH": str(TESTS)}  # still held when resume starts
    submit, run_id = foreground_submit(url, "dist_tasks.py:make_busy_three", env, redis_server.client())
    client = redis_server.client()
    while not client.exists(keys.lease(run_id)):
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(submit.pid, signal.SIGKILL)
    submit.wait(10)
    assert client.exists(keys.lease(run_id)), "the dead coordinator's lease is still held"
    resumed = subprocess.run([*orch_command(), "resume", run_id, "-q", "--redis-url", url], capture_output=True,
                             text=True, timeout=60, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "waiting up to 9s for it to lapse" in resumed.stderr
    assert client.hget(keys.run(run_id), "state") == b"success"


def test_resume_refuses_a_run_a_live_coordinator_drives(redis_server, orch_workers) -> None:
    orch_workers(1)
    url = redis_server.url
    env = {**os.environ, "ORCH_LEASE_TTL": "2", "PYTHONPATH": str(TESTS)}
    driving, run_id = foreground_submit(url, "dist_tasks.py:make_slow_chain", env, redis_server.client())
    try:
        refused = subprocess.run([*orch_command(), "resume", run_id, "-q", "--redis-url", url],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert lines[-1].startswith("error: run ") and "lease" in lines[-1], refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        driving.terminate()
        driving.wait(30)
