"""``python -m bench.profile``: where the time goes per task and per hop, for bench/README.md.

Not a benchmark (no repeats, small runs, instruments everything); each part
starts its own redis-server and workers and stops them again:

- ``hops``: the chain on orch lean and orch rq with the coordinator's trace
  (``BENCH_TRACE``): each hop split into coordinator reaction, queue pickup,
  worker hand-off, execution and report, from the timestamps of the steps
  and of the outcomes (workers and coordinator share the clock).
- ``trips``: Redis round trips and commands per task for every process role
  (coordinator, worker parent, forked work horse / work process), counted
  exactly by a ``sitecustomize`` that wraps redis-py's ``send_packed_command``
  in every process the suite starts (``bench/_rtsite``), plus ``INFO
  commandstats`` per command.
- ``monitor``: the commands of one chain hop in order, from ``MONITOR``.
- ``spy``: py-spy (sampling, every thread and subprocess) on the coordinator
  and on the workers during fan-out and chain; self time by function and by
  area (Redis client, RQ, orch, pickling, fork, idle waits are excluded).
- ``waves``: the sleep workload on orch lean, traced: where the time beyond the ideal goes.
- ``submit``: each stage of submitting the 100,000-task DAG up to its first dispatch.
- ``fork``: the cost of ``os.fork()`` + child exit + ``waitpid`` in a process
  that imported what an RQ worker imports.

``python -m bench.profile [--parts hops,trips,monitor,spy,fork,submit,waves] [--out bench/results/profile.json]``
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from bench import procs as _procs
from bench.procs import REPO, Proc, RedisServer, stop_all
from bench.systems import SYSTEMS

RTSITE = Path(__file__).resolve().parent / "_rtsite"


@contextmanager
def cluster(system: str, workers: int, log_dir: Path, env: Optional[dict[str, str]] = None
            ) -> Iterator[tuple[RedisServer, list[Proc]]]:
    redis_server = RedisServer(log_dir)
    procs: list[Proc] = []
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        procs = SYSTEMS[system].start_workers(redis_server.url, workers, log_dir, f"prof-{system}")
        os.environ.clear()
        os.environ.update(saved)
        yield redis_server, procs
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for proc in procs:
            proc.stop()
        redis_server.stop()


def drive(system: str, spec: dict[str, Any], url: str, workers: int, log_dir: Path, repeats: int = 1,
          env: Optional[dict[str, str]] = None, tag: str = "d") -> tuple[list[dict[str, Any]], Proc]:
    out = log_dir / f"{tag}.jsonl"
    proc = Proc(tag, [sys.executable, "-m", "bench.driver", "--system", system, "--dag", json.dumps(spec),
                      "--redis-url", url, "--workers", str(workers), "--repeats", str(repeats)], log_dir,
                env=env, stdout=out)
    code = proc.wait(900)
    proc.stop(grace=2)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    if code != 0:
        raise RuntimeError(f"driver {system} failed ({code}): {proc.log()}")
    return rows, proc


# ----------------------------------------------------------------------- hops
def hop_breakdown(trace: dict[str, Any], n: int) -> dict[str, Any]:
    """Split each chain hop ``step{i-1} succeeded -> step{i} succeeded`` into its parts (ms, medians)."""
    recv: dict[tuple[str, str], float] = {}
    info: dict[tuple[str, str], tuple[float, Optional[float]]] = {}
    dispatched: dict[str, tuple[float, float]] = {}
    steps_per_hop = collections.Counter()
    for item in trace["trace"]:
        if item[0] == "event":
            _, t, status, task, at, started_at, _worker = item
            recv[(task, status)] = t
            info[(task, status)] = (at, started_at)
        else:
            _, begun, end, dispatches, transitions = item
            for task in dispatches:
                dispatched[task] = (begun, end)
            for task, _state in transitions:
                steps_per_hop[task] += 1
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(1, n):
        prev, cur = f"step{i - 1}", f"step{i}"
        try:
            t0 = recv[(prev, "succeeded")]
            d_begun, d_end = dispatched[cur]
            started_at_worker = info[(cur, "started")][0]
            done_at, exec_started = info[(cur, "succeeded")]
            t1 = recv[(cur, "succeeded")]
        except KeyError:
            continue
        parts["coordinator: outcome read -> dispatch written"].append(d_end - t0)
        parts["  of which writing the step (Redis)"].append(d_end - d_begun)
        parts["queue pickup: dispatch written -> worker took it"].append(started_at_worker - d_end)
        parts["worker hand-off: took it -> task function starts"].append(exec_started - started_at_worker)
        parts["execution (import, decode, call, encode)"].append(done_at - exec_started)
        parts["report: task done -> coordinator read the outcome"].append(t1 - done_at)
        parts["hop total"].append(t1 - t0)
    return {name: round(1000 * statistics.median(values), 3) for name, values in parts.items()}


def part_hops(log_dir: Path, n: int = 200) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in ("orch-lean", "orch-rq"):
        with cluster(system, 2, log_dir) as (redis_server, _):
            trace_path = log_dir / f"trace-{system}.json"
            rows, _ = drive(system, {"kind": "chain", "n": n}, redis_server.url, 2, log_dir,
                            env={"BENCH_TRACE": str(trace_path)}, tag=f"hops-{system}")
            trace = json.loads(trace_path.read_text())
            out[system] = {"ms_per_hop": 1000 * rows[0]["wall_s"] / n, "breakdown_ms": hop_breakdown(trace, n),
                           "coordinator_steps_per_task": rows[0]["steps"] / n,
                           "coordinator_reads_per_task": rows[0]["reads"] / n,
                           "coordinator_round_trips_per_task": rows[0]["client_round_trips"] / n,
                           "coordinator_cpu_ms_per_task": 1000 * rows[0]["client_cpu_s"] / n}
    return out


# ---------------------------------------------------------------------- waves
def part_waves(log_dir: Path, runs: int = 5) -> dict[str, Any]:
    """The sleep workload (32 × 0.1 s, 8 workers) on orch lean, traced: where the wall time beyond the
    ideal 0.4 s goes (before the first task starts, between waves, after the last ends). Medians of
    ``runs`` runs."""
    parts: dict[str, list[float]] = collections.defaultdict(list)
    with cluster("orch-lean", 8, log_dir) as (redis_server, _):
        for i in range(runs):
            trace_path = log_dir / f"waves-{i}.json"
            rows, _ = drive("orch-lean", {"kind": "sleep", "n": 32, "seconds": 0.1}, redis_server.url, 8, log_dir,
                            env={"BENCH_TRACE": str(trace_path)}, tag=f"waves-{i}")
            trace = json.loads(trace_path.read_text())
            start, end = trace["start"], trace["end"]
            events = [e for e in trace["trace"] if e[0] == "event"]
            execs = sorted((e[5], e[4]) for e in events if e[2] == "succeeded")  # (started_at, done at)
            row = rows[0]
            parts["wall"].append(row["wall_s"])
            parts["submit (run_distributed -> run written)"].append(row["submit_s"])
            parts["first dispatch written"].append(row["first_dispatch_s"])
            parts["start -> first task function starts"].append(execs[0][0] - start)
            parts["start -> last of the first 8 starts"].append(execs[7][0] - start)
            parts["executions (sum / 8 slots)"].append(sum(b - a for a, b in execs) / 8)
            # per slot chain: sort starts; the gap between a task's end and the next start on a free slot
            ends = sorted(b for _, b in execs)
            starts = sorted(a for a, _ in execs)
            gaps = [starts[k + 8] - ends[k] for k in range(len(starts) - 8)]
            parts["gap: a slot's task ends -> its next task starts (median)"].append(statistics.median(gaps))
            parts["last task ends -> run_distributed returns"].append(end - max(b for _, b in execs))
            parts["efficiency"].append(0.4 / row["wall_s"])
    return {name: round(statistics.median(values) * (1 if name == "efficiency" else 1000), 3)
            for name, values in parts.items()} | {"unit": "ms (efficiency: ratio)", "runs": runs}


# ---------------------------------------------------------------------- trips
def read_trips(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_trips(log_dir: Path) -> dict[str, Any]:
    """Exact round trips per task, by process role, for fan-out (500) and chain (200)."""
    out: dict[str, Any] = {}
    cases = [("fanout", {"kind": "fanout", "n": 500}, 4), ("chain", {"kind": "chain", "n": 200}, 2)]
    for system in ("orch-lean", "orch-rq", "rq", "rq-simple"):
        for name, spec, workers in cases:
            trips_file = log_dir / f"roundtrips-{system}-{name}.rt.jsonl"
            env = {"PYTHONPATH": f"{RTSITE}{os.pathsep}{REPO}", "BENCH_RT_FILE": str(trips_file)}
            with cluster(system, workers, log_dir, env=env) as (redis_server, procs):
                worker_pids = {p.pid for p in procs}
                client = redis_server.client()
                # only what the timed run does: drop the records of the warm-up, taken just before it
                rows, driver = drive(system, spec, redis_server.url, workers, log_dir, env=env,
                                     tag=f"trips-{system}-{name}")
                client.close()
            records = read_trips(trips_file)
            tasks = rows[0]["tasks"]
            roles: dict[str, int] = collections.Counter()
            for r in records:
                if r["pid"] == driver.pid:
                    continue  # the driver's own count is in its row (timed section only)
                role = "worker parent" if r["pid"] in worker_pids else "work horse / work process"
                roles[role] += r["count"]
            warm_tasks = 4 * workers + 2
            # worker-side records cover the warm-up too: scale by the tasks they ran
            total_tasks = tasks + warm_tasks
            out[f"{system}/{name}"] = {
                "coordinator (client) round trips/task": rows[0]["client_round_trips"] / tasks,
                **{f"{role} round trips/task": count / total_tasks for role, count in roles.items()},
                "redis commands/task (all)": rows[0]["redis_commands"] / tasks,
                "commandstats/task": {k: round(v / tasks, 2) for k, v in
                                      sorted(rows[0]["commandstats"].items(), key=lambda kv: -kv[1])},
            }
    return out


# -------------------------------------------------------------------- monitor
_MONITOR_LINE = re.compile(r'^(?P<ts>\d+\.\d+) \[(?P<addr>[^\]]*)\] (?P<cmd>.*)$')


def part_monitor(log_dir: Path) -> dict[str, Any]:
    """The commands of one hop in the middle of a 12-task chain (the timed run), in order, per system."""
    out: dict[str, Any] = {}
    for system in ("orch-lean", "orch-rq", "rq"):
        with cluster(system, 2, log_dir) as (redis_server, procs):
            lines: list[str] = []
            stop = threading.Event()
            import redis

            client = redis.Redis.from_url(redis_server.url, socket_timeout=None)

            def watch() -> None:
                with client.monitor() as monitor:
                    for command in monitor.listen():
                        lines.append(f"{command['time']:.6f} [{command['client_address']}:"
                                     f"{command['client_port']}] {command['command']}")
                        if stop.is_set():
                            return

            thread = threading.Thread(target=watch, daemon=True)
            thread.start()
            time.sleep(0.2)
            drive(system, {"kind": "chain", "n": 12}, redis_server.url, 2, log_dir, tag=f"mon-{system}")
            stop.set()
            client2 = redis_server.client()
            client2.ping()
            client2.close()
            thread.join(timeout=5)
            (log_dir / f"monitor-{system}.txt").write_text("\n".join(lines))
            out[system] = hop_commands(lines, system)
    return out


def _is_outcome(line: str, step: str, system: str) -> bool:
    """The line that reports ``step`` of the timed run succeeded."""
    if system.startswith("orch"):
        return "XADD" in line and f"task {step} " in line and "succeeded" in line and "bench-chain" not in line
    return "XADD" in line and "rq:results:r0-" in line and line.split("rq:results:", 1)[1].split()[0].endswith(
        f"-{step}")


def hop_commands(lines: list[str], system: str) -> list[str]:
    """The commands from the report of step5's success to the report of step6's (the timed run, not
    the warm-up), with the time since the first and the client's address."""
    runs = [i for i, line in enumerate(lines) if "bench-chain" in line or "r0-" in line]
    first = runs[0] if runs else 0
    start = next((i for i in range(first, len(lines)) if _is_outcome(lines[i], "step5", system)), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(lines)) if _is_outcome(lines[i], "step6", system)), None)
    if end is None:
        return []
    shown = []
    t0 = None
    for line in lines[start:end + 1]:
        m = _MONITOR_LINE.match(line)
        if not m:
            continue
        ts = float(m.group("ts"))
        t0 = t0 if t0 is not None else ts
        shown.append(f"+{1000 * (ts - t0):6.2f} ms  {m.group('addr'):>16}  {m.group('cmd')[:140]}")
    return shown


# ------------------------------------------------------------------------ spy
def spy(pids: list[int], seconds: float, out: Path, subprocesses: bool = True) -> list[Proc]:
    procs = []
    binary = shutil.which("py-spy")
    if not binary:
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    for pid in pids:
        argv = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "500",
                "--format", "raw", "--output", str(out.with_suffix(f".{pid}.txt")), "--nonblocking"]
        if subprocesses:
            argv.append("--subprocesses")
        procs.append(Proc(f"spy-{pid}", argv, out.parent))
    return procs


def fold(paths: list[Path], top: int = 25, only: Optional[str] = None) -> dict[str, Any]:
    """Self time by function (leaf frame) and by area, from py-spy raw (collapsed) stacks.

    py-spy records only threads that are not idle (waiting in a blocking call), so
    these are the on-CPU samples. ``only``: keep stacks with a frame containing it
    (the coordinator: ``run_distributed``, leaving out the driver building workflows).
    """
    leaf: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            if only is not None and only not in stack:
                continue
            frames = stack.split(";")
            total += n
            leaf[_short(frames[-1])] += n
            areas[_area(frames)] += n
    pct = (lambda c: {k: round(100 * v / total, 1) for k, v in c.most_common(top)}) if total else (lambda c: {})
    return {"samples": total, "by_area_pct": pct(areas), "self_pct": pct(leaf)}


def _short(frame: str) -> str:
    m = re.match(r"(?P<func>[^ ]+) \((?P<file>[^:)]+)(:\d+)?\)", frame.strip())
    if not m:
        return frame.strip()[:80]
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


_AREAS = [
    ("redis/", "redis-py client (command packing, socket send/recv, reply parsing)"),
    ("multiprocessing/connection", "pipe to/from the work process"),
    ("popen_fork", "fork"), ("fork_work_horse", "fork"), ("os.fork", "fork"),
    ("/rq/", "RQ bookkeeping"),
    ("pickle", "pickle"), ("copyreg", "pickle"),
    ("json/", "JSON / codec"), ("codec.py", "JSON / codec"),
    ("scheduler.py", "orch scheduler"),
    ("coordinator.py", "orch coordinator / RQ backend"), ("backends/rq.py", "orch coordinator / RQ backend"),
    ("run_store.py", "orch submit (run store)"), ("distributed.py", "orch submit (run store)"),
    ("lease.py", "orch coordinator / RQ backend"), ("dag.py", "orch submit (run store)"),
    ("worker/", "orch worker"), ("shared/", "orch worker"),
    ("logging/", "logging"), ("importlib", "import machinery"), ("<frozen", "import machinery"),
    ("bench/", "bench driver"),
]


def _area(frames: list[str]) -> str:
    """The area of the innermost frame that belongs to one (generic stdlib frames defer to their caller)."""
    for frame in reversed(frames):
        for marker, area in _AREAS:
            if marker in frame:
                return area
    return "other"


def part_spy(log_dir: Path) -> dict[str, Any]:
    """py-spy on the coordinator (driver) and every worker process while fan-out and chain repeat."""
    out: dict[str, Any] = {}
    cases = [("fanout", {"kind": "fanout", "n": 500}, 4), ("chain", {"kind": "chain", "n": 200}, 2)]
    repeats_of = {"orch-lean": 12, "orch-rq": 1}  # about 6 s of timed runs each
    for system in ("orch-lean", "orch-rq"):
        for name, spec, workers in cases:
            repeats = repeats_of[system]
            with cluster(system, workers, log_dir) as (redis_server, procs):
                prefix = log_dir / f"spy-{system}-{name}"
                driver_out = log_dir / f"spy-{system}-{name}-driver.jsonl"
                binary = shutil.which("py-spy")
                assert binary
                coord_spy = log_dir / f"spy-{system}-{name}-coordinator.txt"
                driver = Proc(f"spy-{system}-{name}-driver", [
                    binary, "record", "--rate", "500", "--format", "raw", "--output", str(coord_spy), "--",
                    sys.executable, "-m", "bench.driver", "--system", system, "--dag", json.dumps(spec),
                    "--redis-url", redis_server.url, "--workers", str(workers), "--repeats", str(repeats)],
                    log_dir, stdout=driver_out)
                time.sleep(2.0)  # imports and warm-up
                spies = spy([p.pid for p in procs], 6, prefix)
                driver.wait(600)
                for s in spies:
                    s.wait(30)
                    s.stop()
                driver.stop()
                rows = [json.loads(row) for row in driver_out.read_text().splitlines() if row.startswith("{")]
                worker_files = [prefix.with_suffix(f".{p.pid}.txt") for p in procs]
                out[f"{system}/{name}"] = {
                    "timed_runs": len(rows),
                    "coordinator": fold([coord_spy], only="run_distributed"),
                    "workers": fold(worker_files),
                }
    return out


# ----------------------------------------------------------------------- fork
def part_fork(samples: int = 300) -> dict[str, Any]:
    code = r"""
import os, time, json, statistics, resource
import rq, redis, worker.rq_worker, orchestrator.distributed  # what an orch worker has imported
times = []
for _ in range(%d):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.append(time.perf_counter() - t)
rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
print(json.dumps({"fork_exit_wait_ms_median": 1000 * statistics.median(times),
                  "fork_exit_wait_ms_p90": 1000 * sorted(times)[int(0.9 * len(times))], "parent_rss_mb": rss}))
""" % samples
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    return json.loads(result.stdout)


# --------------------------------------------------------------------- submit
def part_submit(log_dir: Path, layers: int = 1000, width: int = 100) -> dict[str, Any]:
    """``run_distributed`` of a ``layers × width`` DAG up to its first dispatch, each stage timed by
    wrapping the functions it calls (whatever their signatures: they change), then stopped; plus what
    two further changes proposed in the README would cost instead."""
    code = r"""
import collections, json, sys, time
from bench import tasks as bt
from bench.workloads import layered
from orchestrator import Task, Workflow
from orchestrator import distributed as d
from orchestrator.backends.rq import RQBackend
from orchestrator.run_spec import encode_arguments
from orchestrator.scheduler import Scheduler
from shared import codec
from shared.refs import reference_of

url, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dag = layered(layers, width)
spent = collections.Counter()

def timed(owner, name, label):
    original = getattr(owner, name, None)
    if original is None:
        return
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t
    setattr(owner, name, wrapper)

class FirstDispatch(Exception):
    pass

carry_out = RQBackend.carry_out
def first_step(self, step):
    t = time.perf_counter()
    carry_out(self, step)
    spent["first step written (roots dispatched)"] += time.perf_counter() - t
    raise FirstDispatch()
RQBackend.carry_out = first_step
timed(Workflow, "validate", "validate (DAG checks, graph)")
timed(d, "task_references", "task_references (reference_of per task)")
timed(d.RunSpec, "build", "RunSpec.build (the compact spec)")
timed(d, "create_run", "create_run (RunSpec.to_json + one MULTI)")
timed(d, "connect", "connect + PING")
timed(Scheduler, "__init__", "Scheduler(...)")
timed(Scheduler, "start", "Scheduler.start()")

t = time.perf_counter()
wf = Workflow("submit")
for name in dag.order:
    wf.add_task(Task(name, bt.noop, dag.deps[name], queue="bench"))
build = time.perf_counter() - t
t = time.perf_counter()
try:
    d.run_distributed(wf, url, transport="lean")
except FirstDispatch:
    pass
total = time.perf_counter() - t
stages = {label: round(v, 4) for label, v in spent.items()}
stages["other (glue, lease, backend setup)"] = round(total - sum(spent.values()), 4)
out = {"tasks": len(dag), "build Workflow s (user code, not counted)": round(build, 4),
       "to first dispatch s": round(total, 4), "stages_s": stages}

alt = {}
EMPTY = codec.encode([[], {}], "x").decode()
t = time.perf_counter()
{n: EMPTY if not task.args and not task.kwargs else encode_arguments(task) for n, task in wf.tasks.items()}
alt["encode_arguments, a constant for tasks without arguments"] = round(time.perf_counter() - t, 4)
t = time.perf_counter()
cache = {}
for n, task in wf.tasks.items():
    f = task.func
    if id(f) not in cache:
        cache[id(f)] = f if isinstance(f, str) else reference_of(f)
alt["task_references, cached per function"] = round(time.perf_counter() - t, 4)
out["proposed_s"] = alt
print(json.dumps(out))
"""
    redis_server = RedisServer(log_dir)
    try:
        result = subprocess.run([sys.executable, "-c", code, redis_server.url, str(layers), str(width)],
                                capture_output=True, text=True, cwd=str(_procs.ROOT), timeout=600,
                                env={**os.environ, "PYTHONPATH": str(_procs.ROOT)})
    finally:
        redis_server.stop()
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--parts", default="hops,trips,monitor,spy,fork,submit,waves")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "profile.json"))
    parser.add_argument("--log-dir", default=None)
    args = parser.parse_args(argv)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="orch-bench-profile-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    parts = {"hops": part_hops, "trips": part_trips, "monitor": part_monitor, "spy": part_spy,
             "fork": lambda d: part_fork(), "submit": part_submit, "waves": part_waves}
    try:
        for name in args.parts.split(","):
            print(f"[profile] {name}", file=sys.stderr, flush=True)
            results[name] = parts[name](log_dir)
            results.setdefault("meta", {})[name] = time.strftime("%Y-%m-%d %H:%M")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=1))
    finally:
        stop_all()
    print(json.dumps({k: v for k, v in results.items() if k != "monitor"}, indent=1))
    for system, listing in results.get("monitor", {}).items():
        print(f"\n--- one chain hop on {system}, as MONITOR saw it ---")
        print("\n".join(listing))
    print(f"[profile] written to {out_path}; logs in {log_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
