"""The ``orch`` command line: exit codes, one-line errors, outputs; target loading; diagrams."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from orchestrator import Task, Workflow, report
from orchestrator.cli import main
from orchestrator.graph import to_dot, to_mermaid
from orchestrator.loading import load_workflow, split_target
from shared.errors import RedisUnavailableError, TargetError
from shared.states import TaskState

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "tests" / "fixtures" / "cli_flows.py"


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Undo what loading targets does to sys.path and sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    roots = (str(tmp_path), str(FLOWS.parent), str(REPO / "example.py"))
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if file.startswith(roots):
            del sys.modules[name]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def flows(attr: str) -> str:
    return f"{FLOWS}:{attr}"


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# ------------------------------------------------------------------ submit
def test_submit_success_prints_table_and_exits_0() -> None:
    result = invoke("submit", flows("workflow"))
    assert result.exit_code == 0, result.output
    assert "produce" in result.stdout and "double" in result.stdout
    assert result.stdout.count("success") >= 2
    assert "2 tasks: 2 success" in result.stdout
    assert "[2/2] double: success" in result.stderr  # plain progress lines when not a terminal
    assert "[2/2]" not in result.stdout


def test_submit_quiet_shows_no_progress() -> None:
    result = invoke("submit", "--quiet", flows("workflow"))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "double" in result.stdout


def test_submit_failing_workflow_exits_1_with_first_error_line() -> None:
    result = invoke("submit", "--max-workers", "1", flows("failing"))
    assert result.exit_code == 1, result.output
    assert "failure" in result.stdout
    assert "ValueError: bad row 7" in result.stdout
    assert "second line" not in result.stdout
    assert "upstream task 'explode' failed" in result.stdout
    assert "Traceback" not in result.output


def test_submit_ctrl_c_cancels_prints_table_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_run(self: Workflow, *args, **kwargs):
        for task in self:
            task.state = TaskState.CANCELLED
            task.error = "cancelled by Ctrl-C"
        raise KeyboardInterrupt

    monkeypatch.setattr(Workflow, "run", interrupted_run)
    result = invoke("submit", flows("workflow"))
    assert result.exit_code == 130
    assert "run cancelled (Ctrl-C)" in result.stderr
    assert "cancelled" in result.stdout and "produce" in result.stdout


def test_submit_with_redis_url_runs_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(self: Workflow, *args, **kwargs):
        calls.append((args, kwargs))
        for task in self:
            task.state = TaskState.SUCCESS
        return self.results

    monkeypatch.setattr(Workflow, "run", fake_run)
    result = invoke("submit", flows("workflow"), env={"ORCH_REDIS_URL": "redis://example:6379/3"})
    assert result.exit_code == 0, result.output
    (args, kwargs), = calls
    assert kwargs["redis_url"] == "redis://example:6379/3"
    assert callable(kwargs["on_progress"])
    assert "max_workers" not in kwargs

    result = invoke("--redis-url", "redis://other:1/0", "submit", flows("workflow"))
    assert calls[-1][1]["redis_url"] == "redis://other:1/0"


def test_submit_backend_error_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(self: Workflow, *args, **kwargs):
        raise RedisUnavailableError("redis://nowhere:6379/0", "Connection refused\nmore detail")

    monkeypatch.setattr(Workflow, "run", unreachable)
    result = invoke("--redis-url", "redis://nowhere:6379/0", "submit", flows("workflow"))
    assert_one_line_error(result, "cannot reach Redis at redis://nowhere:6379/0", "more detail")


def test_max_workers_with_redis_url_is_a_usage_error() -> None:
    result = invoke("--redis-url", "redis://x:1/0", "submit", "-j", "2", flows("workflow"))
    assert result.exit_code == 2
    assert "--max-workers" in result.stderr


def test_submit_example_file() -> None:
    result = invoke("submit", str(REPO / "example.py"))
    assert result.exit_code == 0, result.output
    assert "4 tasks: 4 success" in result.stdout
    assert "task3: retrying (attempt 1): ConnectionError" in result.stderr


# ------------------------------------------------------------- bad targets
def test_file_not_found_exit_2_one_line() -> None:
    result = invoke("submit", "no/such/flow.py")
    assert_one_line_error(result, "no/such/flow.py", "not found")


def test_no_such_attribute_exit_2_names_the_workflows_found() -> None:
    result = invoke("submit", flows("nope"))
    assert_one_line_error(result, "has no attribute 'nope'", "Workflow objects it defines:", "failing")


def test_attribute_that_is_not_a_workflow_exit_2() -> None:
    assert_one_line_error(invoke("submit", flows("not_a_workflow")), "is a int, not a Workflow")


def test_callable_attribute_returning_a_workflow() -> None:
    result = invoke("submit", flows("make_workflow"))
    assert result.exit_code == 0, result.output
    assert "only" in result.stdout and "success" in result.stdout


@pytest.mark.parametrize(
    "attr, fragment",
    [("make_nothing", "make_nothing() returned a str, not a Workflow"),
     ("make_broken", "make_broken() raised RuntimeError: factory is broken")],
)
def test_callable_attribute_failures_exit_2(attr: str, fragment: str) -> None:
    assert_one_line_error(invoke("validate", flows(attr)), fragment)


def test_error_inside_the_file_names_type_message_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken_flow.py", """\
        import os

        x = 1 / 0
    """)
    result = invoke("submit", str(path))
    assert_one_line_error(result, str(path), "ZeroDivisionError: division by zero", "(line 3)")
    assert "broken_flow" not in sys.modules


def test_syntax_error_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "syntax_flow.py", "def f(:\n    pass\n")
    assert_one_line_error(invoke("validate", str(path)), "SyntaxError", "line 1")


def test_cycle_exit_2_with_the_cycle() -> None:
    for command in ("submit", "validate", "graph"):
        result = invoke(command, flows("cycle"))
        assert_one_line_error(result, "dependency cycle: a -> c -> b -> a")


def test_missing_dependency_exit_2() -> None:
    for command in ("submit", "validate"):
        assert_one_line_error(invoke(command, flows("missing_dependency")), "'a' depends on 'nowhere'")


# ----------------------------------------------------------- module targets
def test_module_target_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "orchtestpkg" / "__init__.py", "")
    write(tmp_path / "orchtestpkg" / "flows.py", """\
        from workflow import Task, Workflow

        def one():
            return 1

        def build():
            wf = Workflow("pkg")
            wf.add_task(Task("one", one))
            return wf

        pipeline = build()
    """)
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "orchtestpkg.flows:pipeline")
    assert result.exit_code == 0, result.output
    assert "one" in result.stdout and "success" in result.stdout
    result = invoke("validate", "orchtestpkg.flows:build")
    assert result.exit_code == 0, result.output
    assert "ok: 1 task, valid DAG" in result.stdout
    assert_one_line_error(invoke("validate", "orchtestpkg.flows"), "has no attribute 'workflow'", "pipeline")


def test_unknown_module_exit_2() -> None:
    assert_one_line_error(invoke("submit", "no_such_pkg_xyz.flows:wf"), "no module named 'no_such_pkg_xyz'")


def test_import_error_inside_a_module_is_reported_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "needs_missing.py", "import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke("submit", "needs_missing"),
                          "error while importing needs_missing", "ModuleNotFoundError")


# ------------------------------------------------------------------ loading
def test_file_is_loaded_under_its_stem_for_workers(tmp_path: Path) -> None:
    path = write(tmp_path / "pipelines" / "etl_stem_test.py", """\
        from workflow import Task, Workflow

        def extract():
            return 1

        workflow = Workflow()
        workflow.add_task(Task("extract", extract))
    """)
    wf = load_workflow(str(path))
    func = wf.get_task("extract").func
    assert func.__module__ == "etl_stem_test"
    assert sys.modules["etl_stem_test"].extract is func
    assert sys.path[0] == str(path.parent.resolve())
    from shared.refs import reference_of
    assert reference_of(func) == "etl_stem_test:extract"


def test_a_file_whose_stem_is_an_imported_module_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "json.py", "workflow = None\n")
    with pytest.raises(TargetError, match="already taken"):
        load_workflow(str(path))


@pytest.mark.parametrize(
    "target, expected",
    [("flows.py", ("flows.py", "workflow")),
     ("flows.py:etl", ("flows.py", "etl")),
     ("pkg.mod:obj.attr", ("pkg.mod", "obj.attr")),
     ("C:\\flows\\etl.py", ("C:\\flows\\etl.py", "workflow")),
     ("C:\\flows\\etl.py:wf", ("C:\\flows\\etl.py", "wf"))],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


def test_empty_attribute_is_an_error() -> None:
    with pytest.raises(TargetError, match="nothing after ':'"):
        split_target("flows.py:")


# ------------------------------------------------------------ validate/graph
def test_validate_prints_ok_and_the_order() -> None:
    result = invoke("validate", flows("workflow"))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["ok: 2 tasks, valid DAG", "execution order (2):", "  1. produce",
                                          "  2. double"]


def test_graph_mermaid_and_dot() -> None:
    mermaid = invoke("graph", flows("failing"))
    assert mermaid.exit_code == 0, mermaid.output
    assert "graph LR" in mermaid.stdout
    assert mermaid.stdout.count("-->") == 2
    assert '["after explode"]' in mermaid.stdout
    dot = invoke("graph", "--format", "dot", flows("failing"))
    assert dot.exit_code == 0, dot.output
    assert dot.stdout.startswith('digraph "failing" {')
    assert dot.stdout.count("->") == 2
    assert 'label="after explode"' in dot.stdout


def _odd_names() -> Workflow:
    wf = Workflow('say "hi"')
    wf.add_task(Task('say "hi"', len))
    wf.add_task(Task("a-b c#1 <x>", len, dependencies=['say "hi"']))
    wf.add_task(Task("back\\slash\nnewline", len, dependencies=["a-b c#1 <x>", 'say "hi"']))
    return wf


def test_mermaid_escapes_names() -> None:
    text = to_mermaid(_odd_names())
    assert 't0["say #quot;hi#quot;"]' in text
    assert 't1["a-b c#35;1 #lt;x#gt;"]' in text
    assert 't2["back\\slash newline"]' in text
    assert ["t0 --> t1", "t1 --> t2", "t0 --> t2"] == [line.strip() for line in text.splitlines() if "-->" in line]


def test_dot_escapes_names() -> None:
    text = to_dot(_odd_names())
    assert text.startswith('digraph "say \\"hi\\"" {')
    assert 't0 [label="say \\"hi\\""];' in text
    assert 't2 [label="back\\\\slash\\nnewline"];' in text
    assert "t1 -> t2;" in text and text.rstrip().endswith("}")


def test_results_table_keeps_the_failures_of_a_big_workflow() -> None:
    wf = Workflow("big")
    for i in range(30):
        wf.add_task(Task(f"t{i}", len))
        wf.tasks[f"t{i}"].state = TaskState.SUCCESS
    wf.tasks["t17"].state, wf.tasks["t17"].attempts, wf.tasks["t17"].error = TaskState.FAILURE, 1, "Boom: x"
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(report.results_table(wf, max_rows=5))
    console.print(report.summary(wf))
    text = console.export_text()
    assert "t17" in text and "Boom: x" in text
    assert "t0 " in text and "t5 " not in text
    assert "25 more tasks not shown" in text
    assert "30 tasks: 29 success, 1 failure" in text


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_display_on_a_terminal_and_off_it(terminal: bool) -> None:
    from orchestrator.actions import Transition
    from orchestrator.scheduler import Scheduler
    from shared.events import TaskFailed, TaskStarted, TaskSucceeded

    wf = load_workflow(flows("failing"))
    scheduler = Scheduler(wf)
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=100)
    with report.ProgressDisplay(len(wf), console=console) as display:
        def feed(actions):
            display(scheduler, [a for a in actions if isinstance(a, Transition)])

        feed(scheduler.start(0.0))
        feed(scheduler.handle(TaskStarted("produce", 1, 1.0)))
        feed(scheduler.handle(TaskSucceeded("produce", 1, 2.0, b"")))
        feed(scheduler.handle(TaskFailed("explode", 1, 3.0, "ValueError: boom")))
    text = out.getvalue()
    if terminal:
        assert "3/3" in text and "\x1b[" in text
    else:
        assert text.splitlines() == ["[1/3] produce: success (attempt 1)",
                                     "[2/3] explode: failure (attempt 1): ValueError: boom",
                                     "[3/3] after explode: failure: upstream task 'explode' failed"]


def test_version_and_help() -> None:
    assert invoke("--version").stdout.startswith("orch ")
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("submit", "validate", "graph"):
        assert command in result.stdout


# ---------------------------------------------------------- real processes
def _orch() -> str:
    script = Path(sys.executable).parent / "orch"
    found = str(script) if script.exists() else shutil.which("orch")
    assert found, "the orch console script is not installed (pip install -e .)"
    return found


def test_console_script_failing_run_exit_1_no_traceback() -> None:
    proc = subprocess.run([_orch(), "submit", flows("failing")], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "ValueError: bad row 7" in proc.stdout


def test_console_script_bad_target_exit_2_one_line() -> None:
    proc = subprocess.run([_orch(), "submit", "missing_flow.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: cannot load 'missing_flow.py': file 'missing_flow.py' not found"]


def test_console_script_ctrl_c_exits_130(tmp_path: Path) -> None:
    started = tmp_path / "started"
    proc = subprocess.Popen([_orch(), "submit", flows("slow")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ORCH_TEST_STARTED": str(started)})
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the task never started"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "run cancelled (Ctrl-C)" in stderr
    assert "Traceback" not in stdout + stderr
    assert "cancelled" in stdout and "sleeper" in stdout


def test_example_runs_as_a_script() -> None:
    proc = subprocess.run([sys.executable, "example.py"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "task3: success after 2 attempt(s)" in proc.stdout
    for name in ("task1", "task2", "task4"):
        assert f"{name}: success after 1 attempt(s)" in proc.stdout
