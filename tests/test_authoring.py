"""``@task`` / ``@flow``: results passed as arguments, on the embedded backend and on real workers.

The flows live in tests/authoring_tasks.py, so that workers import their tasks by reference.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import authoring_tasks as at
from orchestrator import Flow, FlowError, Task, TaskHandle, Workflow, flow, task
from orchestrator.cli import main
from orchestrator.distributed import task_references
from shared import codec
from shared.errors import DuplicateTaskError, SerializationError, UnimportableTasksError
from shared.states import TaskState
from shared.upstream import Upstream

TARGET = "tests/authoring_tasks.py"


# ------------------------------------------------------------------ building
def test_a_flow_builds_a_workflow_with_dependencies_from_handles() -> None:
    workflow = at.etl.build(day="2026-12-02")
    assert isinstance(workflow, Workflow) and workflow.name == "etl"
    assert list(workflow.tasks) == ["extract", "rates", "load"]
    load = workflow.get_task("load")
    assert load.dependencies == ["extract", "rates"]
    assert load.args == (Upstream("extract"), Upstream("rates"))
    assert workflow.get_task("extract").args == ("2026-12-02",)
    assert workflow.get_task("extract").max_retries == 3 and workflow.get_task("extract").timeout == 30
    assert workflow.execution_order()[-1] == "load"
    workflow.validate()


def test_flow_defaults_fill_in_missing_parameters_and_each_build_is_new() -> None:
    first, second = at.etl.build(), at.etl.build(day="2026-12-09")
    assert first is not second
    assert first.get_task("rates").args == ("2026-12-01",)
    assert second.get_task("rates").args == ("2026-12-09",)


def test_a_task_called_twice_gets_distinct_names_and_options_apply_per_call() -> None:
    workflow = at.nested.build(base=4)
    assert list(workflow.tasks) == ["add", "add-2", "three", "add-3", "collect"]
    three = workflow.get_task("three")
    assert three.max_retries == 2 and three.dependencies == ["add", "add-2"]
    assert three.kwargs == {"y": Upstream("add-2")}
    assert workflow.get_task("collect").dependencies == ["add", "add-2", "three", "add-3"]


def test_handles_in_containers_and_keyword_arguments_become_results_embedded() -> None:
    results = at.nested.run(base=4)
    assert results["add"] == 4 and results["add-2"] == 5 and results["three"] == 9 and results["add-3"] == 5
    assert results["collect"] == {"values": [4, 5, 7], "named": {"three": 9, "k": "v"}, "pair": [5, "x"]}


def test_the_issue_example_runs_embedded() -> None:
    results = at.etl.run(day="2026-12-02")
    assert results == {"extract": [{"day": "2026-12-02", "n": i} for i in range(3)],
                       "rates": {"day": "2026-12-02", "eur": 1.1}, "load": 8}
    assert at.etl.last_workflow.get_task("load").state is TaskState.SUCCESS


def test_a_retry_with_results_as_arguments_embedded(tmp_path) -> None:
    results = at.nested.run(base=1, marker_dir=str(tmp_path))
    assert results["flaky_once"] == 5 and results["collect"]["pair"] == [5, "x"]
    assert at.nested.last_workflow.get_task("flaky_once").attempts == 2


def test_a_failed_upstream_fails_the_dependents_as_in_the_classic_api() -> None:
    @flow
    def broken():
        at.add(at.add("a", 1))          # "a" + 1 raises TypeError

    workflow = broken.build()
    assert workflow.run() == {}
    assert workflow.get_task("add").state is TaskState.FAILURE
    assert workflow.get_task("add-2").error == "upstream task 'add' failed"


def test_outside_a_flow_a_task_is_its_plain_function() -> None:
    assert at.add(2, y=3) == 5
    assert isinstance(at.add, type(at.extract)) and at.add.__wrapped__(1) == 1
    assert at.rates("d") == {"day": "d", "eur": 1.1}


# ------------------------------------------------------------------ errors at build time
def test_a_handle_from_another_flow_is_refused_naming_the_task() -> None:
    leaked: list[TaskHandle] = []

    @flow
    def first():
        leaked.append(at.add(1))

    @flow
    def second():
        at.add(leaked[0])

    first.build()
    with pytest.raises(FlowError,
                       match=r"task 'add' is given the handle of task 'add' from a flow that already returned"):
        second.build()

    def inner_flow_of_other_build():
        @flow
        def a():
            handle = at.add(1)

            @flow
            def b():
                at.add(handle)
            b.build()
        a.build()

    with pytest.raises(FlowError, match=r"handle of task 'add' from another flow"):
        inner_flow_of_other_build()


def test_a_handle_used_after_its_flow_returned_is_refused() -> None:
    kept: list[TaskHandle] = []

    @flow
    def keep():
        kept.append(at.add(1))

    keep.build()
    with pytest.raises(FlowError, match=r"handle of task 'add' is used after its flow returned"):
        at.add(kept[0])


def test_a_non_encodable_constant_argument_names_the_task() -> None:
    @flow
    def bad():
        at.add.with_options(name="adder")(object())

    with pytest.raises(SerializationError, match=r"an argument of task 'adder'.* is a builtins.object"):
        bad.build()


def test_a_handle_cannot_be_tested_or_indexed_while_building() -> None:
    @flow
    def branches():
        rows = at.extract("d")
        if rows:
            at.add(1)

    with pytest.raises(FlowError, match=r"result of task 'extract' is not known while the flow is built"):
        branches.build()


def test_parameter_errors_name_the_flow_and_its_parameters() -> None:
    with pytest.raises(FlowError, match=r"flow 'needs_day': missing a required argument: 'day'.*parameters: day"):
        at.needs_day.build()
    with pytest.raises(FlowError, match=r"flow 'etl': got an unexpected keyword argument 'region'"):
        at.etl.build(region="eu")


def test_with_options_refuses_unknown_options_and_duplicate_explicit_names() -> None:
    with pytest.raises(FlowError, match=r"unknown option\(s\) colour"):
        at.add.with_options(colour="red")

    @flow
    def twice():
        at.add.with_options(name="same")(1)
        at.add.with_options(name="same")(2)

    with pytest.raises(DuplicateTaskError):
        twice.build()


def test_a_task_that_workers_cannot_import_gets_the_classic_error() -> None:
    @task
    def local_only(x):
        return x

    @flow
    def uses_local():
        local_only(1)

    workflow = uses_local.build()
    with pytest.raises(UnimportableTasksError, match=r"local_only.*defined inside another function"):
        task_references(workflow.tasks)
    classic = Workflow()
    classic.add_task(Task("local_only", local_only.__wrapped__))
    with pytest.raises(UnimportableTasksError) as classic_error:
        task_references(classic.tasks)
    with pytest.raises(UnimportableTasksError) as flow_error:
        task_references(workflow.tasks)
    assert str(flow_error.value) == str(classic_error.value)


def test_flow_tasks_are_referenced_by_the_task_functions_import_path() -> None:
    assert task_references(at.etl.build().tasks) == ["authoring_tasks:extract", "authoring_tasks:rates",
                                                      "authoring_tasks:load"]


def test_a_forged_upstream_tag_must_name_a_task() -> None:
    with pytest.raises(SerializationError, match="upstream"):
        codec.decode(b'{"__orch__":"upstream","v":{"x":1}}')
    assert codec.decode(codec.encode([Upstream("a")])) == [Upstream("a")]


# ------------------------------------------------------------------ the CLI
def test_orch_validate_graph_and_submit_take_a_flow(monkeypatch) -> None:
    runner = CliRunner()
    checked = runner.invoke(main, ["validate", f"{TARGET}:etl"])
    assert checked.exit_code == 0, checked.output
    drawn = runner.invoke(main, ["graph", f"{TARGET}:etl"])
    assert drawn.exit_code == 0 and "extract" in drawn.output and "load" in drawn.output
    monkeypatch.delenv("ORCH_REDIS_URL", raising=False)
    ran = runner.invoke(main, ["submit", f"{TARGET}:etl", "-q"])
    assert ran.exit_code == 0, ran.output
    assert "load" in ran.output and "success" in ran.output


def test_orch_validate_says_which_parameter_a_flow_lacks() -> None:
    result = CliRunner().invoke(main, ["validate", f"{TARGET}:needs_day"])
    assert result.exit_code == 2
    assert "missing a required argument: 'day'" in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------ on real workers
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_results_as_arguments_on_workers(redis_server, orch_workers, mode, tmp_path) -> None:
    orch_workers(2, mode=mode)
    results = at.etl.run(day="2026-12-02", redis_url=redis_server.url)
    assert results["load"] == 8 and results["rates"] == {"day": "2026-12-02", "eur": 1.1}
    results = at.nested.run(base=4, marker_dir=str(tmp_path), redis_url=redis_server.url)
    assert results["collect"] == {"values": [4, 5, 7], "named": {"three": 9, "k": "v"}, "pair": [5, "x"]}
    assert at.nested.last_workflow.get_task("flaky_once").attempts == 2
    assert isinstance(at.nested, Flow)


def test_orch_submit_param_sets_the_flow_parameters_and_the_run_parameters(monkeypatch) -> None:
    monkeypatch.delenv("ORCH_REDIS_URL", raising=False)
    result = CliRunner().invoke(main, ["submit", f"{TARGET}:needs_day", "--param", "day=2026-12-24", "-q"])
    assert result.exit_code == 0, result.output
    unknown = CliRunner().invoke(main, ["submit", f"{TARGET}:needs_day", "--param", "day=x", "--param", "zone=eu"])
    assert unknown.exit_code == 2 and "unexpected keyword argument 'zone'" in unknown.output


def test_flow_run_parameters_reach_current_task_params() -> None:
    results = at.dated.run(day="2026-12-24")
    assert results["echo_params"] == {"day": "2026-12-24"}
