"""Schedules at scale: how late the runs of 1,000 schedules due at the same minute are created,
and what an idle coordinator serving 1,000 schedules costs.

    python -m bench.schedules [--schedules 1000] [--coordinators 1] [--minutes 2] [--idle-seconds 30]

Starts a private redis-server, ``orch coordinator`` processes and two ``orch worker`` processes
(so the runs finish); adds the schedules through :mod:`orchestrator.schedules`; reports the
creation lag (run ``created_at`` minus its tick) p50 / p99 / max over every tick of the
measured minutes, and the coordinators' CPU use while all schedules are idle (% of one core).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from bench.procs import Proc, RedisServer, orch_command, stop_all, tree_cpu_seconds, wait_until
from orchestrator.schedules import add_schedule, remove_schedule
from shared import keys

TARGET = "bench.schedule_flow:flow"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _coordinators(url: str, n: int, logs: Path) -> list[Proc]:
    return [Proc(f"coordinator{i}", orch_command() + ["coordinator", "--redis-url", url], logs) for i in range(n)]


def idle_cpu(url: str, client, n: int, coordinators: int, seconds: float, logs: Path) -> float:
    for i in range(n):
        add_schedule(client, f"idle-{i}", TARGET, cron="0 0 1 1 *", check=False)
    procs = _coordinators(url, coordinators, logs)
    time.sleep(5)  # started and settled
    pids = [p.pid for p in procs]
    before, start = tree_cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    used = tree_cpu_seconds(pids) - before
    elapsed = time.monotonic() - start
    for proc in procs:
        proc.stop()
    for i in range(n):
        remove_schedule(client, f"idle-{i}")
    return 100.0 * used / elapsed / coordinators


def creation_lags(url: str, client, n: int, coordinators: int, minutes: int, logs: Path) -> list[float]:
    procs = _coordinators(url, coordinators, logs)
    for i in range(n):
        add_schedule(client, f"minutely-{i}", TARGET, cron="* * * * *", check=False, overlap="allow")
    first = math.floor(time.time() / 60) * 60 + 60
    last = first + 60 * (minutes - 1)
    time.sleep(max(0.0, last + 20 - time.time()))
    lags = []
    for i in range(n):
        for raw in client.zrange(keys.schedule_runs(f"minutely-{i}"), 0, -1):
            run_id = raw.decode()
            created, tick = client.hmget(keys.run(run_id), "created_at", "tick")
            if tick is not None and first <= float(tick) <= last:
                lags.append(float(created) - float(tick))
    for proc in procs:
        proc.stop()
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--coordinators", type=int, default=1)
    parser.add_argument("--minutes", type=int, default=2)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="orch-bench-schedules-"))
    server = RedisServer(logs)
    try:
        client = server.client()
        workers = [Proc(f"worker{i}", orch_command() + ["worker", "--redis-url", server.url, "--path", ".",
                                                        "--concurrency", "2"], logs) for i in range(2)]
        wait_until(lambda: len(client.smembers(keys.WORKERS)) >= 2, 30, "workers up", workers)
        cpu = idle_cpu(server.url, client, args.schedules, args.coordinators, args.idle_seconds, logs)
        lags = creation_lags(server.url, client, args.schedules, args.coordinators, args.minutes, logs)
        expected = args.schedules * args.minutes
        result = {"schedules": args.schedules, "coordinators": args.coordinators, "minutes": args.minutes,
                  "idle_cpu_percent_of_a_core": round(cpu, 3), "runs": len(lags), "expected_runs": expected,
                  "lag_p50_s": round(statistics.median(lags), 3) if lags else None,
                  "lag_p99_s": round(_percentile(lags, 0.99), 3) if lags else None,
                  "lag_max_s": round(max(lags), 3) if lags else None}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        stop_all()
        server.stop()


if __name__ == "__main__":
    main()
