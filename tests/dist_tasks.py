"""Module-level task functions and workflows for the distributed tests.

``orch worker`` processes import these by reference (``dist_tasks:NAME``): the
workers are started with ``--path`` pointing at the ``tests`` folder, and the
test process has that folder on ``sys.path`` too (pytest's rootdir insertion),
so the references computed at submit time are ``dist_tasks:...``.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from orchestrator import Task, Workflow
from shared import context


def current_attempt() -> int:
    running = context.current()
    return running.attempt if running is not None else 1


# --------------------------------------------------------------- the example DAG
def extract_data() -> dict:
    return {"data": [1, 2, 3, 4, 5]}


def transform_data() -> list:
    # Inside a task on a worker this reads the result of 'extract' of *this* run from Redis.
    data = workflow.get_task_result("extract")
    return [x * 2 for x in data["data"]]


def make_example() -> Workflow:
    wf = Workflow("example")
    wf.add_task(Task("extract", extract_data))
    wf.add_task(Task("transform", transform_data, dependencies=["extract"]))
    return wf


workflow = make_example()
"""The module-level workflow whose ``get_task_result`` the example's tasks call."""

EXAMPLE_RESULTS = {"extract": {"data": [1, 2, 3, 4, 5]}, "transform": [2, 4, 6, 8, 10]}


# ------------------------------------------------------------ parametrised tasks
def extract_value(value: Any) -> dict:
    return {"data": value}


def transform_value() -> Any:
    return {"seen": workflow.get_task_result("extract")["data"]}


def identity(value: Any) -> Any:
    return value


def add(a: int, b: int) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def root_value() -> int:
    return 7


def fan_item(i: int) -> int:
    base = workflow.get_task_result("root")
    return base + i


def fan_join(n: int) -> dict:
    values = [workflow.get_task_result(f"item{i}") for i in range(n)]
    return {"count": sum(v is not None for v in values), "sum": sum(v for v in values if v is not None)}


def chain_step(i: int) -> int:
    """Step ``i`` of a chain: the previous step's value + 1 (step 0 starts at 0)."""
    if i == 0:
        return 0
    return workflow.get_task_result(f"step{i - 1}") + 1


def chain_end() -> int:
    return workflow.get_task_result("step19")


def always_fail(message: str = "boom") -> None:
    raise ValueError(f"{message} (attempt {current_attempt()})")


def fail_until(succeed_at: int) -> int:
    """Fail every attempt before ``succeed_at``; return the attempt number that succeeded."""
    attempt = current_attempt()
    if attempt < succeed_at:
        raise RuntimeError(f"not yet (attempt {attempt})")
    return attempt


def fail_then_log(path: str, succeed_at: int) -> int:
    """Like :func:`fail_until`, logging ``start N`` / ``end N`` lines with times to ``path``."""
    attempt = current_attempt()
    _log(path, f"start {attempt}")
    try:
        if attempt < succeed_at:
            raise RuntimeError(f"not yet (attempt {attempt})")
        return attempt
    finally:
        _log(path, f"end {attempt}")


def _log(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(f"{text} {time.time():.6f}\n")


def read_log(path: str) -> list[tuple[str, float]]:
    out = []
    with open(path) as f:
        for line in f.read().splitlines():
            text, _, at = line.rpartition(" ")
            out.append((text, float(at)))
    return out


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def swallow_everything(seconds: float) -> str:
    """Ignore every exception (the timeout included) and keep running for ``seconds``."""
    end = time.time() + seconds
    while time.time() < end:
        try:
            while time.time() < end:
                time.sleep(0.05)
        except BaseException:  # noqa: BLE001 - the point of this task
            pass
    return "survived"


def exit_hard(code: int = 3) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(5)


def unserializable_result() -> Any:
    return object()


def big_result(size: int) -> str:
    return "x" * size


def write_pid(path: str) -> int:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def write_garbage_event() -> str:
    """XADD an unreadable entry into this run's event stream, as a buggy or hostile worker could."""
    from rq import get_current_job

    from shared import keys

    running = context.current()
    get_current_job().connection.xadd(keys.events(running.run_id), {"status": "succeeded", "garbage": "1"})
    return "wrote"


# ------------------------------------------------- reading a run back (test helpers)
def task_records(connection: Any, run_id: str) -> dict[str, dict]:
    """The JSON records of ``orch:run:{id}:tasks``, by task name, straight from Redis."""
    import json

    from shared import keys

    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in connection.hgetall(keys.tasks(run_id)).items()}


def run_meta(connection: Any, run_id: str) -> dict[str, str]:
    """The fields of ``orch:run:{id}``, decoded."""
    from shared import keys

    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in connection.hgetall(keys.run(run_id)).items()}


def state_counts(records: dict[str, dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for record in records.values():
        out[record["state"]] = out.get(record["state"], 0) + 1
    return out


# ------------------------------------------------------ workflows for tests/test_default_path.py
def make_on_gpu() -> Workflow:
    """Two tasks on queue 'gpu', which the tests' default workers do not serve."""
    wf = Workflow("on-gpu")
    wf.add_task(Task("first", identity, args=(1,), queue="gpu"))
    wf.add_task(Task("second", identity, dependencies=["first"], args=(2,), queue="gpu"))
    return wf


def make_busy_three() -> Workflow:
    """Three independent 1.5 s tasks for one single-slot worker: two of them wait their turn."""
    wf = Workflow("busy-three")
    for i in range(3):
        wf.add_task(Task(f"nap{i}", sleep_for, args=(1.5,)))
    return wf


def make_one_nap() -> Workflow:
    """One 2 s task: nothing else happens in the run while it runs."""
    wf = Workflow("one-nap")
    wf.add_task(Task("nap", sleep_for, args=(2.0,)))
    return wf


def make_failing() -> Workflow:
    """A root that fails for good and its child: the run fails."""
    wf = Workflow("failing")
    wf.add_task(Task("ok", identity, args=(1,)))
    wf.add_task(Task("bad", always_fail, args=("no luck",)))
    wf.add_task(Task("child", identity, dependencies=["bad"], args=(2,)))
    return wf


def make_slow_chain() -> Workflow:
    """Twenty 1 s steps, one after the other: still running long after a test is done with it."""
    wf = Workflow("slow-chain")
    previous: list[str] = []
    for k in range(20):
        wf.add_task(Task(f"s{k}", sleep_for, dependencies=previous, args=(1.0,)))
        previous = [f"s{k}"]
    return wf
