"""End-to-end runs on the embedded local backend: each attempt in a forked child process."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import Task as OTask
from orchestrator import TaskState as OTaskState
from orchestrator import Workflow as OWorkflow
from orchestrator.backends.local import LocalBackend
from shared.states import TaskState
from tests.tasks_for_tests import bump, log_line, read_log
from workflow import Task, Workflow

pytestmark = pytest.mark.timeout(60)


def run_timed(workflow: Workflow, **kw) -> tuple[dict, float]:
    started = time.monotonic()
    results = workflow.run(**kw)
    return results, time.monotonic() - started


def gone(pid: int, within: float = 3.0) -> bool:
    """True once ``pid`` no longer exists or is a zombie (dead, waiting to be reaped)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# -------------------------------------------------------------------- the seed


def test_seed_example_exactly_as_users_write_it():
    from workflow import Task, Workflow  # noqa: F811 - the import users write

    workflow = Workflow()
    task1 = Task("task1", lambda: "result1")

    def process():
        return "processed " + workflow.get_task_result("task1")

    task2 = Task("task2", process, dependencies=["task1"])
    workflow.add_task(task1)
    workflow.add_task(task2)
    results = workflow.run()
    assert results == {"task1": "result1", "task2": "processed result1"}
    assert task1.state == "success" and task2.state is TaskState.SUCCESS
    assert task1.result == "result1" and task2.result == "processed result1"
    assert workflow.get_task_result("task2") == "processed result1"
    assert workflow.results == results


def test_public_names_are_the_same_objects():
    assert Task is OTask and Workflow is OWorkflow
    from workflow import TaskState as WTaskState

    assert WTaskState is OTaskState is TaskState


# ------------------------------------------------------------ states after run


def test_states_attempts_errors_and_times_after_run():
    w = Workflow()

    def fails():
        raise ValueError("bad row 7")

    ok = w.add_task(Task("ok", lambda: time.sleep(0.2) or {"n": (1, 2)}))
    bad = w.add_task(Task("bad", fails, max_retries=1))
    results = w.run(max_workers=2)
    assert results == {"ok": {"n": (1, 2)}}
    assert type(ok.result["n"]) is tuple  # through the codec, not pickle-by-accident
    assert ok.state is TaskState.SUCCESS and ok.attempts == 1
    assert ok.error is None and ok.traceback is None
    assert ok.started_at is not None and ok.finished_at >= ok.started_at
    assert 0.15 <= ok.duration < 5
    assert bad.state is TaskState.FAILURE and bad.attempts == 2
    assert bad.error == "ValueError: bad row 7"
    assert "Traceback (most recent call last)" in bad.traceback
    assert 'raise ValueError("bad row 7")' in bad.traceback
    assert "in fails" in bad.traceback
    assert bad.traceback.rstrip().endswith("ValueError: bad row 7")
    assert bad.result is None and bad.finished_at is not None


@pytest.mark.parametrize(
    "exc, expected",
    [
        (RuntimeError("first line\nsecond line"), "RuntimeError: first line"),
        (KeyError("k"), "KeyError: 'k'"),
        (ZeroDivisionError(), "ZeroDivisionError"),
    ],
)
def test_exception_error_line(exc, expected):
    w = Workflow()

    def raises():
        raise exc

    t = w.add_task(Task("t", raises))
    assert w.run(max_workers=1) == {}
    assert t.state is TaskState.FAILURE
    assert t.error == expected
    assert type(exc).__name__ in t.traceback


# ------------------------------------------------------------------ parallelism


def sleepers(n: int, seconds: float, log: Path) -> Workflow:
    w = Workflow()
    for i in range(n):
        def work(i=i):
            log_line(log, f"start{i}")
            time.sleep(seconds)
            log_line(log, f"end{i}")
            return i

        w.add_task(Task(f"s{i}", work))
    return w


def max_overlap(log: Path) -> int:
    running = peak = 0
    for text, _ in sorted(read_log(log), key=lambda e: (e[1], e[0].startswith("start"))):
        running += 1 if text.startswith("start") else -1
        peak = max(peak, running)
    return peak


def test_tasks_run_in_parallel(tmp_path):
    log = tmp_path / "log"
    results, elapsed = run_timed(sleepers(4, 0.5, log), max_workers=4)
    assert results == {f"s{i}": i for i in range(4)}
    assert elapsed < 1.5, f"4 x 0.5 s on 4 workers took {elapsed:.2f}s"
    assert max_overlap(log) == 4


def test_one_worker_runs_one_task_at_a_time(tmp_path):
    log = tmp_path / "log"
    results, elapsed = run_timed(sleepers(4, 0.5, log), max_workers=1)
    assert len(results) == 4
    assert elapsed >= 2.0
    assert max_overlap(log) == 1


def test_max_workers_bounds_concurrency(tmp_path):
    log = tmp_path / "log"
    results, elapsed = run_timed(sleepers(5, 0.3, log), max_workers=2)
    assert len(results) == 5
    assert max_overlap(log) == 2
    assert 0.9 <= elapsed < 2.5


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError):
        LocalBackend({}, max_workers=0)


def test_unknown_local_run_option():
    w = Workflow()
    w.add_task(Task("t", lambda: 1))
    with pytest.raises(TypeError, match="bogus"):
        w.run(bogus=True)


# ---------------------------------------------------------------------- retries


def test_retries_with_delay(tmp_path):
    counter = tmp_path / "count"
    log = tmp_path / "log"

    def flaky():
        n = bump(counter)
        log_line(log, f"attempt{n}")
        if n < 3:
            raise ConnectionError(f"try {n}")
        return f"ok after {n}"

    w = Workflow()
    t = w.add_task(Task("flaky", flaky, max_retries=3, retry_delay=0.3))
    results, elapsed = run_timed(w, max_workers=2)
    assert results == {"flaky": "ok after 3"}
    assert t.attempts == 3 and t.state is TaskState.SUCCESS
    assert t.error is None and t.traceback is None
    assert elapsed >= 0.6
    times = [at for _, at in read_log(log)]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.3 and times[2] - times[1] >= 0.3


def test_retry_backoff_and_exhaustion(tmp_path):
    log = tmp_path / "log"

    def always_fails():
        log_line(log, "attempt")
        raise ValueError("nope")

    w = Workflow()
    t = w.add_task(Task("t", always_fails, max_retries=2, retry_delay=0.2, retry_backoff=2.0))
    d = w.add_task(Task("d", lambda: 1, dependencies=["t"]))
    results, elapsed = run_timed(w, max_workers=1)
    assert results == {}
    assert t.state is TaskState.FAILURE and t.attempts == 3 and t.error == "ValueError: nope"
    assert d.state is TaskState.FAILURE and d.attempts == 0
    times = [at for _, at in read_log(log)]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2
    assert times[2] - times[1] >= 0.4
    assert elapsed < 3


def test_a_task_waiting_for_its_retry_does_not_hold_a_worker(tmp_path):
    counter = tmp_path / "count"
    log = tmp_path / "log"

    def flaky():
        n = bump(counter)
        log_line(log, f"flaky{n}")
        if n == 1:
            raise RuntimeError("first attempt fails")
        return "flaky ok"

    def other():
        log_line(log, "other-start")
        time.sleep(0.2)
        log_line(log, "other-end")
        return "other ok"

    w = Workflow()
    w.add_task(Task("flaky", flaky, max_retries=1, retry_delay=1.0))  # added first: runs first
    w.add_task(Task("other", other))
    results, elapsed = run_timed(w, max_workers=1)
    assert results == {"flaky": "flaky ok", "other": "other ok"}
    at = dict(read_log(log))
    assert at["flaky1"] < at["other-start"] < at["other-end"] < at["flaky2"]
    assert at["flaky2"] - at["flaky1"] >= 1.0
    assert elapsed < 3  # sanity only: the order above is what shows the slot was free


# --------------------------------------------------------------------- timeouts


def test_timeout_kills_the_attempt_and_everything_it_started(tmp_path):
    pid_file = tmp_path / "pid"

    def hangs():
        child = subprocess.Popen(["sleep", "30"])
        pid_file.write_text(str(child.pid))
        time.sleep(30)
        return "never"

    w = Workflow()
    t = w.add_task(Task("hangs", hangs, timeout=0.5))
    after = w.add_task(Task("after", lambda: 1, dependencies=["hangs"]))
    results, elapsed = run_timed(w, max_workers=1)
    assert results == {}
    assert t.state is TaskState.FAILURE and t.attempts == 1
    assert "TaskTimeout" in t.error and "timeout of 0.5s" in t.error
    assert after.state is TaskState.FAILURE and after.error == "upstream task 'hangs' failed"
    assert 0.5 <= elapsed < 0.5 + 1.5
    assert t.duration is not None and t.duration < 0.5 + 1.0
    grandchild = int(pid_file.read_text())
    assert gone(grandchild), f"process {grandchild} started by the timed-out task still runs"


def test_timed_out_attempt_is_retried(tmp_path):
    counter = tmp_path / "count"

    def slow_first():
        n = bump(counter)
        if n == 1:
            time.sleep(20)
        return f"attempt {n}"

    w = Workflow()
    t = w.add_task(Task("t", slow_first, timeout=0.4, max_retries=1))
    results, elapsed = run_timed(w, max_workers=1)
    assert results == {"t": "attempt 2"}
    assert t.attempts == 2 and t.state is TaskState.SUCCESS and t.error is None
    assert elapsed < 3


# ------------------------------------------------------------------- crashes


def exit_3():
    os._exit(3)


def segfault():
    import faulthandler

    faulthandler.disable()  # pytest's faulthandler would print the child's stack on the terminal
    ctypes.string_at(0)


def exits_through_system_exit():
    sys.exit(5)  # a BaseException: not a task error, the process just ends without a result


def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(5)


def test_dying_processes_are_failures_and_the_run_goes_on():
    w = Workflow()
    exits = w.add_task(Task("exits", exit_3))
    segv = w.add_task(Task("segv", segfault))
    killed = w.add_task(Task("killed", sigkill_self))
    sys_exit = w.add_task(Task("sys_exit", exits_through_system_exit))
    after = w.add_task(Task("after", lambda: "x", dependencies=["exits"]))
    fine = w.add_task(Task("fine", lambda: "fine"))
    later = w.add_task(Task("later", lambda: "later", dependencies=["fine"]))
    results, elapsed = run_timed(w, max_workers=2)
    assert results == {"fine": "fine", "later": "later"}
    for t in (exits, segv, killed, sys_exit):
        assert t.state is TaskState.FAILURE, t
        assert "worker process died" in t.error, t.error
        assert t.attempts == 1
    assert "exit code 3" in exits.error
    assert "SIGSEGV" in segv.error
    assert "SIGKILL" in killed.error
    assert "exit code 5" in sys_exit.error
    assert after.state is TaskState.FAILURE and after.error == "upstream task 'exits' failed"
    assert fine.state is later.state is TaskState.SUCCESS
    assert elapsed < 5


def test_crashed_attempt_is_retried(tmp_path):
    counter = tmp_path / "count"

    def crash_once():
        if bump(counter) == 1:
            os._exit(1)
        return "survived"

    w = Workflow()
    t = w.add_task(Task("t", crash_once, max_retries=1))
    assert w.run(max_workers=1) == {"t": "survived"}
    assert t.attempts == 2 and t.error is None


# ------------------------------------------------------------------- upstream


def test_upstream_failure_propagates_while_an_independent_branch_succeeds():
    w = Workflow()

    def boom():
        raise ValueError("root cause")

    a = w.add_task(Task("a", boom))
    b = w.add_task(Task("b", lambda: "b", dependencies=["a"]))
    c = w.add_task(Task("c", lambda: "c", dependencies=["b"]))
    x = w.add_task(Task("x", lambda: "x"))
    y = w.add_task(Task("y", lambda: w.get_task_result("x") + "y", dependencies=["x"]))
    results = w.run(max_workers=2)
    assert results == {"x": "x", "y": "xy"}
    assert a.state is TaskState.FAILURE and a.error == "ValueError: root cause" and a.attempts == 1
    for t in (b, c):
        assert t.state is TaskState.FAILURE
        assert t.error == "upstream task 'a' failed"
        assert t.attempts == 0
        assert t.result is None and t.traceback is None
    assert x.state is y.state is TaskState.SUCCESS


# ---------------------------------------------------------------- results


def test_unserializable_result_fails_the_task():
    w = Workflow()
    t = w.add_task(Task("bad", lambda: {"thing": object()}))
    d = w.add_task(Task("d", lambda: 1, dependencies=["bad"]))
    assert w.run(max_workers=1) == {}
    assert t.state is TaskState.FAILURE and t.attempts == 1
    assert "SerializationError" in t.error
    assert "cannot serialize" in t.error
    assert "result of task 'bad'['thing']" in t.error
    assert d.error == "upstream task 'bad' failed"


def test_large_result_passes_through_the_pipe():
    big = "x" * 3_000_000
    w = Workflow()
    w.add_task(Task("big", lambda: big))
    w.add_task(Task("size", lambda: len(w.get_task_result("big")), dependencies=["big"]))
    results = w.run(max_workers=2)
    assert results["size"] == 3_000_000 and results["big"] == big


def test_func_by_import_reference_with_args_and_kwargs():
    w = Workflow()
    w.add_task(Task("add", "tests.tasks_for_tests:add", args=(2, 3), kwargs={"scale": 10}))
    w.add_task(Task("join", "os.path:join", args=("a", "b")))
    w.add_task(Task("echo", "tests.tasks_for_tests:echo", args=[1, (2, 3)], kwargs={"k": b"v"}))
    results = w.run(max_workers=2)
    assert results == {"add": 50, "join": "a/b", "echo": {"args": [1, (2, 3)], "kwargs": {"k": b"v"}}}


def test_import_reference_that_does_not_resolve_fails_the_task():
    w = Workflow()
    t = w.add_task(Task("t", "tests.tasks_for_tests:no_such_function"))
    u = w.add_task(Task("u", "no_such_module_xyz:f"))
    assert w.run(max_workers=2) == {}
    assert t.state is TaskState.FAILURE and t.error.startswith("TaskImportError: ")
    assert "no_such_function" in t.error
    assert u.state is TaskState.FAILURE and "no_such_module_xyz" in u.error


def test_callable_with_args_and_kwargs():
    w = Workflow()
    w.add_task(Task("t", lambda a, b, *, c: (a, b, c), args=(1, "two"), kwargs={"c": [3]}))
    assert w.run(max_workers=1) == {"t": (1, "two", [3])}


# ------------------------------------------------------------------ run twice


def test_run_twice_resets_state(tmp_path):
    counter = tmp_path / "count"

    def fails_first_run():
        if bump(counter) == 1:
            raise RuntimeError("first run")
        return "second run"

    w = Workflow()
    f = w.add_task(Task("f", fails_first_run))
    g = w.add_task(Task("g", lambda: w.get_task_result("f") + "!", dependencies=["f"]))
    h = w.add_task(Task("h", lambda: "h"))
    assert w.run(max_workers=2) == {"h": "h"}
    assert f.state is TaskState.FAILURE and f.error == "RuntimeError: first run" and f.traceback
    assert g.state is TaskState.FAILURE and g.error == "upstream task 'f' failed"
    assert w.run(max_workers=2) == {"f": "second run", "g": "second run!", "h": "h"}
    for t in (f, g, h):
        assert t.state is TaskState.SUCCESS
        assert t.attempts == 1, t
        assert t.error is None and t.traceback is None
    assert w.run(max_workers=2) == {"f": "second run", "g": "second run!", "h": "h"}
    assert [t.attempts for t in (f, g, h)] == [1, 1, 1]


def test_empty_workflow_runs():
    assert Workflow().run() == {}
