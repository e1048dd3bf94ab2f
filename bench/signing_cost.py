"""CPU per task with signing off and on: ``python -m bench.signing_cost [--rounds 4] [--tasks 3000]``.

A fan-out of no-op tasks driven in this process (the coordinator: its CPU from
``getrusage``) on one lean worker with two work processes (its CPU, children
included, from ``/proc``), on a ``redis-server`` of its own. Rounds alternate
off and on, so that other load on the machine falls on both alike. Steadier
than throughput on a shared machine: see bench/README.md, *Signing on vs off*.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from bench.procs import RedisServer, orch_command, tree_cpu_seconds
from bench.tasks import noop
from orchestrator import Task, Workflow

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-signing-key-0123456789"


def _fanout(n: int) -> Workflow:
    wf = Workflow("signing-cost")
    wf.add_task(Task("root", noop))
    for i in range(n):
        wf.add_task(Task(f"i{i}", noop, dependencies=["root"]))
    return wf


def _one(url: str, client: redis.Redis, tasks: int, signed: bool, name: str) -> tuple[float, float, float]:
    """(coordinator µs/task, worker µs/task, tasks/s) of one run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_SIGNING_KEY", None)
    os.environ.pop("ORCH_SIGNING_KEY", None)
    if signed:
        env["ORCH_SIGNING_KEY"] = os.environ["ORCH_SIGNING_KEY"] = KEY
    worker = subprocess.Popen([*orch_command(), "worker", "--redis-url", url, "--concurrency", "2",
                               "--name", name, "--log-level", "WARNING"], env=env, cwd=str(ROOT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not client.exists(f"orch:alive:{name}"):
            time.sleep(0.05)
        time.sleep(0.5)
        wf = _fanout(tasks)
        worker_before, own_before, started = tree_cpu_seconds([worker.pid]), resource.getrusage(resource.RUSAGE_SELF), \
            time.monotonic()
        wf.run(redis_url=url)
        wall = time.monotonic() - started
        own_after, worker_after = resource.getrusage(resource.RUSAGE_SELF), tree_cpu_seconds([worker.pid])
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
        client.flushall()
    n = tasks + 1
    own = own_after.ru_utime + own_after.ru_stime - own_before.ru_utime - own_before.ru_stime
    return own / n * 1e6, (worker_after - worker_before) / n * 1e6, n / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3000)
    options = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="orch-signing-cost-")))
    url = server.url
    client = server.client()
    runs: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    try:
        _one(url, client, 50, False, "warm-up")  # the coordinator's imports and first connections, unmeasured
        for round_number in range(options.rounds):
            for mode in ("off", "on"):
                result = _one(url, client, options.tasks, mode == "on", f"cost-{mode}-{round_number}")
                runs[mode].append(result)
                print(f"{mode}: coordinator {result[0]:.1f} µs/task, worker {result[1]:.1f} µs/task, "
                      f"{result[2]:.0f} tasks/s", flush=True)
    finally:
        client.close()
        server.stop()
    for mode, results in runs.items():
        print(f"{mode} (median of {len(results)}): coordinator {statistics.median(r[0] for r in results):.1f} µs/task, "
              f"worker {statistics.median(r[1] for r in results):.1f} µs/task, "
              f"{statistics.median(r[2] for r in results):.0f} tasks/s")


if __name__ == "__main__":
    main()
