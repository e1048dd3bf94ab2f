"""Dynamic fan-out: a mapped task expands at run time into a child per item of an upstream's result.

Embedded and on real workers of both kinds; the flows are in tests/authoring_tasks.py (square
leaves a marker file per item and run, so "no child ran twice" is counted, not assumed).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

import authoring_tasks as at
from orchestrator import Task, Workflow, flow
from orchestrator.cli import main
from orchestrator.scheduler import Scheduler
from shared import keys
from shared.errors import FlowError, WorkflowError
from shared.events import MapExpanded, TaskFailed, TaskSucceeded
from shared.states import TaskState
from shared.upstream import Mapped
from fault_helpers import procs, run_id_from, wait_for  # noqa: F401  (procs: a fixture)
from test_scheduler import Spec


def square_runs(marker_dir: Path) -> dict[int, int]:
    return {int(p.name.split("-")[1]): len(p.read_text().splitlines()) for p in marker_dir.glob("square-*")}


# ------------------------------------------------------------------ building
def test_map_records_one_task_with_a_mapped_argument() -> None:
    workflow = at.squares.build(n=3)
    square = workflow.get_task("square")
    assert square.map_over == ("numbers",) and square.dependencies == ["numbers"]
    assert square.args == (Mapped("numbers"),) and square.kwargs == {"offset": 1, "marker_dir": ""}
    assert workflow.get_task("total").dependencies == ["square"]


def test_map_needs_a_handle_and_a_flow() -> None:
    @flow
    def nothing_to_map():
        at.square.map(3)

    with pytest.raises(FlowError, match=r"square.map\(\) needs a task handle to map over"):
        nothing_to_map.build()
    with pytest.raises(FlowError, match=r"call it inside a @flow function"):
        at.square.map([1, 2])


# ------------------------------------------------------------------ embedded
@pytest.mark.parametrize("n", [0, 3, 2000])
def test_a_map_over_n_items_embedded(n, tmp_path) -> None:
    results = at.squares.run(n=n, marker_dir=str(tmp_path))
    expected = [x * x + 1 for x in range(n)]
    assert results["square"] == expected and results["total"] == sum(expected)
    workflow = at.squares.last_workflow
    children = [t for t in workflow.tasks.values() if t.map_parent == "square"]
    assert [t.name for t in children] == [f"square[{k}]" for k in range(n)]
    assert all(t.state is TaskState.SUCCESS for t in children)
    runs = square_runs(tmp_path)
    assert runs == ({k: (2 if k == 1 else 1) for k in range(n)})  # item 1 failed once and was retried
    if n > 1:
        assert workflow.get_task("square[1]").attempts == 2
    assert "square[0]" not in results  # children are tasks; their results are the mapped task's list


def test_zipped_maps_must_have_equal_lengths() -> None:
    assert at.zipped.run(n=3, m=3)["pair"] == ["a0", "b1", "c2"]
    assert at.zipped.run(n=2, m=3) == {"numbers": [0, 1], "letters": ["a", "b", "c"]}
    pair = at.zipped.last_workflow.get_task("pair")
    assert pair.state is TaskState.FAILURE and pair.error == (
        "MapError: task 'pair' maps over results of different lengths ('numbers': 2, 'letters': 3); they must "
        "be equal")


def test_a_map_past_the_limit_fails_naming_the_length_and_the_limit(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_MAX_MAP_LENGTH", "5")
    results = at.squares.run(n=6)
    square = at.squares.last_workflow.get_task("square")
    assert square.state is TaskState.FAILURE and "square" not in results
    assert square.error.startswith("MapError: task 'square' would expand into 6 children, over the limit of 5")
    assert at.squares.last_workflow.get_task("total").error == "upstream task 'square' failed"


def test_a_child_that_fails_for_good_fails_the_mapped_task_after_the_others_finished() -> None:
    workflow = Workflow("classic")
    workflow.add_task(Task("items", "authoring_tasks:numbers", args=(4,)))
    workflow.add_task(Task("inverse", "tests.map_helpers:inverse", ["items"], map_over="items"))
    workflow.add_task(Task("cleanup", "authoring_tasks:total", ["inverse"], args=([],), trigger_rule="all_done"))
    workflow.run()
    inverse = workflow.get_task("inverse")
    children = {name: t for name, t in workflow.tasks.items() if t.map_parent == "inverse"}
    assert {name: t.state for name, t in children.items()} == {
        "inverse[0]": TaskState.FAILURE, "inverse[1]": TaskState.SUCCESS, "inverse[2]": TaskState.SUCCESS,
        "inverse[3]": TaskState.SUCCESS}
    assert inverse.state is TaskState.FAILURE
    assert inverse.error == "1 of 4 mapped children failed (first: inverse[0]: ZeroDivisionError: division by zero)"
    assert workflow.get_task("cleanup").state is TaskState.SUCCESS  # all_done: its rule still applies


def test_the_classic_map_over_passes_the_item_first() -> None:
    workflow = Workflow("classic")
    workflow.add_task(Task("items", "authoring_tasks:numbers", args=(3,)))
    workflow.add_task(Task("plus", "authoring_tasks:square", ["items"], map_over="items", kwargs={"offset": 10}))
    assert workflow.run()["plus"] == [10, 11, 14]


def test_an_expansion_is_a_scheduler_event_and_children_run_once() -> None:
    s = Scheduler([Spec("a"), Spec("m", ("a",), map_over=("a",)), Spec("z", ("m",))])
    s.start(0.0)
    out = s.handle(TaskSucceeded("a", 1, 1.0))
    assert [type(x).__name__ for x in out if type(x).__name__ == "ExpandMap"] == ["ExpandMap"]
    out = s.handle(MapExpanded("m", 1, 2.0, 2))
    assert [a.task for a in out if type(a).__name__ == "Dispatch"] == ["m[0]", "m[1]"]
    s.validate_state()
    assert s.handle(MapExpanded("m", 1, 2.5, 2)) == []  # a repeat is ignored: no second set of children
    assert s.state("m[0]") is TaskState.QUEUED and s.counts()[TaskState.QUEUED] == 2
    s.handle(TaskSucceeded("m[0]", 1, 3.0))
    s.handle(TaskSucceeded("m[1]", 1, 3.0))
    s.validate_state()
    assert s.state("m") is TaskState.SUCCESS and s.state("z") is TaskState.QUEUED


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_status_collapses_more_than_twenty_children(redis_server, orch_workers) -> None:
    orch_workers(2)
    at.squares.run(n=30, redis_url=redis_server.url)
    run_id = at.squares.last_workflow.last_run_id
    result = CliRunner().invoke(main, ["status", run_id, "--redis-url", redis_server.url])
    assert result.exit_code == 0, result.output
    assert "square[0..29]" in result.output and "30 success" in result.output
    assert "square[5]" not in result.output
    shown = json.loads(CliRunner().invoke(main, ["status", run_id, "--json", "--redis-url", redis_server.url]).output)
    assert len([t for t in shown["tasks"] if t["name"].startswith("square[")]) == 30


# ------------------------------------------------------------------ on workers
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_map_on_workers(redis_server, orch_workers, mode, tmp_path) -> None:
    orch_workers(2, mode=mode)
    results = at.squares.run(n=40, marker_dir=str(tmp_path), redis_url=redis_server.url)
    assert results["square"] == [x * x + 1 for x in range(40)] and results["total"] == sum(x * x + 1 for x in range(40))
    assert square_runs(tmp_path) == {k: (2 if k == 1 else 1) for k in range(40)}
    client = redis_server.client()
    run_id = at.squares.last_workflow.last_run_id
    stored = json.loads(client.hget(keys.maps(run_id), "square"))
    assert len(stored["payloads"]) == 40 and client.ttl(keys.maps(run_id)) > 0
    assert at.squares.run(n=0, redis_url=redis_server.url)["square"] == []


def test_orch_graph_draws_a_mapped_task_as_one_node() -> None:
    result = CliRunner().invoke(main, ["graph", "tests/authoring_tasks.py:squares"])
    assert result.exit_code == 0 and '["square [map]"]' in result.output, result.output
    at.squares.run(n=3)
    from orchestrator.graph import to_mermaid
    drawn = to_mermaid(at.squares.last_workflow)
    assert "square [map x 3]" in drawn and "square[0]" not in drawn


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_coordinator_killed_mid_map_resumes_with_its_children(procs, mode, tmp_path) -> None:
    procs.workers(2, mode=mode)
    client = redis.Redis.from_url(procs.redis_url)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    submit = procs.start("submit", ["submit", "tests/authoring_tasks.py:slow_squares", "--param", "n=10",
                                    "--param", f"marker_dir={marker_dir}", "--redis-url", procs.redis_url, "-q"])
    run_id = run_id_from(submit)

    def midway() -> bool:
        done = [r for name, r in ((k.decode(), json.loads(v)) for k, v in client.hgetall(keys.tasks(run_id)).items())
                if name.startswith("slow_square[") and r["state"] == "success"]
        return client.hexists(keys.maps(run_id), "slow_square") and len(done) >= 2

    wait_for(midway, 30, "the map to expand and two children to succeed")
    submit.signal_all(signal.SIGKILL)
    submit.wait(5)
    wait_for(lambda: client.get(keys.lease(run_id)) is None, 10, "the dead coordinator's lease to lapse")
    resumed = procs.orch(["resume", run_id, "-q"], timeout=60)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert json.loads(client.hget(keys.results(run_id), "total")) == sum(x * x for x in range(10))
    assert square_runs(marker_dir) == dict.fromkeys(range(10), 1), "a child ran twice, or not at all"
    assert json.loads(client.hget(keys.results(run_id), "slow_square")) == [x * x for x in range(10)]


# ------------------------------------------------------------------ rerun from failure
def test_a_rerun_runs_the_failed_children_again_and_keeps_the_others() -> None:
    s = Scheduler([Spec("a"), Spec("m", ("a",), map_over=("a",)), Spec("z", ("m",))])
    s.start(0.0)
    s.handle(TaskSucceeded("a", 1, 1.0))
    s.handle(MapExpanded("m", 1, 2.0, 3))
    s.handle(TaskSucceeded("m[0]", 1, 3.0))
    s.handle(TaskFailed("m[1]", 1, 3.0, "ValueError: x"))
    s.handle(TaskSucceeded("m[2]", 1, 3.0))
    assert s.state("m") is TaskState.FAILURE and s.state("z") is TaskState.FAILURE and s.finished
    out = s.rerun((), 4.0)
    s.validate_state()
    assert [a.task for a in out if type(a).__name__ == "Dispatch"] == ["m[1]"]
    assert not [a for a in out if type(a).__name__ == "ExpandMap"]
    assert s.state("m") is TaskState.RUNNING and s.state("m[0]") is TaskState.SUCCESS
    s.handle(TaskSucceeded("m[1]", 2, 5.0))
    assert s.state("m") is TaskState.SUCCESS and s.state("z") is TaskState.QUEUED
    s.validate_state()


def test_naming_a_mapped_task_reruns_all_its_children_and_naming_its_upstream_is_refused() -> None:
    s = Scheduler([Spec("a"), Spec("m", ("a",), map_over=("a",))])
    s.start(0.0)
    s.handle(TaskSucceeded("a", 1, 1.0))
    s.handle(MapExpanded("m", 1, 2.0, 2))
    s.handle(TaskSucceeded("m[0]", 1, 3.0))
    s.handle(TaskSucceeded("m[1]", 1, 3.0))
    with pytest.raises(WorkflowError, match=r"a rerun of 'a' would change the input of mapped task 'm'"):
        s.rerun(["a"], 4.0)
    assert s.state("a") is TaskState.SUCCESS and s.finished  # nothing changed
    out = s.rerun(["m"], 4.0)
    assert [a.task for a in out if type(a).__name__ == "Dispatch"] == ["m[0]", "m[1]"]
    s.validate_state()


def test_an_embedded_rerun_of_a_map_runs_only_the_failed_item_again(tmp_path) -> None:
    (tmp_path / "bad").write_text("")
    results = at.checked.run(n=4, marker_dir=str(tmp_path))
    workflow = at.checked.last_workflow
    assert workflow.get_task("checked_item").state is TaskState.FAILURE and "total" not in results
    (tmp_path / "bad").unlink()
    results = workflow.retry()
    assert results["checked_item"] == [0, 10, 20, 30] and results["total"] == 60
    assert square_runs(tmp_path) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert "ValueError: item 2 is bad" in workflow.task_log("checked_item[2]", 1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_orch_retry_of_a_map_runs_only_the_failed_item_again(redis_server, orch_workers, tmp_path) -> None:
    orch_workers(2)
    (tmp_path / "bad").write_text("")
    at.checked.run(n=4, marker_dir=str(tmp_path), redis_url=redis_server.url)
    run_id = at.checked.last_workflow.last_run_id
    (tmp_path / "bad").unlink()
    retried = CliRunner().invoke(main, ["retry", run_id, "-q", "--redis-url", redis_server.url])
    assert retried.exit_code == 0, retried.output
    assert square_runs(tmp_path) == {0: 1, 1: 1, 2: 2, 3: 1}
    client = redis_server.client()
    assert json.loads(client.hget(keys.results(run_id), "total")) == 60
    logs = CliRunner().invoke(main, ["logs", run_id, "checked_item[2]", "--attempt", "1", "--redis-url",
                                     redis_server.url])
    assert logs.exit_code == 0 and "item 2" in logs.output and "ValueError: item 2 is bad" in logs.output


def test_a_child_whose_arguments_are_over_the_payload_limit_fails_the_map(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_MAX_PAYLOAD_BYTES", "60")
    workflow = Workflow("big items")
    workflow.add_task(Task("items", "authoring_tasks:letters", args=(3,)))
    workflow.add_task(Task("pad", "authoring_tasks:pair", ["items"], map_over="items", args=("x" * 80,)))
    workflow.run()
    pad = workflow.get_task("pad")
    assert pad.state is TaskState.FAILURE and pad.attempts == 1
    assert pad.error.startswith("MapError: child 'pad[0]' of task 'pad': its arguments encode to ")
    assert "over the limit of 60 bytes (ORCH_MAX_PAYLOAD_BYTES)" in pad.error
    assert not [t for t in workflow.tasks.values() if t.map_parent]
