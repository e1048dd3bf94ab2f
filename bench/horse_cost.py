"""CPU per job of a forking RQ worker, orch's and RQ's own: ``python -m bench.horse_cost [--jobs 300] [--rounds 3]``.

One worker, a full queue of no-op jobs taken one at a time: raw RQ jobs on ``rq
worker`` (the floor of the fan-out benchmark) and an orch fan-out without a
root (``transport="rq"``) on ``orch worker --mode rq``, alternating, each round
on a fresh worker and an emptied Redis. For each run: the worker parent's CPU
and its work horses' (its reaped children, ``cutime + cstime`` in ``/proc``)
per job, counted over the jobs only (the worker's start-up left out). On two
cores with four workers the fan-out is CPU-bound, so its throughput follows
these; and on a shared machine they are steadier than throughput.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import redis

from bench import tasks as bench_tasks
from bench.procs import RedisServer, _stat
from bench.systems import QUEUE, SYSTEMS

_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _cpu_ms(pid: int) -> tuple[float, float]:
    """(the process's own CPU, its reaped children's) so far, in ms."""
    fields = _stat(pid)
    if fields is None:
        raise RuntimeError(f"worker {pid} is gone")
    return (int(fields[11]) + int(fields[12])) * _TICK_MS, (int(fields[13]) + int(fields[14])) * _TICK_MS


def _run_jobs(kind: str, url: str, jobs: int) -> None:
    if kind == "orch-rq":
        from orchestrator import Task, Workflow
        from orchestrator.distributed import run_distributed
        from shared.states import RunState

        wf = Workflow("horse-cost")
        for i in range(jobs):
            wf.add_task(Task(f"item{i}", bench_tasks.noop, queue=QUEUE))
        run_id, state = run_distributed(wf, url, transport="rq")
        if state is not RunState.SUCCESS:
            raise RuntimeError(f"orch run {run_id} ended {state.value}")
        return
    from rq import Queue

    queue = Queue(QUEUE, connection=redis.Redis.from_url(url))
    queued = queue.enqueue_many([Queue.prepare_data(bench_tasks.noop) for _ in range(jobs)])
    for job in queued:
        if job.latest_result(timeout=120) is None:
            raise RuntimeError(f"RQ job {job.id} reported no result")


def one(kind: str, url: str, jobs: int, log_dir: Path, tag: str) -> tuple[float, float]:
    """(parent ms/job, work horses ms/job) of one run of ``jobs`` no-op jobs."""
    (worker,) = SYSTEMS[kind].start_workers(url, 1, log_dir, tag)
    try:
        time.sleep(0.5)
        own_before, horses_before = _cpu_ms(worker.pid)
        _run_jobs(kind, url, jobs)
        own_after, horses_after = _cpu_ms(worker.pid)
    finally:
        worker.stop()
        redis.Redis.from_url(url).flushall()
    return (own_after - own_before) / jobs, (horses_after - horses_before) / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="orch-horse-cost-"))
    server = RedisServer(log_dir)
    runs: dict[str, list[tuple[float, float]]] = {"rq": [], "orch-rq": []}
    try:
        for round_number in range(options.rounds):
            for kind in runs:
                parent, horses = one(kind, server.url, options.jobs, log_dir, f"{kind}-{round_number}")
                runs[kind].append((parent, horses))
                print(f"{kind}: parent {parent:.2f} ms/job, work horses {horses:.2f} ms/job", flush=True)
    finally:
        server.stop()
    for kind, results in runs.items():
        parent, horses = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
        print(f"{kind} (median of {len(results)}): parent {parent:.2f} ms/job, work horses {horses:.2f} ms/job, "
              f"together {parent + horses:.2f}")


if __name__ == "__main__":
    main()
