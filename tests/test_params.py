"""Run parameters: ``orch submit --param``, ``Workflow.run(params=...)``, ``current_task().params``,
on the embedded backend and on real ``orch worker``s of both kinds, with a real redis-server.

The tasks (``rerun_tasks.report_params``) write what they read as the run's parameters to a file in
the directory named by the ``out`` parameter, so the test sees what each task saw on any backend.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.procs import orch_command
from orchestrator import Task, Workflow
from orchestrator.cli import main, parse_params
from rerun_tasks import echo, report_params, with_params
from shared import keys
from shared.connection import connect
from shared.errors import InvalidParamsError, SerializationError

pytestmark = [pytest.mark.timeout(120)]

TESTS = Path(__file__).parent


def seen(out: Path, task: str) -> dict:
    return json.loads((out / f"{task}.json").read_text())


def test_param_values_are_json_when_they_parse_else_strings() -> None:
    assert parse_params(("n=3", "ratio=0.5", "dry=true", "tags=[\"a\", \"b\"]", "day=2024-05-01", "empty=",
                         "eq=a=b", "none=null")) == {
        "n": 3, "ratio": 0.5, "dry": True, "tags": ["a", "b"], "day": "2024-05-01", "empty": "", "eq": "a=b",
        "none": None}


def test_embedded_tasks_read_the_params_and_each_gets_its_own_copy(tmp_path: Path) -> None:
    wf = with_params({"names": ["a", "b"]})
    given = {"out": str(tmp_path), "n": 3, "pair": (1, 2)}
    results = wf.run(params=given)
    assert results["a"] == results["b"] == {"out": str(tmp_path), "n": 3, "pair": (1, 2)}  # no 'scratch'
    assert seen(tmp_path, "a") == {"out": str(tmp_path), "n": 3, "pair": [1, 2]}
    assert wf.params == given
    wf.run()
    assert wf.params == {}


def test_unencodable_param_is_refused_before_anything_runs_or_is_written(redis_server) -> None:
    wf = Workflow("p")
    wf.add_task(Task("t", echo, args=(1,)))
    with pytest.raises(SerializationError, match=r"parameter 'when' is a builtins.object, which the orch codec"):
        wf.run(params={"when": object()})
    assert wf.get_task("t").attempts == 0
    with pytest.raises(SerializationError, match="parameter 'when'"):
        wf.run(redis_url=redis_server.url, params={"when": object()})
    with pytest.raises(InvalidParamsError, match="a parameter name must be a non-empty string, not 3"):
        wf.run(redis_url=redis_server.url, params={3: "x"})
    client = connect(redis_server.url)
    assert client.keys("*") == [], "nothing written"
    client.close()


def test_bad_param_option_is_one_error_line() -> None:
    result = CliRunner().invoke(main, ["submit", str(TESTS / "rerun_tasks.py:with_params"), "--param", "novalue"])
    assert result.exit_code == 2 and "'novalue' is not of the form key=value" in result.output


def test_cli_params_reach_the_factory_and_the_tasks_embedded(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["submit", str(TESTS / "rerun_tasks.py:with_params"), "-q",
                                       "--param", f"out={tmp_path}", "--param", 'names=["x","y"]',
                                       "--param", "day=2024-05-01"])
    assert result.exit_code == 0, result.output
    expected = {"out": str(tmp_path), "names": ["x", "y"], "day": "2024-05-01"}
    assert seen(tmp_path, "x") == seen(tmp_path, "y") == expected  # the factory made tasks x and y


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_params_reach_factory_and_tasks_on_workers_and_status_shows_them(redis_server, orch_workers,
                                                                         tmp_path: Path, mode: str) -> None:
    orch_workers(1, mode=mode, concurrency=2)
    url = redis_server.url
    submitted = subprocess.run(
        [*orch_command(), "submit", str(TESTS / "rerun_tasks.py:with_params"), "--redis-url", url, "-q",
         "--param", f"out={tmp_path}", "--param", 'names=["x","y","z"]', "--param", "n=7"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(TESTS)}, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    run_id = next(line.split()[-1] for line in submitted.stderr.splitlines() if line.startswith("run id: "))
    expected = {"out": str(tmp_path), "names": ["x", "y", "z"], "n": 7}
    assert all(seen(tmp_path, name) == expected for name in "xyz")

    status = CliRunner().invoke(main, ["status", run_id, "--json", "--redis-url", url])
    document = json.loads(status.output)
    assert document["params"] == expected and [t["name"] for t in document["tasks"]] == ["x", "y", "z"]
    text = CliRunner().invoke(main, ["status", run_id, "--redis-url", url]).output
    assert f'params: out="{tmp_path}", names=["x", "y", "z"], n=7' in text


@pytest.mark.slow
def test_python_params_on_workers_and_retry_keeps_them(redis_server, orch_workers, tmp_path: Path) -> None:
    orch_workers(1, concurrency=2)
    url = redis_server.url
    wf = Workflow("params-retry")
    wf.add_task(Task("first", report_params, args=("first",)))
    wf.add_task(Task("second", report_params, ["first"], args=("second",)))
    params = {"out": str(tmp_path), "pair": (1, 2), "raw": b"\x00\x01"}
    results = wf.run(redis_url=url, params=params)
    assert results["first"] == results["second"] == params  # the codec's types survive the trip
    (tmp_path / "first.json").unlink()
    (tmp_path / "second.json").unlink()
    wf.retry(tasks=["second"])
    assert not (tmp_path / "first.json").exists()
    assert wf.get_task("second").result == params and wf.get_task("second").attempts == 2
    client = connect(url)
    assert client.hget(keys.run(wf.last_run_id), "retries") == b"1"
    client.close()


@pytest.mark.slow
def test_zero_argument_factory_still_works_with_params(redis_server, orch_workers, tmp_path: Path) -> None:
    orch_workers(1, mode="rq")
    result = CliRunner().invoke(main, ["submit", str(TESTS / "rerun_tasks.py:without_params"), "-q",
                                       "--redis-url", redis_server.url, "--param", f"out={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert seen(tmp_path, "plain") == {"out": str(tmp_path)}


def test_a_factory_taking_params_gets_an_empty_dict_without_them() -> None:
    result = CliRunner().invoke(main, ["validate", str(TESTS / "rerun_tasks.py:with_params")])
    assert result.exit_code == 0 and "1 task" in result.output  # names defaulted: one task 'only'
