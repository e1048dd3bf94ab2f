"""Signed jobs and outcomes, and the limits against a hostile submitter, end to end.

An attacker with Redis access (but not the signing key) forges on every worker
kind: an unsigned job while signing is on, a signed job replayed into another
run or another attempt, an entry larger than any job may be, outcomes. Each is
refused (nothing is imported: a marker file would prove otherwise), the worker
keeps serving, and the honest, signed run around them completes. What the
forged entries make a worker write expires.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

import dist_tasks
from bench.procs import orch_command
from orchestrator import Task, Workflow
from orchestrator.distributed import cancel_run
from orchestrator.run_store import open_event_stream
from shared import codec, keys
from shared.errors import LimitExceededError
from shared.jobs import JOB_FUNCTION, job_message, job_signature
from shared.messages import STARTED, SUCCEEDED, Outcome
from shared.signing import Signer, fields_verified
from tests.test_security import forged_payload, outcomes, wait_for_failure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
TESTS = Path(__file__).parent
KEY = "test-signing-key-0123456789"
EXAMPLE = str(TESTS / "dist_tasks.py:make_example")


@pytest.fixture
def signing(monkeypatch) -> Signer:
    """Signing on for this process's coordinator (the workers get ``signed_env``)."""
    monkeypatch.setenv("ORCH_SIGNING_KEY", KEY)
    return Signer([KEY.encode()])


def signed_env(marker: Path, **extra: str) -> dict[str, str]:
    return {"ORCH_SIGNING_KEY": KEY, "ORCH_TEST_IMPORT_MARKER": str(marker), **extra}


def push_lean(client, entry: str | bytes) -> None:
    client.rpush(keys.lean_queue("default"), entry)


def enqueue_rq(client, args: tuple, job_id: str) -> None:
    Queue("default", connection=client, serializer=JSONSerializer).enqueue(JOB_FUNCTION, *args, job_id=job_id)


def forge(client, mode: str, run_id: str, attempt: int = 1, *, signer: Signer | None = None,
          signed_for: tuple[str, int] | None = None, payload: str | None = None, made_up: bool = False) -> None:
    """A job of task 'evil' (function ``marker_on_import:run``) of ``run_id``/``attempt``, unsigned, or
    carrying the signature ``signer`` made for ``signed_for`` (another run id and attempt). The run
    exists (its stream is open) unless ``made_up``."""
    if not made_up:
        open_event_stream(client, run_id)
    payload = payload if payload is not None else forged_payload("pwned")
    args = (run_id, "evil", attempt, "marker_on_import:run", payload, None, None)
    if mode == "lean":
        entry = job_message(*args)
        if signer is not None:
            original = job_message(signed_for[0], "evil", signed_for[1], *args[3:], signer=signer)
            entry = entry[:-1] + "," + json.dumps(json.loads(original)[-1]) + "]"
        push_lean(client, entry)
    else:
        signature = None
        if signer is not None:
            signature = job_signature(signer, (signed_for[0], "evil", signed_for[1], *args[3:]))
        enqueue_rq(client, (*args, signature), job_id=f"forged-{run_id}-{attempt}")


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_unsigned_and_replayed_jobs_are_refused_and_signed_runs_complete(redis_server, orch_workers, tmp_path,
                                                                        signing, mode) -> None:
    marker = tmp_path / "imported"
    worker, = orch_workers(1, mode=mode, env=signed_env(marker))
    assert "signed jobs only" in worker.log()
    client = redis_server.client()
    forge(client, mode, f"unsigned-{mode}")
    forge(client, mode, f"replayed-{mode}", signer=signing, signed_for=(f"original-{mode}", 1))
    forge(client, mode, f"attempt-{mode}", 2, signer=signing, signed_for=(f"attempt-{mode}", 1))
    unsigned = wait_for_failure(client, f"unsigned-{mode}")
    assert unsigned.error.startswith("TaskRefused: job is not signed"), unsigned.error
    for run_id in (f"replayed-{mode}", f"attempt-{mode}"):
        refused = wait_for_failure(client, run_id)
        assert refused.error.startswith("TaskRefused: job signature does not match this worker's key"), refused.error
    assert not marker.exists(), "a refused job's module was imported"
    for run_id in (f"unsigned-{mode}", f"replayed-{mode}", f"attempt-{mode}"):
        assert fields_verified(signing, "outcome", run_id, outcomes(client, run_id)[-1].attempt,
                               outcomes_raw(client, run_id)[-1]), "the refusal is signed"
    if mode == "rq":  # plain RQ jobs and callbacks carry no signature: refused, allowed module or not
        queue = Queue("default", connection=client, serializer=JSONSerializer)
        plain = queue.enqueue("marker_on_import.run", 1)
        callback = queue.enqueue(JOB_FUNCTION, *job_args_signed(signing, "callback-run"),
                                 on_success="marker_on_import.run", job_id="with-callback")
        deadline = time.monotonic() + 20
        while plain.get_status(refresh=True) != "failed" or callback.get_status(refresh=True) not in ("failed",
                                                                                                     "finished"):
            assert time.monotonic() < deadline, (plain.get_status(), callback.get_status())
            time.sleep(0.05)
        assert "only orch's own signed jobs" in (plain.latest_result().exc_string or "")
        assert callback.get_status(refresh=True) == "failed"
        assert not marker.exists()
    assert worker.alive()
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS


def job_args_signed(signer: Signer, run_id: str) -> tuple:
    """An honest, signed job's arguments (a function the worker allows)."""
    args = (run_id, "t", 1, "dist_tasks:identity", forged_payload(1), None, None)
    return (*args, job_signature(signer, args))


def outcomes_raw(client, run_id: str) -> list[dict]:
    return [fields for _, fields in client.xrange(keys.events(run_id))]


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_keys_that_differ_commit_nothing(redis_server, orch_workers, tmp_path, signing, caplog, mode) -> None:
    """A worker with another key refuses the coordinator's jobs; the coordinator ignores that
    refusal (signed with the other key): nothing is committed, each side logs one line, and the run
    can still be cancelled."""
    worker, = orch_workers(1, mode=mode, env={"ORCH_SIGNING_KEY": "another-key"})
    wf = dist_tasks.make_example()
    thread = threading.Thread(target=wf.run, kwargs={"redis_url": redis_server.url})
    with caplog.at_level(logging.ERROR, logger="orch.coordinator"):
        thread.start()
        deadline = time.monotonic() + 30
        while not any("ignored a failed outcome of task 'extract' attempt 1" in r.getMessage()
                      for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        cancel_run(redis_server.client(), wf.last_run_id, by="test")
        thread.join(30)
    assert not thread.is_alive()
    assert wf.tasks["extract"].state.value == "cancelled"
    assert wf.results == {}
    assert worker.alive()


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_forged_job_of_a_made_up_run_leaves_nothing_behind(redis_server, orch_workers, tmp_path, mode) -> None:
    """Workers report only to a run's stream that exists (its coordinator opens it): a job naming a
    run that does not exist writes nothing that stays (before: a stream that never expired)."""
    marker = tmp_path / "imported"
    worker, = orch_workers(1, mode=mode, env={"ORCH_ALLOW": "dist_tasks", "ORCH_TEST_IMPORT_MARKER": str(marker)})
    client = redis_server.client()
    forge(client, mode, f"made-up-{mode}", made_up=True)  # refused: outside the allowlist
    forged_args = (f"made-up-ok-{mode}", "t", 1, "dist_tasks:identity", forged_payload(1), None, None)
    if mode == "lean":
        push_lean(client, job_message(*forged_args))  # allowed: it runs, and its reports go nowhere
    else:
        enqueue_rq(client, forged_args, job_id=f"forged-ok-{mode}")
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS  # queued after
    time.sleep(0.5)
    left = {key.decode(): client.ttl(key) for key in client.scan_iter(match="*made-up*")}
    left.update({key.decode(): client.ttl(key) for key in client.scan_iter(match="*forged-*")})
    assert not [key for key in left if key.startswith("orch:")], left
    assert all(ttl > 0 for ttl in left.values()), left  # RQ's own job hashes and results of them
    assert not marker.exists()
    assert worker.alive()


def slow_workflow(seconds: float) -> Workflow:
    wf = Workflow("slow")
    wf.add_task(Task("slow", dist_tasks.sleep_for, args=(seconds,)))
    return wf


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_forged_outcomes_are_ignored(redis_server, orch_workers, tmp_path, signing, caplog, mode) -> None:
    orch_workers(1, mode=mode, env=signed_env(tmp_path / "unused"))
    client = redis_server.client()
    wf = slow_workflow(3.0)
    finished: dict = {}
    thread = threading.Thread(target=lambda: finished.update(result=wf.run(redis_url=redis_server.url)))
    with caplog.at_level(logging.ERROR, logger="orch.coordinator"):
        thread.start()
        deadline = time.monotonic() + 30
        while getattr(wf, "last_run_id", None) is None or wf.tasks["slow"].state.value != "running":
            assert time.monotonic() < deadline, "the slow task never started"
            time.sleep(0.05)
        run_id = wf.last_run_id
        forged = Outcome(run_id=run_id, task="slow", attempt=1, status=SUCCEEDED, at=time.time(),
                         result=codec.encode("forged"), worker="attacker")
        client.xadd(keys.events(run_id), forged.to_fields())  # unsigned
        client.xadd(keys.events(run_id), forged.to_fields(Signer([b"not-the-key"])))  # wrongly signed
        client.xadd(keys.events(run_id), {"status": "cancel", "by": "attacker"})  # an unsigned cancel request
        start = Outcome(run_id=run_id, task="slow", attempt=1, status=STARTED, at=time.time(), worker="attacker")
        client.xadd(keys.events(run_id), start.to_fields())  # an unsigned start: not even shown
        thread.join(60)
    assert finished["result"] == {"slow": "slept"} and wf.tasks["slow"].worker != "attacker"
    ignored = [r.getMessage() for r in caplog.records if "missing or wrong signature" in r.getMessage()]
    assert len(ignored) == 4, ignored
    assert any("ignored a started outcome of task 'slow' attempt 1" in line for line in ignored)
    assert any("ignored a succeeded outcome of task 'slow' attempt 1" in line for line in ignored)
    assert any("ignored a cancel request (by 'attacker')" in line for line in ignored)


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_an_oversized_entry_is_dropped_unread(redis_server, orch_workers, tmp_path, mode) -> None:
    marker = tmp_path / "imported"
    worker, = orch_workers(1, mode=mode, env={"ORCH_MAX_PAYLOAD_BYTES": "1000",
                                              "ORCH_TEST_IMPORT_MARKER": str(marker)})
    client = redis_server.client()
    huge = forged_payload("x" * 200_000)  # RQ compresses it to a few hundred bytes: it expands past the limit
    forge(client, mode, f"huge-{mode}", payload=huge)
    needle = "over this worker's limit" if mode == "lean" else "over this worker's limit of"
    deadline = time.monotonic() + 20
    while needle not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.05)
    assert not marker.exists()
    assert worker.alive()
    assert dist_tasks.make_example().run(redis_url=redis_server.url) == dist_tasks.EXAMPLE_RESULTS
    assert client.xlen(keys.events(f"huge-{mode}")) == 0, "an entry refused unread is not reported either"


def test_submit_refuses_too_many_tasks_and_too_large_arguments_before_writing(redis_server, monkeypatch) -> None:
    refused = subprocess.run([*orch_command(), "submit", EXAMPLE, "--redis-url", redis_server.url],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "ORCH_MAX_TASKS": "1"})
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines == ["error: workflow 'example' has 2 tasks, over the limit of 1 tasks per run (ORCH_MAX_TASKS); "
                     "split it into several runs or raise the limit"], lines
    monkeypatch.setenv("ORCH_MAX_PAYLOAD_BYTES", "100")
    wf = Workflow("big")
    wf.add_task(Task("small", dist_tasks.identity, args=("x",)))
    wf.add_task(Task("large", dist_tasks.identity, args=("y" * 200,)))
    with pytest.raises(LimitExceededError) as info:
        wf.run(redis_url=redis_server.url)
    size = len(codec.encode([["y" * 200], {}]))
    assert str(info.value).startswith(f"task 'large': its arguments encode to {size} bytes, over the limit of 100 "
                                      f"bytes (ORCH_MAX_PAYLOAD_BYTES)"), str(info.value)
    assert redis_server.client().keys("orch:run*") == []
