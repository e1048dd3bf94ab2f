"""Per-task logs: captured where the attempt runs, bounded, live, read back by ``orch logs`` and Python.

The bounded buffer and the reading side without processes; then the embedded
backend; then real ``orch worker`` processes of both kinds (lean and RQ) on a
real Redis: a task that prints, logs and raises read back with ``orch logs``
(text and ``--json``), ``--follow`` on a running task, the cap (a task
printing ~100 MB), a timed-out task's log, and ``ORCH_TASK_LOG_LEVEL``.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import log_tasks
from bench.procs import orch_command
from orchestrator import Task, Workflow
from orchestrator.cli import main
from orchestrator.logs import MemoryLogs, attempt_log
from shared import keys
from shared.errors import NoSuchAttemptError
from shared.log_records import LINE_OVERHEAD, text_bytes
from worker.task_log import LogBuffer

TESTS = Path(__file__).parent


# ------------------------------------------------------------------ the buffer and the reader, no processes
def stored(buffer: LogBuffer, memory: MemoryLogs) -> None:
    batch = buffer.take()
    if batch is not None:
        memory.apply("t", 1, batch)


def test_a_log_past_its_cap_keeps_its_first_and_last_lines_and_says_what_was_dropped() -> None:
    buffer, memory = LogBuffer(4096), MemoryLogs()
    for i in range(1000):
        buffer.add(float(i), f"line {i}")
        if i % 100 == 0:
            stored(buffer, memory)  # flushes between writes: sent lines leave the tail too
    stored(buffer, memory)
    records = memory.records("t", 1)
    assert sum(text_bytes(r.text) + LINE_OVERHEAD for r in records) <= 4096
    lines, last = attempt_log(memory, "t", 1)
    text = [line.line for line in lines]
    assert text[0] == "line 0" and text[-1] == "line 999"
    notice = next(t for t in text if t.startswith("[orch:"))
    dropped = 1000 - len(records)
    assert f"{dropped} lines" in notice and "dropped" in notice
    numbers = [int(t.split()[1]) for t in text if t.startswith("line")]
    cut = next(i for i in range(1, len(numbers)) if numbers[i] != numbers[i - 1] + 1)
    assert numbers[:cut] == list(range(cut))  # a prefix, then a suffix
    assert numbers[cut:] == list(range(numbers[cut], 1000))
    assert f"({sum(text_bytes(f'line {n}') for n in range(cut, numbers[cut]))} bytes)" in notice
    assert last is not None and last.seq == 1000


def test_a_line_without_end_is_cut_to_fit_and_reading_goes_on_from_where_it_stopped() -> None:
    buffer, memory = LogBuffer(4096), MemoryLogs()
    buffer.add(1.0, "y" * 1000)
    stored(buffer, memory)
    first, last = attempt_log(memory, "t", 1)
    assert all(len(line.line) <= buffer.max_line for line in first)
    assert "".join(line.line for line in first) == "y" * 1000
    buffer.add(2.0, "next")
    stored(buffer, memory)
    more, _ = attempt_log(memory, "t", 1, after=last)
    assert [line.line for line in more] == ["next"]


# ------------------------------------------------------------------ the embedded backend
def chatty_workflow(**task_options) -> Workflow:
    workflow = Workflow("logs")
    workflow.add_task(Task("chatty", log_tasks.chatty, **task_options))
    workflow.add_task(Task("quiet", log_tasks.quiet))
    return workflow


def assert_chatty_log(text: str, level: str = "INFO") -> None:
    assert "hello from print" in text and "to stderr" in text
    assert "WARNING lib: library warning record" in text
    assert ("INFO lib: library info record" in text) == (level == "INFO")
    assert "library debug record" not in text
    assert "Traceback (most recent call last)" in text and "ValueError: bad row 7" in text


def test_embedded_run_keeps_each_attempts_log() -> None:
    workflow = chatty_workflow(max_retries=1)
    workflow.run()
    assert workflow.tasks["chatty"].attempts == 2
    for attempt in (1, 2):
        assert_chatty_log(workflow.task_log("chatty", attempt))
    assert workflow.tasks["chatty"].log == workflow.task_log("chatty")
    assert workflow.task_log("quiet") == "" and workflow.tasks["quiet"].log == ""
    with pytest.raises(NoSuchAttemptError, match="no attempt 3"):
        workflow.task_log("chatty", 3)


def test_embedded_log_level_and_cap_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ORCH_TASK_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("ORCH_MAX_LOG_BYTES", "65536")
    workflow = chatty_workflow()
    workflow.add_task(Task("flood", log_tasks.flood, args=(1,)))
    workflow.run()
    assert_chatty_log(workflow.task_log("chatty"), level="WARNING")
    flooded = workflow.task_log("flood")
    assert len(flooded) < 65536 and "lines (" in flooded and "dropped here" in flooded
    assert flooded.startswith("         0 x") and "      9999 x" in flooded


def test_embedded_timed_out_task_keeps_its_log() -> None:
    workflow = Workflow("timeout")
    workflow.add_task(Task("sleepy", log_tasks.print_then_sleep, args=(30,), timeout=1.5))
    started = time.monotonic()
    workflow.run()
    assert time.monotonic() - started < 20
    assert workflow.tasks["sleepy"].state == "failure"
    assert workflow.task_log("sleepy") == "before the timeout\n"


# ------------------------------------------------------------------ real workers, both kinds
def orch_logs(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["logs", "--redis-url", url, *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_task_that_prints_logs_and_raises_read_back_with_orch_logs(redis_server, orch_workers, mode,
                                                                    monkeypatch) -> None:
    orch_workers(1, mode=mode)
    monkeypatch.setenv("ORCH_RETENTION", "3600")  # the coordinator's (here); the worker keeps its 7 days
    workflow = chatty_workflow(max_retries=1)
    workflow.run(redis_url=redis_server.url)
    run_id = workflow.last_run_id
    assert workflow.tasks["chatty"].state == "failure" and workflow.tasks["chatty"].attempts == 2
    assert_chatty_log(workflow.task_log("chatty"))
    assert_chatty_log(workflow.task_log("chatty", 1))
    assert workflow.tasks["chatty"].log == workflow.task_log("chatty", 2)

    code, out, _ = orch_logs(redis_server.url, run_id, "chatty")
    assert code == 0
    assert_chatty_log(out)
    first = out.splitlines()[0]
    assert first.endswith(" hello from print") and first[2] == ":" and "[" not in first

    code, out, _ = orch_logs(redis_server.url, run_id, "chatty", "--attempt", "1", "--json")
    assert code == 0
    lines = json.loads(out)
    assert {(d["task"], d["attempt"]) for d in lines} == {("chatty", 1)}
    assert all(set(d) == {"task", "attempt", "time", "line"} and abs(d["time"] - time.time()) < 120 for d in lines)
    assert_chatty_log("\n".join(d["line"] for d in lines))

    code, out, _ = orch_logs(redis_server.url, run_id)  # every task: the latest attempt, prefixed
    assert code == 0 and "[chatty #2] hello from print" in out and "quiet" not in out

    client = redis_server.client()
    assert not client.exists(keys.task_log(run_id, "quiet", 1))  # printed nothing: nothing written
    assert {m.decode() for m in client.smembers(keys.logs(run_id))} == {
        keys.task_log(run_id, "chatty", 1), keys.task_log(run_id, "chatty", 2)}
    assert 3000 < client.ttl(keys.task_log(run_id, "chatty", 1)) <= 3600  # the run's retention, set at its end

    code, _, err = orch_logs(redis_server.url, "no-such-run")
    assert code == 2 and err.startswith("error: no run 'no-such-run' in this Redis")
    code, _, err = orch_logs(redis_server.url, run_id, "chatty", "--attempt", "3")
    assert code == 2 and "error: task 'chatty' has no attempt 3" in err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_follow_shows_a_running_tasks_lines_before_it_ends(redis_server, orch_workers, tmp_path) -> None:
    from fault_helpers import Background, wait_for

    orch_workers(1)
    marker = tmp_path / "ended"
    workflow = Workflow("follow")
    workflow.add_task(Task("drip", log_tasks.drip, args=(8, 0.5, str(marker))))
    background = Background(workflow, redis_server.url)
    run_id = background.wait_run_id()
    errors = tmp_path / "follow.err"
    follower = subprocess.Popen([*orch_command(), "logs", "--redis-url", redis_server.url, run_id, "drip",
                                 "--follow", "--json"], stdout=subprocess.PIPE, stderr=open(errors, "wb"),
                                text=True, start_new_session=True)
    try:
        first = json.loads(follower.stdout.readline())
        assert first["line"] == "drip 0" and not marker.exists()  # seen while the task still runs
        rest = follower.stdout.read()  # to the end: it exits by itself once the task is final
        assert follower.wait(30) == 0, errors.read_text()
        lines = [first["line"]] + [json.loads(line)["line"] for line in rest.splitlines()]
        assert lines == [f"drip {i}" for i in range(8)]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    background.join(30)
    wait_for(marker.exists, 5, "the task to end")
    code, out, _ = orch_logs(redis_server.url, run_id, "--follow")  # a final run: all of it, then the end
    assert code == 0 and [line.split(" ", 1)[1] for line in out.splitlines()] == [
        f"[drip #1] drip {i}" for i in range(8)]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_task_printing_100_mb_is_bounded_and_does_not_stall_its_worker(redis_server, orch_workers, mode) -> None:
    orch_workers(1, mode=mode)
    workflow = Workflow("flood")
    workflow.add_task(Task("flood", log_tasks.flood, args=(100,)))
    workflow.add_task(Task("after", log_tasks.quiet, dependencies=["flood"]))
    started = time.monotonic()
    workflow.run(redis_url=redis_server.url)
    elapsed = time.monotonic() - started
    assert workflow.tasks["after"].state == "success"
    assert elapsed < 90, f"a 100 MB flood took {elapsed:.1f}s"
    client = redis_server.client()
    key = keys.task_log(workflow.last_run_id, "flood", 1)
    entries = client.xrange(key)
    assert sum(text_bytes(fields[b"l"].decode()) + LINE_OVERHEAD for _, fields in entries) <= 1024 * 1024
    assert client.memory_usage(key) < 4 * 1024 * 1024
    text = workflow.task_log("flood")
    assert text.startswith("         0 x") and text.endswith(f"{1_000_000 - 1:>10} {'x' * 88}\n")
    assert "dropped here" in text


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_timed_out_tasks_log_is_kept(redis_server, orch_workers, mode) -> None:
    orch_workers(1, mode=mode)
    workflow = Workflow("timeout")
    workflow.add_task(Task("sleepy", log_tasks.print_then_sleep, args=(30,), timeout=1.5))
    workflow.run(redis_url=redis_server.url)
    assert workflow.tasks["sleepy"].state == "failure" and "TaskTimeout" in workflow.tasks["sleepy"].error
    assert workflow.task_log("sleepy").startswith("before the timeout\n")


def test_embedded_task_whose_process_died_keeps_its_log() -> None:
    workflow = Workflow("death")
    workflow.add_task(Task("dying", log_tasks.print_then_die, args=(1.0,)))
    workflow.run()
    assert "WorkerCrash" in workflow.tasks["dying"].error
    assert workflow.task_log("dying") == "before dying\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_a_task_whose_process_died_keeps_its_log_up_to_its_last_flush(redis_server, orch_workers, mode) -> None:
    orch_workers(1, mode=mode)
    workflow = Workflow("death")
    workflow.add_task(Task("dying", log_tasks.print_then_die, args=(1.0,)))
    workflow.run(redis_url=redis_server.url)
    assert "WorkerCrash" in workflow.tasks["dying"].error
    assert workflow.task_log("dying") == "before dying\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_task_log_level_warning_drops_info_records_on_a_worker(redis_server, orch_workers) -> None:
    orch_workers(1, env={"ORCH_TASK_LOG_LEVEL": "WARNING", "ORCH_RETENTION": str(10 ** 7)})
    workflow = chatty_workflow()
    workflow.run(redis_url=redis_server.url)
    assert_chatty_log(workflow.task_log("chatty"), level="WARNING")
    # the worker gave the log its own retention; the run's coordinator, the run's own at its end
    assert 0 < redis_server.client().ttl(keys.task_log(workflow.last_run_id, "chatty", 1)) <= 7 * 24 * 3600


@pytest.mark.parametrize("variable, value", [("ORCH_TASK_LOG_LEVEL", "LOUD"), ("ORCH_MAX_LOG_BYTES", "1k")])
def test_a_bad_log_setting_is_refused_in_one_line(variable, value, tmp_path) -> None:
    worker = CliRunner().invoke(main, ["worker", "--redis-url", "redis://127.0.0.1:1/0"], env={variable: value})
    assert worker.exit_code == 2 and worker.stderr.startswith(f"error: {variable}={value!r} is not")
    flow = tmp_path / "flow.py"
    flow.write_text("from orchestrator import Task, Workflow\nworkflow = Workflow('w')\n"
                    "workflow.add_task(Task('t', print))\n")
    submit = CliRunner().invoke(main, ["submit", str(flow), "-q"], env={variable: value})
    assert submit.exit_code == 2 and f"error: {variable}={value!r} is not" in submit.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rerun_keeps_the_logs_of_earlier_attempts(redis_server, orch_workers, tmp_path) -> None:
    import rerun_tasks

    orch_workers(1)
    (tmp_path / "input").write_text("bad")
    workflow = rerun_tasks.make_branches(str(tmp_path))
    workflow.run(redis_url=redis_server.url)
    run_id = workflow.last_run_id
    assert workflow.tasks["right"].state == "failure" and workflow.tasks["right"].attempts == 2
    (tmp_path / "input").write_text("good")
    workflow.retry()
    assert workflow.tasks["right"].state == "success" and workflow.tasks["right"].attempts == 3
    for attempt, text in ((1, "bad"), (2, "bad"), (3, "good")):
        code, out, _ = orch_logs(redis_server.url, run_id, "right", "--attempt", str(attempt))
        assert code == 0 and f"read input: {text}" in out, out
        assert f"read input: {text}" in workflow.task_log("right", attempt)
    assert "ValueError: bad input" in workflow.task_log("right", 1)  # the traceback is part of it
    client = redis_server.client()
    assert client.ttl(keys.task_log(run_id, "right", 1)) > 0  # the retention again, once the rerun ended


def test_an_embedded_rerun_keeps_the_logs_of_earlier_attempts(tmp_path) -> None:
    import rerun_tasks

    (tmp_path / "input").write_text("bad")
    workflow = rerun_tasks.make_branches(str(tmp_path))
    workflow.run()
    (tmp_path / "input").write_text("good")
    workflow.retry()
    assert [("read input: bad" in workflow.task_log("right", n), "read input: good" in workflow.task_log("right", n))
            for n in (1, 2, 3)] == [(True, False), (True, False), (False, True)]
    assert workflow.tasks["right"].log == workflow.task_log("right", 3)
