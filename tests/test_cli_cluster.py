"""``orch status``, ``orch runs``, ``orch cancel``, ``orch submit --detach`` against a real redis-server.

No worker is needed: a detached run waits in Redis until something drives it,
and ``orch cancel`` of a run that nobody drives adopts it and cancels it itself.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main
from shared import keys

TESTS = Path(__file__).parent
TARGET = str(TESTS / "dist_tasks.py:make_example")


def invoke(*args: str, url: str):
    return CliRunner().invoke(main, [*args, "--redis-url", url], catch_exceptions=False)


def test_detach_status_runs_cancel(redis_server) -> None:
    url = redis_server.url
    submitted = invoke("submit", TARGET, "--detach", url=url)
    assert submitted.exit_code == 0, submitted.output
    run_id = submitted.output.strip().splitlines()[-1]
    client = redis_server.client()
    assert client.sismember(keys.ACTIVE, run_id)
    assert not client.exists(keys.lease(run_id)), "a detached run must wait for a coordinator"

    status = invoke("status", run_id, url=url)
    assert status.exit_code == 0, "a run it could show exits 0, whatever its state"
    assert f"run {run_id} (example): running" in status.output
    assert "extract" in status.output and "transform" in status.output
    assert "2 tasks: 2 pending" in status.output, "nothing is dispatched before a coordinator drives the run"

    runs = invoke("runs", url=url)
    assert runs.exit_code == 0 and run_id in runs.output

    cancelled = invoke("cancel", run_id, url=url)
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled (no coordinator was driving it)" in cancelled.output
    meta = {k.decode(): v.decode() for k, v in client.hgetall(keys.run(run_id)).items()}
    assert meta["state"] == "cancelled"
    assert meta["cancelled_by"].startswith("orch cancel by ")
    assert float(meta["cancelled_at"]) > 0
    assert not client.sismember(keys.ACTIVE, run_id)
    assert client.llen("rq:queue:default") == 0, "nothing may be enqueued for a cancelled run"

    after = invoke("status", run_id, url=url)
    assert after.exit_code == 0
    assert invoke("status", run_id, "--wait", url=url).exit_code == 1, "--wait: 1 for a cancelled run"
    assert "cancelled by orch cancel by" in after.output
    assert after.output.count("cancelled") >= 3


def test_unknown_run_and_unreachable_redis_exit_2(redis_server) -> None:
    unknown = CliRunner().invoke(main, ["status", "nope", "--redis-url", redis_server.url])
    assert unknown.exit_code == 2
    assert "error: no run 'nope' in this Redis" in unknown.output
    for command in (["runs"], ["status", "x"], ["cancel", "x"], ["resume", "x"]):
        result = subprocess.run([sys.executable, "-m", "orchestrator", *command, "--redis-url",
                                 "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")
    malformed = subprocess.run([sys.executable, "-m", "orchestrator", "runs", "--redis-url", "http://x"],
                               capture_output=True, text=True, timeout=60)
    assert malformed.returncode == 2 and malformed.stderr.startswith("error: malformed Redis URL 'http://x'")


def test_commands_that_need_redis_say_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORCH_REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", "orchestrator", "runs"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 2
    assert "needs Redis: pass --redis-url URL or set ORCH_REDIS_URL" in result.stderr


def test_lean_worker_burst_runs_what_is_queued_then_exits(redis_server) -> None:
    from shared.messages import Outcome
    from shared.jobs import job_message

    from orchestrator.run_store import open_event_stream

    client = redis_server.client()
    open_event_stream(client, "burst-run")  # as the run's coordinator does: workers report only to it
    client.rpush(keys.lean_queue("default"), job_message("burst-run", "t", 1, "dist_tasks:identity",
                                                         '[[41],{}]', None, None))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "worker", "--mode", "lean", "--burst",
                           "--concurrency", "2", "--path", str(TESTS), "--redis-url", redis_server.url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = [Outcome.from_fields(fields) for _, fields in client.xrange(keys.events("burst-run"))]
    assert [(o.status, o.with_start) for o in outcomes] == [("succeeded", True)]  # its start with it: one entry
    assert outcomes[-1].result == b"41" and outcomes[-1].worker and outcomes[-1].started_at
    assert client.llen(keys.lean_queue("default")) == 0
    slots = {m.decode() for m in client.smembers(keys.LEAN_WORKERS)}
    assert not {s for s in slots if keys.slot_worker(s) == outcomes[-1].worker}, "a worker that quit must leave the set"
