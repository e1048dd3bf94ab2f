"""CPU per task with signing off and on: ``python -m bench.signing_cost [--rounds 4] [--tasks 3000]``.

A fan-out of no-op tasks driven in this process (the coordinator: its CPU from
``getrusage``) on one lean worker with two work processes (its CPU, children
included, from ``/proc``), on a ``redis-server`` of its own. Rounds alternate
off and on, so that other load on the machine falls on both alike. Steadier
than throughput on a shared machine: see bench/README.md, *Signing on vs off*.

``--micro``: instead, the CPU of each piece of signing work a task costs, in this
process (``timeit``, the best of many interleaved repeats: what a loaded machine
disturbs least): what the coordinator adds (signing the job, checking the outcome)
and what the worker adds (checking the job, signing the outcome).
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


def micro(repeats: int = 30, number: int = 2000) -> dict[str, float]:
    """µs per call of each signing piece, signed minus unsigned where there is an unsigned form."""
    import timeit

    from shared.jobs import job_message, parse_job_message
    from shared.messages import SUCCEEDED, Outcome
    from shared.signing import Signer, fields_verified

    signer = Signer([KEY.encode()])
    run, now = "20261207T184711-328c990135bb", time.time()
    job = (run, "item123", 1, "bench.tasks:noop", "[[],{}]", None, 1048576)
    outcome = Outcome(run_id=run, task="item123", attempt=1, status=SUCCEEDED, at=now, worker="host-1234-abcd#1",
                      result=b"null", started_at=now)
    entry, signed_entry = job_message(*job).encode(), job_message(*job, signer=signer).encode()
    read_back = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in outcome.to_fields(signer).items()}
    pieces = {
        "job entry, unsigned": lambda: job_message(*job),
        "job entry, signed": lambda: job_message(*job, signer=signer),
        "outcome checked (coordinator)": lambda: fields_verified(signer, "outcome", run, 1, read_back),
        "job entry read, unsigned": lambda: parse_job_message(entry),
        "job entry read and checked": lambda: parse_job_message(signed_entry, signer),
        "outcome fields, unsigned": lambda: outcome.to_fields(None),
        "outcome fields, signed": lambda: outcome.to_fields(signer),
    }
    best = {name: float("inf") for name in pieces}
    for _ in range(repeats):
        for name, piece in pieces.items():
            best[name] = min(best[name], timeit.timeit(piece, number=number) / number * 1e6)
    return {
        **best,
        "coordinator adds": best["job entry, signed"] - best["job entry, unsigned"]
        + best["outcome checked (coordinator)"],
        "worker adds": best["job entry read and checked"] - best["job entry read, unsigned"]
        + best["outcome fields, signed"] - best["outcome fields, unsigned"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--micro", action="store_true", help="time each piece of signing work in-process instead")
    options = parser.parse_args()
    if options.micro:
        for name, micros in micro().items():
            print(f"{name:32s} {micros:6.2f} µs")
        return
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
