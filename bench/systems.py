"""The systems compared: how to start their warm workers and how to tell they are ready."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench import procs as _procs
from bench.procs import ORCH_CLI, Proc, wait_until
from shared.workers import live_workers

QUEUE = "bench"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class System:
    name: str
    label: str
    needs: tuple[str, ...] = ()
    """Modules that must import for this system to run (the optional extras)."""
    dag_engine: bool = True
    """False for raw RQ without dependencies: the client runs a DAG one layer at a time."""

    def available(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in self.needs)

    def start_workers(self, url: str, workers: int, log_dir: Path, tag: str,
                      lean_processes: bool = False) -> list[Proc]:
        return _STARTERS[self.name](url, workers, log_dir, tag, lean_processes)


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("orch-rq", "orch, RQ-compatible (`orch worker --mode rq`, fork per task)"),
    System("orch-lean", "orch, defaults (`orch worker`, `run(redis_url=...)`)"),
    System("rq", "raw RQ jobs, fork `Worker` (floor)", dag_engine=False),
    System("rq-simple", "raw RQ jobs, `SimpleWorker`", dag_engine=False),
    System("rq-depends", "RQ `depends_on`, fork `Worker`"),
    System("celery", "Celery chord/chain, Redis broker+backend, prefork", needs=("celery", "kombu")),
    System("dask", "Dask distributed `LocalCluster`", needs=("dask", "distributed")),
)}
FLOOR = "rq"


def _redis(url: str):  # -> redis.Redis
    import redis

    return redis.Redis.from_url(url)


def _rq_ready(url: str, n: int, procs: list[Proc]) -> None:
    from rq import Worker

    client = _redis(url)
    try:
        wait_until(lambda: Worker.count(connection=client) >= n, READY_TIMEOUT, f"{n} RQ workers to register", procs)
    finally:
        client.close()


def _orch(mode: str) -> Callable[[str, int, Path, str, bool], list[Proc]]:
    def start(url: str, workers: int, log_dir: Path, tag: str, lean_processes: bool) -> list[Proc]:
        common = ["worker", "--redis-url", url, "--path", str(_procs.ROOT), "--queues", QUEUE,
                  "--log-level", "WARNING"] + (["--mode", "rq"] if mode == "rq" else [])
        if mode == "rq" or lean_processes:
            procs = [Proc(f"{tag}-w{i}", ORCH_CLI + common, log_dir) for i in range(workers)]
        else:
            procs = [Proc(f"{tag}-w0", ORCH_CLI + common + ["--concurrency", str(workers)], log_dir)]
        expected = workers if mode == "rq" else len(procs)
        client = _redis(url)
        try:  # registered in orch's registry, which is what submissions route by
            wait_until(lambda: sum(w.kind == mode for w in live_workers(client)) >= expected, READY_TIMEOUT,
                       f"{expected} orch workers ({mode}) to register", procs)
        finally:
            client.close()
        return procs
    return start


def _rq(worker_class: Optional[str]) -> Callable[[str, int, Path, str, bool], list[Proc]]:
    def start(url: str, workers: int, log_dir: Path, tag: str, lean_processes: bool) -> list[Proc]:
        argv = [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--path", str(_procs.ROOT),
                "--logging_level", "WARNING"]
        if worker_class:
            argv += ["--worker-class", worker_class]
        procs = [Proc(f"{tag}-w{i}", argv + [QUEUE], log_dir) for i in range(workers)]
        _rq_ready(url, workers, procs)
        return procs
    return start


def _celery(url: str, workers: int, log_dir: Path, tag: str, lean_processes: bool) -> list[Proc]:
    argv = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-Q", QUEUE, "--pool", "prefork",
            "-c", str(workers), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-n", f"{tag}@%h"]
    procs = [Proc(f"{tag}-w0", argv, log_dir, env={"BENCH_REDIS_URL": url})]
    import os

    os.environ["BENCH_REDIS_URL"] = url
    from bench import celery_app

    def ready() -> bool:
        replies = celery_app.app.control.ping(timeout=0.5)
        return any(tag in name for reply in replies for name in reply)

    wait_until(ready, READY_TIMEOUT, "the Celery worker to answer a ping", procs)
    return procs


def _none(url: str, workers: int, log_dir: Path, tag: str, lean_processes: bool) -> list[Proc]:
    return []  # Dask: the driver starts its LocalCluster itself


_STARTERS = {
    "orch-rq": _orch("rq"),
    "orch-lean": _orch("lean"),
    "rq": _rq(None),
    "rq-simple": _rq("rq.SimpleWorker"),
    "rq-depends": _rq(None),
    "celery": _celery,
    "dask": _none,
}
