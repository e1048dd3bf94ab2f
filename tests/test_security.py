"""Whoever can write to Redis still cannot run code of their choosing on a worker.

Jobs are forged the way an attacker with Redis access would: straight onto the
queues, for every worker kind, naming ``os:system``, ``builtins:eval``,
``subprocess:run`` or a module outside the allowlist, and with RQ's own client.
Each is refused before anything is imported (a marker file would prove
otherwise), reported as a ``TaskRefused`` failure, and the worker goes on
serving the honest run that follows.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

import dist_tasks
from bench.procs import orch_command
from shared import codec, keys
from shared.jobs import JOB_FUNCTION, job_message
from shared.messages import Outcome
from orchestrator.run_store import open_event_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TESTS = Path(__file__).parent


def forged_payload(*args) -> str:
    return codec.encode([list(args), {}]).decode()


def outcomes(client, run_id: str) -> list[Outcome]:
    return [Outcome.from_fields(fields) for _, fields in client.xrange(keys.events(run_id))]


def wait_for_failure(client, run_id: str, seconds: float = 20) -> Outcome:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        failed = [o for o in outcomes(client, run_id) if o.status == "failed"]
        if failed:
            return failed[0]
        time.sleep(0.05)
    pytest.fail(f"no failure reported for forged run {run_id}", pytrace=False)


def forge_lean(client, run_id: str, ref: str, *args) -> None:
    """A job of run ``run_id``, which exists (its event stream is open, as its coordinator opens it):
    the worker's refusal is reported there."""
    open_event_stream(client, run_id)
    client.rpush(keys.lean_queue("default"), job_message(run_id, "evil", 1, ref, forged_payload(*args), None, None))


def forge_orch_rq_job(client, run_id: str, ref: str, *args) -> None:
    """An RQ job of orch's own job function, its task reference the attacker's, of run ``run_id``
    (which exists: see :func:`forge_lean`)."""
    open_event_stream(client, run_id)
    Queue("default", connection=client, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, run_id, "evil", 1, ref, forged_payload(*args), None, None, job_id=f"forged-{run_id}")


@pytest.mark.parametrize("mode", ["lean", "rq"])
@pytest.mark.parametrize("ref, make_args", [
    ("os:system", lambda marker: (f"touch {marker}",)),
    ("builtins:eval", lambda marker: (f"open({str(marker)!r}, 'w')",)),
    ("subprocess:run", lambda marker: (["touch", str(marker)],)),
])
def test_forged_jobs_naming_the_standard_library_are_refused(redis_server, orch_workers, tmp_path, mode, ref,
                                                             make_args) -> None:
    worker, = orch_workers(1, mode=mode)
    assert "no --allow given" in worker.log()
    client = redis_server.client()
    marker = tmp_path / "pwned"
    run_id = f"forged-{mode}-{ref.replace(':', '-')}"
    (forge_lean if mode == "lean" else forge_orch_rq_job)(client, run_id, ref, *make_args(marker))
    failure = wait_for_failure(client, run_id)
    assert failure.error.startswith(f"TaskRefused: {ref!r} is not allowed on worker {worker.name} ("), failure.error
    assert "--allow" in failure.error
    time.sleep(0.5)
    assert not marker.exists(), "the forged job ran"
    left = {key.decode(): client.ttl(key) for key in client.scan_iter(match=f"*{run_id}*")}
    assert all(ttl > 0 for key, ttl in left.items() if key != keys.events(run_id)), left
    assert worker.alive()
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS


def test_plain_rq_jobs_go_through_the_same_check(redis_server, orch_workers, tmp_path) -> None:
    """What the issue tried: RQ's own client enqueueing os.system on an orch worker's queue."""
    worker, = orch_workers(1, mode="rq")
    client = redis_server.client()
    marker = tmp_path / "pwned"
    job = Queue("default", connection=client, serializer=JSONSerializer).enqueue("os.system", f"touch {marker}")
    callback = Queue("default", connection=client, serializer=JSONSerializer).enqueue(
        "dist_tasks.identity", 1, on_success="os.system")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (job.get_status(refresh=True) == "failed"
                                               and callback.get_status(refresh=True) in ("failed", "finished")):
        time.sleep(0.05)
    assert job.get_status(refresh=True) == "failed"
    assert "TaskRefused: 'os.system' is not allowed on worker" in (job.latest_result().exc_string or "")
    assert callback.get_status(refresh=True) == "failed", "a callback naming os.system is refused too"
    assert not marker.exists()
    assert worker.alive()
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_an_allowlist_refuses_every_other_module(redis_server, orch_workers, tmp_path, mode) -> None:
    imported = tmp_path / "imported"
    worker, = orch_workers(1, mode=mode, env={"ORCH_ALLOW": "dist_tasks", "ORCH_TEST_IMPORT_MARKER": str(imported)})
    assert "allowed task modules: dist_tasks" in worker.log()
    client = redis_server.client()
    run_id = f"outside-{mode}"
    (forge_lean if mode == "lean" else forge_orch_rq_job)(client, run_id, "marker_on_import:run", "hi")
    failure = wait_for_failure(client, run_id)
    assert failure.error == (f"TaskRefused: 'marker_on_import:run' is not allowed on worker {worker.name} "
                             f"(allowed: dist_tasks)")
    assert not imported.exists(), "the refused module was imported"
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS


def test_submit_with_an_allowlist_refuses_before_writing_anything(redis_server) -> None:
    refused = subprocess.run([*orch_command(), "submit", str(TESTS / "fixtures" / "outside_flow.py"), "--allow",
                              "dist_tasks", "--redis-url", redis_server.url], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: 1 task(s) cannot run on workers: task 'echo': its function "
                                                 "'fault_tasks:echo' is outside the allowlist (dist_tasks)"), line
    assert redis_server.client().keys("orch:run*") == []
