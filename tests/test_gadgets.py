"""Nothing read from Redis is ever unpickled, by any reader.

A pickle "gadget" (bytes whose unpickling runs ``touch MARKER``) is put in every
field a reader decodes: job entries and their payloads (lean), RQ job data and
meta and RQ result fields, outcomes on a run's event stream, and the run's
records (its hash, tasks hash, results hash). Then every reader runs over them:
workers of both kinds, a coordinator resuming the run, ``orch status`` and
``orch runs``. No marker file appears, no reader prints a traceback, and the
workers keep serving an honest run.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

import dist_tasks
from bench.procs import orch_command
from shared import keys
from shared.jobs import JOB_FUNCTION, job_message

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
TESTS = Path(__file__).parent


class Gadget:
    """Unpickling it runs ``touch path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def gadget(marker: Path) -> bytes:
    return pickle.dumps(Gadget(marker))


def test_the_gadget_works(tmp_path) -> None:
    """The proof below means something only if unpickling the gadget does leave the marker."""
    marker = tmp_path / "unpickled"
    pickle.loads(gadget(marker))
    assert marker.exists()


def orch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*orch_command(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def forge_lean_gadgets(client, blob: bytes) -> None:
    queue = keys.lean_queue("default")
    client.rpush(queue, blob)  # the whole entry
    client.rpush(queue, job_message("gadget-payload", "t", 1, "dist_tasks:identity", blob.decode("latin-1"),
                                    None, None))


def forge_rq_gadgets(client, blob: bytes) -> None:
    queue = Queue("default", connection=client, serializer=JSONSerializer)
    for job_id, fields in (("gadget-data", {"data": blob}), ("gadget-zdata", {"data": zlib.compress(blob)})):
        client.hset(f"rq:job:{job_id}", mapping={**fields, "origin": "default", "status": "queued",
                                                 "created_at": "2026-01-01T00:00:00.000000Z"})
        client.rpush(queue.key, job_id)
    job = queue.enqueue(JOB_FUNCTION, "gadget-meta", "t", 1, "dist_tasks:identity", "[[1],{}]", None, None,
                        job_id="gadget-meta")
    client.hset(job.key, "meta", blob)
    payload = queue.enqueue(JOB_FUNCTION, "gadget-rq-payload", "t", 1, "dist_tasks:identity", blob.decode("latin-1"),
                            None, None, job_id="gadget-rq-payload")
    client.xadd(f"rq:results:{payload.id}", {"type": "1", "return_value": blob, "created_at": "0"})


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_workers_unpickle_no_job_field(redis_server, orch_workers, tmp_path, mode) -> None:
    marker = tmp_path / "unpickled"
    worker, = orch_workers(1, mode=mode)
    client = redis_server.client()
    (forge_lean_gadgets if mode == "lean" else forge_rq_gadgets)(client, gadget(marker))
    time.sleep(2)
    assert worker.alive(), worker.log()[-3000:]
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS
    assert not marker.exists(), "a worker unpickled a gadget"
    assert "Traceback" not in worker.log() or mode == "rq", worker.log()[-3000:]
    assert worker.alive()


def test_coordinator_and_cli_unpickle_no_outcome_or_run_record(redis_server, orch_workers, tmp_path) -> None:
    marker = tmp_path / "unpickled"
    blob = gadget(marker)
    url = redis_server.url
    client = redis_server.client()
    submitted = orch("submit", str(TESTS / "dist_tasks.py:make_example"), "--detach", "--redis-url", url, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    # outcomes: every field a gadget, then a succeeded outcome whose result is one
    client.xadd(keys.events(run_id), {name: blob for name in ("run", "task", "attempt", "status", "at", "result")})
    client.xadd(keys.events(run_id), {"run": run_id, "task": "extract", "attempt": "1", "status": "succeeded",
                                      "at": "1.0", "result": blob, "worker": blob, "log": blob, "traceback": blob})
    client.xadd(keys.events(run_id), {"status": "cancel", "by": blob})
    # run records
    client.hset(keys.tasks(run_id), mapping={"transform": blob, "extract": blob})
    client.hset(keys.results(run_id), mapping={"extract": blob, "transform": blob})
    client.hset(keys.tracebacks(run_id), mapping={"extract": blob})
    client.hset(keys.run(run_id), mapping={"counts": blob, "cancelled_by": blob, "warning": blob,
                                           "created_at": blob, "lease_holder": blob})
    broken = f"{run_id}-spec"
    client.hset(keys.run(broken), mapping={**{k.decode(): v for k, v in client.hgetall(keys.run(run_id)).items()},
                                           "spec": blob, "state": blob, "workflow": blob})
    client.zadd(keys.RUNS, {broken: time.time()})
    readers = [orch("status", run_id, "--redis-url", url, cwd=tmp_path),
               orch("status", run_id, "--json", "--redis-url", url, cwd=tmp_path),
               orch("status", broken, "--redis-url", url, cwd=tmp_path),
               orch("runs", "--redis-url", url, cwd=tmp_path),
               orch("runs", "--json", "--redis-url", url, cwd=tmp_path),
               orch("resume", broken, "--quiet", "--redis-url", url, cwd=tmp_path)]
    orch_workers(1)  # for the resumed run's tasks
    readers += [orch("resume", run_id, "--quiet", "--redis-url", url, cwd=tmp_path)]
    failures = [(done.args[1:3], done.stderr[-1200:]) for done in readers if "Traceback" in done.stderr + done.stdout]
    assert not failures, "\n\n".join(f"{args}: {err}" for args, err in failures)
    for done in readers:
        assert "Traceback" not in done.stderr + done.stdout, (done.args, done.stderr[-1500:])
        assert done.returncode in (0, 1, 2), (done.args, done.returncode, done.stderr)
        if done.returncode == 2:
            assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert not marker.exists(), "a reader unpickled a gadget"
