"""Task functions and workflows for the fault-injection tests (tests/test_faults.py).

``orch worker`` processes import these as ``fault_tasks:NAME`` (they are started
with ``--path tests/``). Every task that matters for "ran exactly once" counts
its executions with ``INCR`` on a Redis key it is given, so a test can prove
that nothing ran twice. Tasks learn the Redis URL and a scratch directory from
their arguments; the workflows below that ``orch submit tests/fault_tasks.py:NAME``
loads read them from the environment (``FAULT_REDIS_URL``, ``FAULT_DIR``) at
submit time and pass them on as arguments.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any, Optional

from orchestrator import Task, Workflow
from shared import context
from dist_tasks import swallow_everything as swallow_timeout  # noqa: F401  (workers import it from dist_tasks)

COUNTER_PREFIX = "fault:count:"
"""Executions of a task are counted at ``fault:count:{key}``."""


# ------------------------------------------------------------------- plumbing
def _redis(url: str) -> Any:
    """A client that rides out a short Redis outage (the restart test), so that a task does not fail
    just because the test's own bookkeeping could not reach Redis for a moment."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_connect_timeout=5, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def count(url: str, key: str) -> int:
    """Record one execution under ``key``; return how many there were so far."""
    client = _redis(url)
    try:
        return int(client.incr(COUNTER_PREFIX + key))
    finally:
        client.close()


def attempt() -> int:
    running = context.current()
    return running.attempt if running is not None else 1


def upstream(name: str) -> Any:
    """The result of upstream task ``name`` in this run (read from Redis on a worker)."""
    running = context.current()
    assert running is not None, "upstream() only works inside a running task"
    return running.fetch_result(name)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ the tasks
def value(url: str, key: str, result: Any, seconds: float = 0.0) -> Any:
    """Count, sleep ``seconds``, return ``result``."""
    count(url, key)
    if seconds:
        time.sleep(seconds)
    return result


def echo(result: Any) -> Any:
    return result


def crash_first(url: str, key: str, how: str) -> str:
    """Kill the process running attempt 1 (``exit``: os._exit(3), ``segv``: NULL read,
    ``kill``: SIGKILL itself); later attempts return ``"ok <attempt>"``."""
    count(url, key)
    if attempt() == 1:
        if how == "exit":
            os._exit(3)
        elif how == "segv":
            ctypes.string_at(0)
        elif how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        raise AssertionError(f"unknown crash {how!r}")
    return f"ok {attempt()}"


def slow_first(url: str, key: str, directory: str, first_seconds: float, first: Any, later: Any) -> Any:
    """Attempt 1 writes ``{directory}/{key}.pid`` (its pid), sleeps ``first_seconds`` and returns
    ``first`` (writing ``{key}.returning`` just before); later attempts return ``later`` at once."""
    count(url, key)
    current = attempt()
    _write(os.path.join(directory, f"{key}.{current}.pid"), str(os.getpid()))
    if current == 1:
        time.sleep(first_seconds)
        _write(os.path.join(directory, f"{key}.returning"), str(time.time()))
        return first
    return later


def slow_first_run(url: str, key: str, directory: str, first_seconds: float, first: Any, later: Any) -> Any:
    """Like :func:`slow_first`, by execution rather than attempt: the first execution (of any
    attempt) writes ``{directory}/{key}.pid``, sleeps and returns ``first``; later ones return ``later``
    at once (an attempt handed back to its queue runs again with the same attempt number)."""
    if count(url, key) == 1:
        _write(os.path.join(directory, f"{key}.pid"), str(os.getpid()))
        time.sleep(first_seconds)
        return first
    return later


def sleep_with_pid(url: str, key: str, directory: str, seconds: float) -> str:
    """Write ``{directory}/{key}.pid`` and sleep (the cancellation target)."""
    count(url, key)
    _write(os.path.join(directory, f"{key}.pid"), str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def gate(url: str, key: str, timeout: float = 60.0) -> str:
    """Wait until the test sets Redis key ``fault:gate:{key}`` (keeps a run open on purpose)."""
    client = _redis(url)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if client.exists(f"fault:gate:{key}"):
                return "opened"
            time.sleep(0.05)
    finally:
        client.close()
    raise TimeoutError(f"gate {key!r} never opened")


def after_gate(url: str, key: str, name: str) -> Any:
    """Wait for the gate ``key``, then return what upstream task ``name`` committed."""
    gate(url, key)
    return {"seen": upstream(name)}


def big(size: int) -> str:
    return "x" * size


def chain_step(url: str, key: str, previous: Optional[str], seconds: float) -> int:
    """Counted; the previous step's result + 1 (0 for the first step)."""
    count(url, key)
    time.sleep(seconds)
    return 0 if previous is None else upstream(previous) + 1


def fan_item(url: str, key: str, i: int, seconds: float) -> int:
    count(url, key)
    time.sleep(seconds)
    return upstream("root") * 10 + i


def fan_sum(url: str, key: str, names: list) -> int:
    count(url, key)
    return sum(upstream(name) for name in names)


# ------------------------------------------------------------------ workflows
def build_resumable(url: str, items: int = 6, steps: int = 4, seconds: float = 0.3, slow: float = 1.5) -> Workflow:
    """root -> items in parallel -> join -> a chain of ``steps``; every task counted, ~``seconds`` each;
    and a ``slow`` task (``slow`` seconds) beside the items, so that one task is surely running mid-run.

    Results: root 1, slow "s", item{i} 10+i, join sum(10+i), step0 join+1, step{k} step{k-1}+1.
    """
    wf = Workflow("resumable")
    wf.add_task(Task("root", value, args=(url, "root", 1, seconds)))
    wf.add_task(Task("slow", value, dependencies=["root"], args=(url, "slow", "s", slow)))
    names = [f"item{i}" for i in range(items)]
    for i, name in enumerate(names):
        wf.add_task(Task(name, fan_item, dependencies=["root"], args=(url, name, i, seconds)))
    wf.add_task(Task("join", fan_sum, dependencies=names, args=(url, "join", names)))
    previous = "join"
    for k in range(steps):
        wf.add_task(Task(f"step{k}", chain_step, dependencies=[previous], args=(url, f"step{k}", previous, seconds)))
        previous = f"step{k}"
    return wf


def resumable_results(items: int = 6, steps: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {"root": 1, "slow": "s"}
    out.update({f"item{i}": 10 + i for i in range(items)})
    out["join"] = sum(10 + i for i in range(items))
    previous = out["join"]
    for k in range(steps):
        out[f"step{k}"] = previous + 1
        previous = out[f"step{k}"]
    return out


def resumable() -> Workflow:
    """``orch submit tests/fault_tasks.py:resumable`` (FAULT_REDIS_URL set)."""
    return build_resumable(os.environ["FAULT_REDIS_URL"])


def long_chain() -> Workflow:
    """A chain of 10 counted steps of 0.4 s (for the stale-coordinator test)."""
    url = os.environ["FAULT_REDIS_URL"]
    wf = Workflow("long-chain")
    previous = None
    for k in range(10):
        name = f"step{k}"
        wf.add_task(Task(name, chain_step, dependencies=[previous] if previous else [],
                         args=(url, name, previous, 0.4)))
        previous = name
    return wf


def long_chain_results() -> dict[str, int]:
    return {f"step{k}": k for k in range(10)}


def cancellable() -> Workflow:
    """``orch submit tests/fault_tasks.py:cancellable`` (FAULT_REDIS_URL and FAULT_DIR set)."""
    return build_cancellable(os.environ["FAULT_REDIS_URL"], os.environ["FAULT_DIR"])


def build_cancellable(url: str, directory: str) -> Workflow:
    """One long task (writes ``long.pid``) holding the only worker, three more queued behind it,
    and a child of the long one."""
    wf = Workflow("cancellable")
    wf.add_task(Task("long", sleep_with_pid, args=(url, "long", directory, 60)))
    for i in range(3):
        wf.add_task(Task(f"queued{i}", value, args=(url, f"queued{i}", i)))
    wf.add_task(Task("child", value, dependencies=["long"], args=(url, "child", "never")))
    return wf


def tiny() -> Workflow:
    """Two trivial tasks (for submit-time failures: nothing should ever run)."""
    wf = Workflow("tiny")
    wf.add_task(Task("a", echo, args=(1,)))
    wf.add_task(Task("b", echo, dependencies=["a"], args=(2,)))
    return wf
