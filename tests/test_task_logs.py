"""Per-task logs: captured where the attempt runs, bounded, live, read back by ``orch logs`` and Python.

The bounded buffer and the reading side without processes; then the embedded
backend; then real ``orch worker`` processes of both kinds (lean and RQ) on a
real Redis: a task that prints, logs and raises read back with ``orch logs``
(text and ``--json``), ``--follow`` on a running task, the cap (a task
printing ~100 MB), a timed-out task's log, and ``ORCH_TASK_LOG_LEVEL``.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import log_tasks
from bench.procs import orch_command
from orchestrator import Task, Workflow
from orchestrator.cli import main
from orchestrator.logs import MemoryLogs, attempt_log, log_text
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
    assert all(len(line.line) <= buffer.max_line for line in first) and "".join(l.line for l in first) == "y" * 1000
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
