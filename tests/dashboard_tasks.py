"""Task functions and workflows for the dashboard's browser tests (imported by workers as
``dashboard_tasks:NAME``; the workers get ``--path tests/``)."""
from __future__ import annotations

import os
import time

from orchestrator import Task, Workflow


def say(text: str) -> str:
    print(f"saying {text}")
    return text


def wait_for(path: str) -> str:
    """Print, then wait until ``path`` exists (a test opens the gate when it has seen the task run)."""
    print("waiting at the gate")
    while not os.path.exists(path):
        time.sleep(0.05)
    print("gate open")
    return "passed"


def fail_loudly() -> None:
    for number in range(3):
        print(f"log line {number} before the failure")
    raise ValueError("the dashboard test failure")


def noop() -> None:
    return None


def shout(text: str) -> None:
    """Print ``text`` and fail with it: hostile text in a log line, an error and a traceback."""
    print(text)
    raise ValueError(text)


def small_workflow() -> Workflow:
    """extract -> (clean, enrich) -> load, and a failing side task after extract."""
    wf = Workflow("dash-small")
    wf.add_task(Task("extract", say, args=("extract",)))
    wf.add_task(Task("clean", say, dependencies=["extract"], args=("clean",)))
    wf.add_task(Task("enrich", say, dependencies=["extract"], args=("enrich",)))
    wf.add_task(Task("load", say, dependencies=["clean", "enrich"], args=("load",)))
    wf.add_task(Task("broken", fail_loudly, dependencies=["extract"]))
    return wf


def gated_workflow(gate: str) -> Workflow:
    """first -> gated (waits for the file ``gate``) -> last."""
    wf = Workflow("dash-gated")
    wf.add_task(Task("first", say, args=("first",)))
    wf.add_task(Task("gated", wait_for, dependencies=["first"], args=(gate,)))
    wf.add_task(Task("last", say, dependencies=["gated"], args=("last",)))
    return wf


def wide_workflow(n: int) -> Workflow:
    """A root, ``n`` tasks after it in ten chains-of-layers, and a join: a large run."""
    wf = Workflow("dash-wide")
    wf.add_task(Task("root", noop))
    for i in range(n):
        previous = "root" if i < n // 10 else f"t{i - n // 10}"
        wf.add_task(Task(f"t{i}", noop, dependencies=[previous]))
    wf.add_task(Task("join", noop, dependencies=[f"t{i}" for i in range(n - n // 10, n)]))
    return wf


def items(n: int) -> list[int]:
    return list(range(n))


def double(item: int) -> int:
    return item * 2


def total(values: list[int]) -> int:
    return sum(values)


def mapped_workflow(n: int) -> Workflow:
    """items -> double mapped over its n items -> total: one mapped task of ``n`` children."""
    wf = Workflow("dash-mapped")
    wf.add_task(Task("items", items, args=(n,)))
    wf.add_task(Task("double", double, dependencies=["items"], map_over="items"))
    wf.add_task(Task("total", noop, dependencies=["double"]))
    return wf


def print_a_lot(lines: int) -> int:
    """``lines`` * 64 bytes of output (newlines included), numbered."""
    for number in range(lines):
        print(f"line {number:06d} " + "x" * 51)  # 12 + 51 characters and a newline
    return lines


def chatty_workflow() -> Workflow:
    """One task printing 1 MiB: 16,384 lines of 64 bytes."""
    wf = Workflow("dash-chatty")
    wf.add_task(Task("chatty", print_a_lot, args=(16384,)))
    return wf


def rerun_workflow() -> Workflow:
    """extract -> broken -> after: the failure to rerun from the task page."""
    wf = Workflow("dash-rerun")
    wf.add_task(Task("extract", say, args=("extract",)))
    wf.add_task(Task("broken", fail_loudly, dependencies=["extract"]))
    wf.add_task(Task("after", say, dependencies=["broken"], args=("after",)))
    return wf


def mapped_unserved_workflow(n: int, queue: str) -> Workflow:
    """items (on the default queue) -> double mapped over its n items on ``queue``: once expanded,
    its children wait there (a queue no worker serves) until the run is cancelled."""
    wf = Workflow("dash-big-map")
    wf.add_task(Task("items", items, args=(n,)))
    wf.add_task(Task("double", double, dependencies=["items"], map_over="items", queue=queue))
    return wf


HOSTILE = '<img src=x onerror="window.__xss=1">"><script>window.__xss=2</script><svg onload="window.__xss=3">'
"""Text that runs script wherever a page inserts it as HTML rather than as text."""


def hostile_workflow() -> Workflow:
    """Names, a log line, an error and a traceback that are all markup."""
    wf = Workflow(f"dash {HOSTILE}")
    wf.add_task(Task("plain", say, args=(HOSTILE,)))
    wf.add_task(Task(f"t {HOSTILE}", shout, dependencies=["plain"], args=(HOSTILE,)))
    return wf
