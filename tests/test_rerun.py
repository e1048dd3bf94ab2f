"""Rerun from failure (``orch retry``, ``Workflow.retry``, ``retry_run``) on the embedded backend and
on real ``orch worker``s of both kinds, with a real redis-server.

The workflow (``rerun_tasks.make_branches``) has two branches under one root; the right one reads an
input file and fails while it says ``bad``. Every task appends its attempt number to a marker file,
which is how these tests tell which tasks ran again.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.distributed import retry_run, serve_coordinator
from orchestrator.run_views import wait_until_final
from rerun_tasks import make_branches, runs
from orchestrator.run_store import run_keys
from shared import keys
from shared.config import Settings
from shared.connection import connect
from shared.errors import NothingToRerunError, RunStillRunningError, UnknownTaskError
from shared.states import TaskState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TESTS = Path(__file__).parent
TASKS = ["root", "left", "left2", "right", "right2", "end"]
RIGHT_BRANCH = ["right", "right2", "end"]


def invoke(*args: str, url: str):
    return CliRunner().invoke(main, [*args, "--redis-url", url])


def snapshot(client, run_id: str) -> dict:
    """Every key of the run: its type, contents and whether it has a TTL."""
    def contents(key: str):
        kind = client.type(key).decode()
        read = {"hash": client.hgetall, "string": client.get, "stream": lambda k: client.xrange(k),
                "set": client.smembers, "none": lambda k: None}[kind]
        return kind, read(key), client.ttl(key) > 0
    return {key: contents(key) for key in run_keys(client, run_id)}


def all_runs(directory: Path) -> dict[str, list[int]]:
    return {name: runs(directory, name) for name in TASKS}


def failed_first(tmp_path: Path):
    """A workflow whose right branch fails on its first run, its marker directory holding input 'bad'."""
    (tmp_path / "input").write_text("bad")
    return make_branches(str(tmp_path))


def check_first_go(wf, tmp_path: Path) -> None:
    states = {t.name: t.state for t in wf}
    assert states == {"root": TaskState.SUCCESS, "left": TaskState.SUCCESS, "left2": TaskState.SUCCESS,
                      "right": TaskState.FAILURE, "right2": TaskState.FAILURE, "end": TaskState.FAILURE}
    assert all_runs(tmp_path) == {"root": [1], "left": [1], "left2": [1], "right": [1, 2], "right2": [], "end": []}


def check_rerun_of_the_failed_branch(wf, tmp_path: Path, results: dict) -> None:
    """Only the failed branch ran again; attempt numbers kept growing; attempts 1 and 2 kept their errors."""
    assert all_runs(tmp_path) == {"root": [1], "left": [1], "left2": [1], "right": [1, 2, 3],
                                  "right2": [1], "end": [1]}
    assert results == {"root": "root", "left": "left", "left2": "left2", "right": "good", "right2": "right2",
                       "end": "end"}
    right = wf.get_task("right")
    assert right.state is TaskState.SUCCESS and right.attempts == 3 and right.error is None
    assert [(r.attempt, r.state) for r in right.history] == [(1, "failure"), (2, "failure")]
    assert all(r.error == f"ValueError: bad input in {tmp_path}/input" for r in right.history)
    assert wf.retries == 1


# ------------------------------------------------------------------------------- embedded


def test_embedded_retry_reruns_only_the_failed_branch(tmp_path: Path) -> None:
    wf = failed_first(tmp_path)
    wf.run(max_workers=2)
    check_first_go(wf, tmp_path)
    (tmp_path / "input").write_text("good")
    results = wf.retry()
    check_rerun_of_the_failed_branch(wf, tmp_path, results)
    with pytest.raises(NothingToRerunError):
        wf.retry()
    wf.retry(tasks=["left"])  # a succeeded task and everything downstream of it only
    assert all_runs(tmp_path) == {"root": [1], "left": [1, 2], "left2": [1, 2], "right": [1, 2, 3],
                                  "right2": [1], "end": [1, 2]}
    with pytest.raises(UnknownTaskError):
        wf.retry(tasks=["nope"])
    wf.run()  # run() is a fresh run: everything runs, numbering starts again
    assert runs(tmp_path, "root") == [1, 1] and wf.get_task("right").history == () and wf.retries == 0


# ---------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_distributed_retry_reruns_only_the_failed_branch(redis_server, orch_workers, tmp_path: Path,
                                                         mode: str) -> None:
    orch_workers(1, mode=mode, concurrency=2)
    wf = failed_first(tmp_path)
    wf.run(redis_url=redis_server.url)
    check_first_go(wf, tmp_path)
    run_id = wf.last_run_id
    (tmp_path / "input").write_text("good")
    results = wf.retry()
    assert wf.last_run_id == run_id, "the same run"
    check_rerun_of_the_failed_branch(wf, tmp_path, results)

    status = invoke("status", run_id, "--json", url=redis_server.url)
    assert status.exit_code == 0, status.output
    document = json.loads(status.output)
    assert document["state"] == "success" and document["retries"] == 1
    tasks = {t["name"]: t for t in document["tasks"]}
    assert [tasks[name]["attempts"] for name in TASKS] == [1, 1, 1, 3, 1, 1]
    history = tasks["right"]["history"]
    assert [(h["attempt"], h["state"], h["error"]) for h in history] == [
        (1, "failure", f"ValueError: bad input in {tmp_path}/input"),
        (2, "failure", f"ValueError: bad input in {tmp_path}/input")]
    assert all(h["worker"] and h["finished_at"] >= h["started_at"] for h in history)
    text = invoke("status", run_id, url=redis_server.url).output
    assert "retried 1 time" in text and f"right attempt 1: failure: ValueError: bad input in {tmp_path}" in text


def test_orch_retry_and_retry_of_named_tasks(redis_server, orch_workers, tmp_path: Path) -> None:
    orch_workers(1, concurrency=2)
    url = redis_server.url
    client = connect(url)
    wf = failed_first(tmp_path)
    wf.run(redis_url=url, settings=Settings(retention=600))
    run_id = wf.last_run_id
    assert 500 < client.ttl(keys.run(run_id)) <= 600

    (tmp_path / "input").write_text("good")
    result = invoke("retry", run_id, "-q", url=url)
    assert result.exit_code == 0, result.output
    assert all_runs(tmp_path) == {"root": [1], "left": [1], "left2": [1], "right": [1, 2, 3],
                                  "right2": [1], "end": [1]}
    assert client.ttl(keys.run(run_id)) > 600, "the retention set again when the rerun finished (the default)"

    result = invoke("retry", run_id, "--task", "left", "-q", url=url)
    assert result.exit_code == 0, result.output
    assert all_runs(tmp_path) == {"root": [1], "left": [1, 2], "left2": [1, 2], "right": [1, 2, 3],
                                  "right2": [1], "end": [1, 2]}
    document = json.loads(invoke("status", run_id, "--json", url=url).output)
    assert document["retries"] == 2 and document["state"] == "success"
    tasks = {t["name"]: t for t in document["tasks"]}
    assert [(h["attempt"], h["state"]) for h in tasks["left"]["history"]] == [(1, "success")]
    assert tasks["left"]["attempts"] == 2 and tasks["root"]["attempts"] == 1

    result = invoke("retry", run_id, url=url)
    assert result.exit_code == 2 and "error: every task of the run succeeded: nothing to rerun" in result.output
    client.close()


def test_retry_refusals_write_nothing(redis_server, orch_workers, tmp_path: Path) -> None:
    url = redis_server.url
    client = connect(url)
    unknown = invoke("retry", "20990101T000000-000000000000", url=url)
    assert unknown.exit_code == 2
    assert unknown.output.startswith("error: no run '20990101T000000-000000000000' in this Redis")

    detached = invoke("submit", str(TESTS / "rerun_tasks.py:branches"), "--param", f"dir={tmp_path}",
                      "--detach", url=url)  # no coordinator, no worker: it stays running
    (tmp_path / "input").write_text("bad")
    running_id = detached.output.strip().splitlines()[-1]
    before = snapshot(client, running_id)
    result = invoke("retry", running_id, url=url)
    assert result.exit_code == 2 and result.output.startswith(f"error: run '{running_id}' is still running")
    assert snapshot(client, running_id) == before
    assert not client.exists(keys.lease(running_id))

    orch_workers(1, concurrency=2)
    wf = failed_first(tmp_path)
    wf.run(redis_url=url)
    failed_id = wf.last_run_id
    before = snapshot(client, failed_id)
    result = invoke("retry", failed_id, "--task", "left", "--task", "nope", url=url)
    assert result.exit_code == 2 and result.output == "error: no task named 'nope' in the workflow\n", result.output
    assert snapshot(client, failed_id) == before
    assert not client.sismember(keys.ACTIVE, failed_id) and not client.exists(keys.lease(failed_id))

    short = failed_first(tmp_path)
    short.run(redis_url=url, settings=Settings(retention=1))
    expired_id = short.last_run_id
    deadline = time.monotonic() + 10
    while client.exists(keys.run(expired_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    result = invoke("retry", expired_id, url=url)
    assert result.exit_code == 2 and result.output.startswith(f"error: run '{expired_id}' expired"), result.output
    assert not any(client.exists(key) for key in keys.all_of_run(expired_id))
    client.close()


def test_retried_run_is_driven_by_a_coordinator_service(redis_server, orch_workers, tmp_path: Path) -> None:
    """``orch retry --detach`` reopens the run (active again, retention lifted) and returns; an
    ``orch coordinator`` service adopts and finishes it, and the retention is set again."""
    orch_workers(1, concurrency=2)
    url = redis_server.url
    client = connect(url)
    wf = failed_first(tmp_path)
    wf.run(redis_url=url)
    run_id = wf.last_run_id
    (tmp_path / "input").write_text("good")
    result = invoke("retry", run_id, "--detach", url=url)
    assert result.exit_code == 0 and result.output.strip() == run_id
    assert client.hget(keys.run(run_id), "state") == b"running" and client.sismember(keys.ACTIVE, run_id)
    # workers give the log index a TTL of their own
    lifted = [key for key in keys.all_of_run(run_id) if key != keys.logs(run_id)]
    assert all(client.ttl(key) == -1 for key in lifted if client.exists(key))
    with pytest.raises(RunStillRunningError):
        retry_run(client, run_id)

    stop = threading.Event()
    service = threading.Thread(target=serve_coordinator, args=(connect(url),), kwargs={"poll": 0.1, "stop": stop})
    service.start()
    try:
        assert wait_until_final(client, run_id) == "success"
    finally:
        stop.set()
        service.join()
    assert all_runs(tmp_path)["right"] == [1, 2, 3] and all_runs(tmp_path)["left"] == [1]
    assert client.ttl(keys.run(run_id)) > 0 and not client.sismember(keys.ACTIVE, run_id)
    assert client.hget(keys.run(run_id), "retries") == b"1"
    client.close()
