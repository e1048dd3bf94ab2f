"""``python -m bench``: the whole suite, from its own redis-server to the Markdown table.

For each selected system, for each workload: start the system's workers
(real processes, registered before anything is timed), run the workload's
driver in a subprocess (:mod:`bench.driver`: a warm-up, then ``--repeats``
timed runs), stop the workers (SIGTERM, then SIGKILL of their process group
and every descendant) and empty Redis. Then the ``scale`` workload (orch lean
only): layered DAGs of 1k, 10k (and, with ``--with-100k``, 100k) tasks.
Prints a Markdown table of medians with ratios to the floor (raw RQ, fork
worker) and to Dask / Celery for the targets, and writes JSON with every
repeat's numbers.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from bench import procs as _procs
from bench.procs import REPO, Proc, RedisServer, snapshot_source, stop_all
from bench.systems import FLOOR, SYSTEMS

DRIVER_TIMEOUT = 1800.0


@dataclass
class Workload:
    name: str
    title: str
    unit: str
    workers: int
    spec: dict[str, Any]
    higher_is_better: bool
    value: Callable[[dict[str, Any], "Workload"], float]
    systems: Optional[tuple[str, ...]] = None
    """Systems it runs on by default (None: all); ``--systems`` may still name others."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ideal_s(self) -> float:
        spec = self.spec
        return math.ceil(spec["n"] / self.workers) * spec["seconds"]


def _tasks_per_s(row: dict[str, Any], w: Workload) -> float:
    return row["tasks"] / row["wall_s"]


def _ms_per_hop(row: dict[str, Any], w: Workload) -> float:
    return 1000.0 * row["wall_s"] / row["tasks"]


def _efficiency(row: dict[str, Any], w: Workload) -> float:
    return w.ideal_s / row["wall_s"]


def _wall(row: dict[str, Any], w: Workload) -> float:
    return row["wall_s"]


def workloads(size: str) -> list[Workload]:
    if size == "smoke":
        return [
            Workload("fanout", "fan-out root→20→join, 2 workers", "tasks/s", 2, {"kind": "fanout", "n": 20}, True,
                     _tasks_per_s),
            Workload("chain", "chain of 10, 2 workers", "ms/hop", 2, {"kind": "chain", "n": 10}, False, _ms_per_hop),
            Workload("sleep", "4 × 0.05 s sleep, 2 workers", "efficiency", 2,
                     {"kind": "sleep", "n": 4, "seconds": 0.05}, True, _efficiency),
            Workload("dag10k", "layered DAG 4×5, 2 workers", "s", 2,
                     {"kind": "layered", "layers": 4, "width": 5}, False, _wall),
        ]
    return [
        Workload("fanout", "fan-out root→500→join, 4 workers", "tasks/s", 4, {"kind": "fanout", "n": 500}, True,
                 _tasks_per_s),
        Workload("chain", "chain of 200, 2 workers", "ms/hop", 2, {"kind": "chain", "n": 200}, False, _ms_per_hop),
        Workload("sleep", "32 × 0.1 s sleep, 8 workers", "efficiency", 8, {"kind": "sleep", "n": 32, "seconds": 0.1},
                 True, _efficiency),
        Workload("dag10k", "10,000-task layered DAG (100×100), 4 workers", "s", 4,
                 {"kind": "layered", "layers": 100, "width": 100}, False, _wall,
                 systems=("orch-lean", "dask")),
        Workload("fan10k", "static fan-out root→10,000→join, 4 workers", "tasks/s", 4,
                 {"kind": "fanout", "n": 10_000}, True, _tasks_per_s, systems=("orch-lean",)),
        Workload("map10k", "mapped fan-out: root→.map() over 10,000 items→join, 4 workers", "tasks/s", 4,
                 {"kind": "map", "n": 10_000}, True, _tasks_per_s, systems=("orch-lean",)),
    ]


def scale_sizes(size: str, with_100k: bool) -> list[tuple[int, int]]:
    """``(layers, width)`` of the scale DAGs."""
    if size == "smoke":
        return [(5, 10), (10, 10)]
    sizes = [(10, 100), (100, 100)]
    if with_100k:
        sizes.append((1000, 100))
    return sizes


# ----------------------------------------------------------------------- running
class Runner:
    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.redis = RedisServer(log_dir)
        self.results: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.scale: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._count = 0

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        client = self.redis.client()
        try:
            client.flushall()
        finally:
            client.close()

    def drive(self, system: str, spec: dict[str, Any], workers: int, repeats: int, warmup: int = 1,
              worker_procs: tuple[Proc, ...] = ()) -> list[dict[str, Any]]:
        self._count += 1
        out_path = self.log_dir / f"driver-{self._count}-{system}.jsonl"
        proc = Proc(f"driver-{self._count}-{system}", [
            sys.executable, "-m", "bench.driver", "--system", system, "--dag", json.dumps(spec),
            "--redis-url", self.redis.url, "--workers", str(workers), "--repeats", str(repeats),
            "--warmup", str(warmup), "--worker-pids", ",".join(str(p.pid) for p in worker_procs)],
            self.log_dir, stdout=out_path)
        code = proc.wait(DRIVER_TIMEOUT)
        proc.stop(grace=2.0)  # also ends anything it left behind (Dask's worker processes)
        rows = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip().startswith("{")]
        if code != 0 or len(rows) < repeats:
            raise RuntimeError(f"driver for {system} exited with {code} after {len(rows)} of {repeats} repeats:\n"
                               f"{proc.log()}")
        return rows

    def run_system(self, system: str, selected: list[Workload], round_no: int, repeats: int) -> None:
        """Start ``system``'s workers per worker count, run each workload ``repeats`` times, stop them."""
        by_workers: dict[int, list[Workload]] = {}
        for w in selected:
            by_workers.setdefault(w.workers, []).append(w)
        for workers, group in by_workers.items():
            tag = f"{system}-{workers}-r{round_no}"
            procs: list[Proc] = []
            try:
                procs = SYSTEMS[system].start_workers(self.redis.url, workers, self.log_dir, tag,
                                                      lean_processes=self.args.lean_processes)
                for w in group:
                    started = time.monotonic()
                    try:
                        rows = self.drive(system, w.spec, workers, repeats, worker_procs=tuple(procs))
                    except Exception as exc:  # noqa: BLE001 - one failing system must not lose the others
                        self.errors.append(f"{system}/{w.name}: {exc}")
                        self.say(f"[bench] round {round_no}: {system}: {w.name} FAILED: {str(exc)[:2000]}")
                        continue
                    for row in rows:
                        row["round"] = round_no
                    self.rows.setdefault(w.name, {}).setdefault(system, []).extend(rows)
                    values = ", ".join(f"{w.value(row, w):.4g}" for row in rows)
                    self.say(f"[bench] round {round_no}: {system}: {w.name}: {values} {w.unit} "
                             f"({time.monotonic() - started:.1f}s)")
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"{system} workers: {exc}")
                self.say(f"[bench] round {round_no}: {system}: FAILED to start workers: {str(exc)[:2000]}")
            finally:
                for proc in procs:
                    proc.stop()
                self.flush()

    def summarize(self, wls: list[Workload]) -> None:
        for w in wls:
            for system, rows in self.rows.get(w.name, {}).items():
                self.results.setdefault(w.name, {})[system] = summarize(rows, w)

    def run_scale(self, sizes: list[tuple[int, int]], workers: int) -> None:
        system = "orch-lean"
        self.say(f"[bench] scale: starting {workers} lean workers")
        procs: list[Proc] = []
        try:
            procs = SYSTEMS[system].start_workers(self.redis.url, workers, self.log_dir, "scale",
                                                  lean_processes=self.args.lean_processes)
            for layers, width in sizes:
                n = layers * width
                repeats = 1 if n >= 100_000 else self.args.repeats
                self.say(f"[bench] scale: {n} tasks × {repeats}")
                spec = {"kind": "layered", "layers": layers, "width": width, "name": f"scale{n}"}
                rows = self.drive(system, spec, workers, repeats, warmup=1, worker_procs=tuple(procs))
                self.scale.append({**summarize_scale(rows, n, layers, width), "workers": workers})
                self.flush_runs()
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"scale: {exc}")
            self.say(f"[bench] scale FAILED: {str(exc)[:2000]}")
        finally:
            for proc in procs:
                proc.stop()
            self.flush()

    def flush_runs(self) -> None:
        """Drop the finished runs' keys between scale sizes (workers stay registered)."""
        client = self.redis.client()
        try:
            for pattern in ("orch:run:*",):
                keys = list(client.scan_iter(pattern, count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i:i + 1000])
        finally:
            client.close()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rows: list[dict[str, Any]], w: Workload) -> dict[str, Any]:
    values = [w.value(row, w) for row in rows]
    tasks = rows[0]["tasks"]
    commands = [row["redis_commands"] / row["tasks"] for row in rows if row.get("redis_commands") is not None]
    trips = [row["client_round_trips"] / row["tasks"] for row in rows if row.get("client_round_trips") is not None]
    out = {
        "unit": w.unit,
        "median": _median(values),
        "values": values,
        "tasks": tasks,
        "workers": w.workers,
        "wall_s": [row["wall_s"] for row in rows],
        "redis_commands_per_task": _median(commands) if commands else None,
        "client_round_trips_per_task": _median(trips) if trips else None,
        "client_cpu_ms_per_task": _median([1000 * row["client_cpu_s"] / row["tasks"] for row in rows]),
        "workers_cpu_ms_per_task": _median([1000 * row["workers_cpu_s"] / row["tasks"] for row in rows]),
        "redis_cpu_ms_per_task": (_median([1000 * row["redis_cpu_s"] / row["tasks"] for row in rows])
                                  if rows[0].get("redis_cpu_s") is not None else None),
        "client_peak_rss_mb": max(row["client_peak_rss_mb"] for row in rows),
        "client_baseline_rss_mb": rows[0].get("baseline_rss_mb"),
        "loadavg_1m": _median([row.get("loadavg_1m", 0.0) for row in rows]),
        "commandstats": rows[len(rows) // 2].get("commandstats", {}),
        "repeats": rows,
    }
    for key in ("submit_s", "first_dispatch_s", "steps", "reads", "events"):
        if key in rows[0]:
            out[key] = _median([row[key] for row in rows])
    return out


def summarize_scale(rows: list[dict[str, Any]], n: int, layers: int, width: int) -> dict[str, Any]:
    return {
        "tasks": n, "layers": layers, "width": width, "repeats": rows,
        "build_s": _median([r["build_s"] for r in rows]),
        "submit_s": _median([r["submit_s"] for r in rows]),
        "first_dispatch_s": _median([r["first_dispatch_s"] for r in rows]),
        "wall_s": _median([r["wall_s"] for r in rows]),
        "tasks_per_s": _median([n / r["wall_s"] for r in rows]),
        "cpu_ms_per_task": _median([1000 * r["client_cpu_s"] / n for r in rows]),
        "workers_cpu_ms_per_task": _median([1000 * r["workers_cpu_s"] / n for r in rows]),
        "submit_cpu_ms_per_task": _median([1000 * r["submit_cpu_s"] / n for r in rows]),
        "peak_rss_mb": max(r["client_peak_rss_mb"] for r in rows),
        "rss_before_run_mb": max(r.get("rss_before_run_mb", 0.0) for r in rows),
        "redis_commands_per_task": _median([r["redis_commands"] / n for r in rows]),
        "round_trips_per_task": _median([r["client_round_trips"] / n for r in rows]),
        "steps": _median([r["steps"] for r in rows]),
    }


# ------------------------------------------------------------------------ report
def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def ratio(results: dict[str, Any], workload: str, system: str, other: str) -> Optional[float]:
    """How many times better ``system`` is than ``other`` (>1: better), or None."""
    row = results.get(workload, {})
    if system not in row or other not in row:
        return None
    a, b = row[system]["median"], row[other]["median"]
    if not a or not b:
        return None
    higher = row[system]["unit"] in ("tasks/s", "efficiency")
    return a / b if higher else b / a


def markdown(runner_results: dict[str, Any], scale: list[dict[str, Any]], wls: list[Workload],
             systems: list[str], meta: dict[str, Any]) -> str:
    lines: list[str] = []
    lines.append(f"Run {meta['date']} on {meta['machine']} (load average {meta['loadavg_before'][0]:.1f} before, "
                 f"{meta['loadavg_after'][0]:.1f} after; orch at {meta['commit']}"
                 f"{' + uncommitted changes' if meta['dirty'] else ''}); medians of {meta['repeats']} repeat(s)"
                 f"{', in interleaved rounds' if meta['interleaved'] else ''}. "
                 f"`(×N)` = N times better than the floor ({FLOOR}: {SYSTEMS[FLOOR].label}).")
    lines.append("")
    header = ["system"] + [f"{w.title} ({w.unit})" for w in wls]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for system in systems:
        cells = [f"**{system}**"]
        for w in wls:
            entry = runner_results.get(w.name, {}).get(system)
            if entry is None:
                cells.append("–")
                continue
            text = _fmt(entry["median"])
            r = ratio(runner_results, w.name, system, FLOOR)
            if r is not None and system != FLOOR:
                text += f" (×{r:.2g})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cost per task (medians). *Redis cmds*: every command any client sent during the timed run "
                 "(`INFO commandstats` delta: client, workers, their idle polling), per task. *client*: the "
                 "process that submits and waits (orch: the coordinator; Dask: the client with its scheduler): "
                 "its Redis round trips, CPU and peak RSS. *workers CPU*: all worker processes and their "
                 "children (work horses, work processes, pool processes).")
    for w in wls:
        lines.append("")
        lines.append(f"*{w.name}* ({w.title}):")
        lines.append("")
        lines.append("| system | Redis cmds/task | client round trips/task | client CPU ms/task "
                     "| workers CPU ms/task | redis-server CPU ms/task | client peak RSS MB |")
        lines.append("|---|---|---|---|---|---|---|")
        for system in systems:
            e = runner_results.get(w.name, {}).get(system)
            if e is None:
                continue
            cmds = "n/a (no Redis)" if e["redis_commands_per_task"] is None else _fmt(e["redis_commands_per_task"])
            trips = "n/a" if e["client_round_trips_per_task"] is None else _fmt(e["client_round_trips_per_task"])
            lines.append(f"| {system} | {cmds} | {trips} | {_fmt(e['client_cpu_ms_per_task'])} | "
                         f"{_fmt(e.get('workers_cpu_ms_per_task'))} | {_fmt(e.get('redis_cpu_ms_per_task'))} | "
                         f"{_fmt(e['client_peak_rss_mb'])} |")
    if scale:
        lines.append("")
        lines.append(f"Scale (orch lean, {scale[0]['width']}-wide layered DAGs, {scale[0]['workers']} workers; "
                     "*first dispatch*: from calling `run_distributed()` to the first step (the roots' dispatch) "
                     "written to Redis; "
                     "coordinator = the driver process; *RSS before run*: what it held when it called "
                     "`run_distributed()`: the interpreter and the built Workflow's Task objects (the workload "
                     "is streamed into the Workflow, as a user's code would build it, not held as a second copy)):")
        lines.append("")
        lines.append("| tasks | build Workflow s | submit+validate s | first dispatch s | wall s | tasks/s "
                     "| coord CPU ms/task | of which submit | workers CPU ms/task | coord peak RSS MB "
                     "| RSS before run MB | Redis cmds/task | coord round trips/task | steps |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in scale:
            lines.append(f"| {s['tasks']:,} | {_fmt(s['build_s'])} | {_fmt(s['submit_s'])} | "
                         f"{_fmt(s['first_dispatch_s'])} | {_fmt(s['wall_s'])} | {_fmt(s['tasks_per_s'])} | "
                         f"{_fmt(s['cpu_ms_per_task'])} | {_fmt(s['submit_cpu_ms_per_task'])} | "
                         f"{_fmt(s['workers_cpu_ms_per_task'])} | "
                         f"{_fmt(s['peak_rss_mb'])} | {_fmt(s.get('rss_before_run_mb'))} | "
                         f"{_fmt(s['redis_commands_per_task'])} | "
                         f"{_fmt(s['round_trips_per_task'])} | {_fmt(s['steps'])} |")
    return "\n".join(lines)


def targets(results: dict[str, Any], scale: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of issue 8 ("fast by default"), for the defaults (``orch-lean``: ``orch worker`` and
    ``run(redis_url=...)`` with no options) and the RQ-compatible path: met, not met, or not measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, system: str, value: Optional[float], goal: str, met: Optional[bool]) -> None:
        out.append({"target": name, "system": system, "value": value, "goal": goal,
                    "met": met})

    def at_least(name: str, system: str, value: Optional[float], goal: float, text: str) -> None:
        add(name, system, value, text, None if value is None else value >= goal)

    def at_most(name: str, system: str, value: Optional[float], goal: float, text: str) -> None:
        add(name, system, value, text, None if value is None else value <= goal)

    lean = "orch-lean"
    if lean in results.get("fanout", {}):
        at_least("fan-out throughput vs Dask", lean, ratio(results, "fanout", lean, "dask"), 3, "≥ 3× Dask")
        at_most("Redis commands per task, fan-out", lean, results["fanout"][lean]["redis_commands_per_task"], 6,
                "≤ 6")
    if lean in results.get("chain", {}):
        r = ratio(results, "chain", lean, "celery")
        at_most("chain hop vs Celery", lean, None if r is None else 1 / r, 0.4, "≤ 0.4× Celery's ms/hop")
        at_most("chain hop ms (median)", lean, results["chain"][lean]["median"], 1.0, "≤ 1.0 ms")
    if lean in results.get("sleep", {}):
        at_least("parallel efficiency", lean, results["sleep"][lean]["median"], 0.97, "≥ 0.97")
    if lean in results.get("dag10k", {}):
        r = ratio(results, "dag10k", lean, "dask")
        at_most("10k DAG wall vs Dask", lean, None if r is None else 1 / r, 0.25, "≤ 0.25× Dask's wall time")
    for workload, what in (("fanout", "fan-out throughput"), ("sleep", "parallel efficiency")):
        if "orch-rq" in results.get(workload, {}):
            at_least(f"RQ-compatible path: {what} vs raw RQ", "orch-rq", ratio(results, workload, "orch-rq", "rq"),
                     0.9, "≥ 0.9× raw RQ (within 10%)")
    mapped, static = results.get("map10k", {}).get(lean), results.get("fan10k", {}).get(lean)
    if mapped and static:
        at_least("10k-item map throughput vs a static 10k fan-out", lean, mapped["median"] / static["median"], 0.8,
                 "≥ 0.8× (within 20%)")
    big = [s for s in scale if s["tasks"] >= 100_000]
    if big:
        s = big[0]
        at_most("100k DAG submit to first dispatch s", lean, s["first_dispatch_s"], 1.0, "< 1 s")
        at_most("100k DAG coordinator peak RSS MB", lean, s["peak_rss_mb"], 120, "< 120 MB")
    if len(scale) >= 2:
        growth = scale[-1]["cpu_ms_per_task"] / scale[0]["cpu_ms_per_task"]
        at_most(f"coordinator CPU/task growth {scale[0]['tasks']:,} → {scale[-1]['tasks']:,}", lean, growth, 1.25,
                "≤ 1.25× (flat)")
    return out


def targets_markdown(items: list[dict[str, Any]]) -> str:
    lines = ["| target | system | measured | goal | met |", "|---|---|---|---|---|"]
    for t in items:
        met = "n/a (peer not run)" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['system']} | {_fmt(t['value'])} | {t['goal']} | {met} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for dist in ("orch", "rq", "redis", "celery", "kombu", "dask", "distributed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_dirty() -> bool:
    """Whether orch's source differs from the commit (the run then measures uncommitted changes)."""
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--", "orchestrator", "worker", "shared"],
                                   cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


# -------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per workload (default 3)")
    parser.add_argument("--quick", action="store_true", help="one repeat of everything, dag10k included")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat, systems orch-lean,rq unless --systems: checks the suite works")
    parser.add_argument("--systems", default=None,
                        help="comma-separated, from: " + ",".join(SYSTEMS) + " (default: all installed)")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated, from: fanout,chain,sleep,dag10k,fan10k,map10k,scale")
    parser.add_argument("--with-100k", action="store_true", help="add the 100,000-task DAG to the scale workload")
    parser.add_argument("--no-interleave", action="store_true",
                        help="run all repeats of a system back to back (default: rounds, each system once a round)")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run children from the working tree (default: from a copy of the source taken at start, "
                             "so one run measures one version of orch)")
    parser.add_argument("--lean-processes", action="store_true",
                        help="orch lean: N single-slot worker processes instead of one with --concurrency N")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", dest="md_path", default=None, help="write the Markdown report here")
    parser.add_argument("--log-dir", default=None, help="keep process logs here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.quick or args.smoke:
        args.repeats = 1
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    size = "smoke" if args.smoke else ("quick" if args.quick else "full")
    wls = workloads(size)
    wanted_workloads = set(args.workloads.split(",")) if args.workloads else {w.name for w in wls} | {"scale"}
    unknown = wanted_workloads - {w.name for w in wls} - {"scale"}
    if unknown:
        print(f"unknown workload(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        explicit = True
    else:
        systems = ["orch-lean", "rq"] if args.smoke else list(SYSTEMS)
        explicit = bool(args.smoke)
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"unknown system(s): {', '.join(bad)}; known: {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    missing = [s for s in systems if not SYSTEMS[s].available()]
    if missing:
        print(f"[bench] skipping {', '.join(missing)}: not installed "
              f"(pip install \"celery[redis]\" \"dask[distributed]\")", file=sys.stderr)
        systems = [s for s in systems if s not in missing]
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="orch-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    commit, dirty = git_commit(), source_dirty()
    if not args.no_snapshot:
        snapshot_source(log_dir / "source")
    started = time.monotonic()
    load_before = os.getloadavg()
    runner = Runner(args, log_dir)
    try:
        redis_version = runner.redis.version()
        selected = [w for w in wls if w.name in wanted_workloads]
        # Interleaved rounds: each round runs every system once (one repeat of each workload), so that
        # whatever else loads the machine meanwhile falls on every system alike, not on one.
        rounds = 1 if args.no_interleave else args.repeats
        per_round = args.repeats if args.no_interleave else 1
        for round_no in range(1, rounds + 1):
            for system in systems:
                mine = [w for w in selected if explicit or w.systems is None or system in w.systems]
                if mine:
                    runner.run_system(system, mine, round_no, per_round)
        runner.summarize(wls)
        if "scale" in wanted_workloads and "orch-lean" in systems:
            runner.run_scale(scale_sizes(size, args.with_100k), 2 if size == "smoke" else 4)
    finally:
        runner.redis.stop()
        stop_all()
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}",
        "repeats": args.repeats,
        "interleaved": not args.no_interleave,
        "size": size,
        "redis": redis_version,
        "redis_port": runner.redis.port,
        "versions": versions(),
        "commit": commit,
        "source": str(_procs.ROOT),
        "argv": sys.argv[1:] if argv is None else argv,
        "lean_layout": "one process per slot" if args.lean_processes else "one process, --concurrency N",
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "dirty": dirty,
    }
    shown_workloads = [w for w in wls if w.name in runner.results]
    table = markdown(runner.results, runner.scale, shown_workloads, systems, meta)
    goal_items = targets(runner.results, runner.scale)
    report = table + "\n\nTargets:\n\n" + targets_markdown(goal_items)
    if runner.errors:
        report += "\n\nErrors:\n\n" + "\n".join(f"- {e.splitlines()[0]}" for e in runner.errors)
    print(report)
    document = {"meta": meta, "workloads": {w.name: {"title": w.title, "unit": w.unit, "workers": w.workers,
                                                     "spec": w.spec} for w in wls},
                "results": runner.results, "scale": runner.scale, "targets": goal_items,
                "errors": runner.errors, "markdown": report}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(document, indent=1))
    if args.md_path:
        Path(args.md_path).write_text(report + "\n")
    print(f"[bench] done in {meta['seconds']}s; logs in {log_dir}", file=sys.stderr)
    return 1 if runner.errors else 0
