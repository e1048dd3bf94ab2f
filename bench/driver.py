"""One system's client ("coordinator") running one workload, in a process of its own.

``python -m bench.driver --system S --dag SPEC --redis-url URL --repeats R --workers N``

The suite starts this after the system's workers are up. It first runs a
small warm-up (so workers have imported the task module and opened their
connections), then the workload ``R`` times, and prints one JSON object per
repeat on stdout. Since the client runs in its own process, its peak RSS
(``VmHWM``) and CPU time (``getrusage``, every thread: Dask's scheduler
runs in here too) are its own. Redis commands are the server's
``total_commands_processed`` delta over the timed section, so they count
every client: the driver, the workers (idle polling and heartbeats included)
and the INFO calls themselves (subtracted).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from typing import Any, Callable, Optional

import redis

from bench import tasks as bench_tasks
from bench.procs import tree_cpu_seconds
from bench.workloads import Dag, StreamedDag, chain, fanout, layered, mapped, sleeps, streamed_layered

QUEUE = "bench"
RESULT_TIMEOUT = 600


# ------------------------------------------------------------------ measuring
def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` of its own address space.

    Not ``ru_maxrss``: Linux carries that over from the parent across fork and exec, so
    a driver started by a 40 MB suite process would never report less than 40 MB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class RoundTrips:
    """Counts this process's round trips to Redis (one per ``send_packed_command``: a pipeline is one)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        from redis.connection import AbstractConnection

        original = AbstractConnection.send_packed_command

        def counted(self: Any, command: Any, check_health: bool = True) -> None:
            cls.count += 1
            return original(self, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


class CommandCounter:
    """``INFO commandstats`` deltas: every command every client sent, by name."""

    def __init__(self, url: Optional[str]) -> None:
        self.client = redis.Redis.from_url(url) if url else None

    def snapshot(self) -> dict[str, int]:
        if self.client is None:
            return {}
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}

    def server_cpu(self) -> float:
        """CPU seconds the redis-server process has used (``INFO cpu``: user + system)."""
        if self.client is None:
            return 0.0
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        out = {name: after.get(name, 0) - before.get(name, 0) for name in after}
        out["info"] = out.get("info", 0) - 1  # the INFO that took ``after``
        return {name: n for name, n in out.items() if n > 0}


# ------------------------------------------------------------------ workloads
def make_dag(spec: dict[str, Any], streamed: bool = False) -> Dag | StreamedDag:
    """The workload ``spec`` names; ``streamed``: a large layered DAG as a :class:`StreamedDag` (for drivers
    that only read ``entries()``)."""
    kind = spec["kind"]
    if kind == "fanout":
        return fanout(spec.get("n", 500))
    if kind == "map":
        return mapped(spec.get("n", 10_000))
    if kind == "chain":
        return chain(spec.get("n", 200))
    if kind == "sleep":
        return sleeps(spec.get("n", 32), spec.get("seconds", 0.1))
    if kind == "layered" and streamed:
        return streamed_layered(spec.get("layers", 100), spec.get("width", 100), name=spec.get("name", "dag"))
    if kind == "layered":
        return layered(spec.get("layers", 100), spec.get("width", 100), name=spec.get("name", "dag"))
    raise ValueError(f"unknown workload kind {kind!r}")


# -------------------------------------------------------------------- systems
class Driver:
    """Runs a :class:`Dag` on one system; ``run`` returns once every task finished."""

    needs_redis = True
    reads_entries_only = False
    """True for a driver that reads a workload only through ``entries()`` (it may get a :class:`StreamedDag`)."""

    def __init__(self, url: str, workers: int, system: str) -> None:
        self.url = url
        self.workers = workers
        self.system = system

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def worker_pids(self) -> list[int]:
        return []


class OrchDriver(Driver):
    """``run_distributed`` with its defaults (each queue's jobs in the form its live workers run:
    ``orch-lean`` starts default ``orch worker`` processes, ``orch-rq`` ``orch worker --mode rq``);
    also times submit and first dispatch."""

    reads_entries_only = True

    def __init__(self, url: str, workers: int, system: str) -> None:
        super().__init__(url, workers, system)
        from orchestrator.backends.rq import RQBackend

        stats = self.stats = {"steps": 0, "dispatches": 0, "reads": 0, "events": 0, "first_step_done": None}
        carry_out, read, events_of = RQBackend.carry_out, RQBackend._read, RQBackend._events_of
        trace = self.trace = []  # (kind, epoch time, ...) when tracing

        def counted_carry_out(backend: Any, step: Any) -> None:
            begun = time.time()
            carry_out(backend, step)
            if self.tracing:
                trace.append(("step", begun, time.time(), [d.task for d in step.dispatches],
                              [(t.task, t.finish.value) for t in step.transitions]))
            stats["steps"] += 1
            stats["dispatches"] += len(step.dispatches)
            if stats["first_step_done"] is None:
                stats["first_step_done"] = time.perf_counter()

        def counted_read(backend: Any, timeout: float) -> Any:
            events = read(backend, timeout)
            stats["reads"] += 1
            stats["events"] += len(events)
            return events

        def traced_events_of(backend: Any, fields: Any, *rest: Any) -> Any:
            events = events_of(backend, fields, *rest)
            if self.tracing and events:
                from shared.messages import Outcome

                try:
                    outcome = Outcome.from_fields(fields)
                    trace.append(("event", time.time(), outcome.status, outcome.task, outcome.at, outcome.started_at,
                                  outcome.worker))
                except Exception:  # noqa: BLE001 - a cancel request
                    pass
            return events

        self.tracing = False
        RQBackend._events_of = traced_events_of  # type: ignore[method-assign]
        RQBackend.carry_out = counted_carry_out  # type: ignore[method-assign]
        RQBackend._read = counted_read  # type: ignore[method-assign]

    def build(self, dag: Dag) -> Any:
        from orchestrator import Task, Workflow

        wf = Workflow(f"bench-{dag.name}")
        maps = getattr(dag, "maps", {})
        for name, deps, func, args in dag.entries():
            wf.add_task(Task(name, getattr(bench_tasks, func), deps, args=args, queue=QUEUE, map_over=maps.get(name)))
        return wf

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        from orchestrator.distributed import run_distributed
        from shared.states import RunState

        built = time.perf_counter()
        wf = self.build(dag)
        extra: dict[str, Any] = {"build_s": time.perf_counter() - built}
        for key in ("steps", "dispatches", "reads", "events"):
            self.stats[key] = 0
        self.stats["first_step_done"] = None
        marks: dict[str, float] = {}

        def submitted(run_id: str) -> None:
            marks["submitted"] = time.perf_counter()
            marks["submitted_cpu"] = cpu_seconds()

        self.trace.clear()
        self.tracing = bool(os.environ.get("BENCH_TRACE"))
        extra["rss_before_run_mb"] = current_rss_mb()  # what the caller holds: interpreter, Task objects
        marks["start_epoch"] = time.time()
        start, start_cpu = time.perf_counter(), cpu_seconds()
        run_id, state = run_distributed(wf, self.url, on_submitted=submitted)
        if state is not RunState.SUCCESS:
            raise RuntimeError(f"orch run {run_id} ended {state.value}")
        extra.update(submit_s=marks["submitted"] - start, submit_cpu_s=marks["submitted_cpu"] - start_cpu,
                     first_dispatch_s=self.stats["first_step_done"] - start,
                     steps=self.stats["steps"], reads=self.stats["reads"], events=self.stats["events"])
        if self.tracing:
            with open(os.environ["BENCH_TRACE"], "w") as f:
                json.dump({"start": marks["start_epoch"], "end": time.time(), "trace": self.trace}, f)
        return extra


class RQDriver(Driver):
    """Raw RQ: jobs without dependencies, a layer at a time (the client waits for a layer, then enqueues
    the next: for the chain, one job at a time), run by ``rq worker`` (fork) or SimpleWorker."""

    def __init__(self, url: str, workers: int, system: str) -> None:
        super().__init__(url, workers, system)
        from rq import Queue

        self.connection = redis.Redis.from_url(url, socket_timeout=None)
        self.queue = Queue(QUEUE, connection=self.connection)

    def _wait(self, job: Any) -> None:
        from rq.results import Result

        result = job.latest_result(timeout=RESULT_TIMEOUT)
        if result is None or result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {job.id} did not succeed: {result and result.exc_string}")

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        from rq import Queue

        for layer in dag.layers():
            jobs = self.queue.enqueue_many([
                Queue.prepare_data(f"bench.tasks.{dag.func[name]}", args=dag.args[name], job_id=f"{tag}-{name}",
                                   result_ttl=600) for name in layer])
            for job in jobs:
                self._wait(job)
        return {}


class RQDependsDriver(RQDriver):
    """RQ's own ``depends_on``: every job enqueued up front, RQ releases each when its dependencies finish."""

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        jobs: dict[str, Any] = {}
        for name in dag.order:
            deps = [jobs[d] for d in dag.deps[name]]
            jobs[name] = self.queue.enqueue(f"bench.tasks.{dag.func[name]}", *dag.args[name], job_id=f"{tag}-{name}",
                                            depends_on=deps or None, result_ttl=600)
        for name in dag.sinks():
            self._wait(jobs[name])
        return {}


class CeleryDriver(Driver):
    """Celery canvas: fan-out as ``root | chord(items, join)``, the chain as ``chain``, independent tasks
    as a ``group``; any other DAG a layer at a time (a ``group`` per layer)."""

    def __init__(self, url: str, workers: int, system: str) -> None:
        super().__init__(url, workers, system)
        os.environ["BENCH_REDIS_URL"] = url
        from bench import celery_app

        self.app = celery_app

    def _sig(self, dag: Dag, name: str) -> Any:
        return getattr(self.app, dag.func[name]).si(*dag.args[name])

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        from celery import chain as cchain
        from celery import chord, group

        layers = dag.layers()
        sizes = [len(layer) for layer in layers]
        if all(not deps for deps in dag.deps.values()):
            group([self._sig(dag, n) for n in dag.order]).apply_async().get(timeout=RESULT_TIMEOUT)
        elif all(size == 1 for size in sizes):
            cchain(*[self._sig(dag, n) for n in dag.order]).apply_async().get(timeout=RESULT_TIMEOUT)
        elif len(layers) == 3 and sizes[0] == 1 and sizes[2] == 1 and dag.name == "fanout":
            body = chord([self._sig(dag, n) for n in layers[1]], self._sig(dag, layers[2][0]))
            (self._sig(dag, layers[0][0]) | body).apply_async().get(timeout=RESULT_TIMEOUT)
        else:
            for layer in layers:
                group([self._sig(dag, n) for n in layer]).apply_async().get(timeout=RESULT_TIMEOUT)
        return {}


class DaskDriver(Driver):
    """Dask distributed: a ``LocalCluster`` of ``workers`` processes (1 thread each) started here; the
    DAG as a task graph handed to ``Client.get`` (its scheduler runs in this process)."""

    needs_redis = False

    def __init__(self, url: str, workers: int, system: str) -> None:
        super().__init__(url, workers, system)
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers, timeout=60)

    def run(self, dag: Dag, tag: str) -> dict[str, Any]:
        graph: dict[str, Any] = {}
        for name in dag.order:
            func = getattr(bench_tasks, dag.func[name])
            graph[f"{tag}-{name}"] = (func, *dag.args[name], *[f"{tag}-{d}" for d in dag.deps[name]])
        self.client.get(graph, [f"{tag}-{name}" for name in dag.sinks()], sync=True)
        return {}

    def worker_pids(self) -> list[int]:
        from bench.procs import descendants

        return descendants(os.getpid())

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


DRIVERS: dict[str, Callable[[str, int, str], Driver]] = {
    "orch-rq": OrchDriver,
    "orch-lean": OrchDriver,
    "rq": RQDriver,
    "rq-simple": RQDriver,
    "rq-depends": RQDependsDriver,
    "celery": CeleryDriver,
    "dask": DaskDriver,
}


def measured(driver: Driver, dag: Dag, tag: str, counter: CommandCounter, worker_pids: list[int]) -> dict[str, Any]:
    before = counter.snapshot()
    redis_cpu_before = counter.server_cpu()
    trips_before = RoundTrips.count
    workers_before = tree_cpu_seconds(worker_pids)
    start, start_cpu = time.perf_counter(), cpu_seconds()
    extra = driver.run(dag, tag)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    workers_cpu = tree_cpu_seconds(worker_pids) - workers_before
    trips = RoundTrips.count - trips_before
    commands = CommandCounter.delta(before, counter.snapshot()) if driver.needs_redis else {}
    redis_cpu = counter.server_cpu() - redis_cpu_before if driver.needs_redis else None
    if driver.needs_redis:
        commands["info"] = commands.get("info", 0) - 2  # the two INFO cpu
        commands = {name: n for name, n in commands.items() if n > 0}
    return {
        "tasks": getattr(dag, "jobs", 0) or len(dag),
        "wall_s": wall,
        "client_cpu_s": cpu,
        "workers_cpu_s": workers_cpu,
        "redis_cpu_s": redis_cpu,
        "loadavg_1m": os.getloadavg()[0],
        "client_peak_rss_mb": peak_rss_mb(),
        "client_rss_mb": current_rss_mb(),
        "redis_commands": sum(commands.values()) if driver.needs_redis else None,
        "commandstats": commands,
        "client_round_trips": trips if driver.needs_redis else None,
        **extra,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.driver")
    parser.add_argument("--system", required=True, choices=sorted(DRIVERS))
    parser.add_argument("--dag", required=True, help="workload as JSON, e.g. '{\"kind\": \"fanout\", \"n\": 500}'")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing (0: none)")
    parser.add_argument("--worker-pids", default="", help="comma-separated pids of the worker processes, whose "
                        "CPU time (with their descendants') is measured; Dask: its LocalCluster's processes")
    args = parser.parse_args(argv)
    RoundTrips.install()
    spec = json.loads(args.dag)
    baseline_rss = current_rss_mb()
    driver = DRIVERS[args.system](args.redis_url, args.workers, args.system)
    counter = CommandCounter(args.redis_url if driver.needs_redis else None)
    pid = os.getpid()
    try:
        for i in range(args.warmup):
            driver.run(fanout(max(4, 4 * args.workers)), f"warm{i}-{pid}")
        dag = make_dag(spec, streamed=driver.reads_entries_only)
        for i in range(args.repeats):
            pids = [int(p) for p in args.worker_pids.split(",") if p] or driver.worker_pids()
            row = measured(driver, dag, f"r{i}-{pid}", counter, pids)
            row.update(repeat=i, baseline_rss_mb=baseline_rss)
            print(json.dumps(row), flush=True)
    finally:
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
