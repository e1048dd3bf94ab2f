"""Task functions, workflows and run checks for the multi-machine and chaos tests.

``orch worker`` processes import this module as ``cluster_tasks`` (they are
started with ``--path`` pointing at the ``tests`` folder; the test process and
the coordinator script have that folder on ``sys.path`` too), so every task
reference computed at submit is ``cluster_tasks:NAME``.

Every execution of a task body is recorded in Redis by the task itself, from
the worker that runs it: ``HINCRBY ct:{tag}:count TASK 1`` and one JSON entry
``[task, attempt, host, pid, time]`` on the list ``ct:{tag}:log``, where
``host`` is the worker's ``ORCH_TEST_HOST`` environment variable. So a test can
count how often each task really ran and where, independently of what the
coordinator believes. Each result carries the attempt that produced it and the
host it ran on, so a test can tell which attempt's result was committed.

The second half of the module is test-side code (not run by workers): a
progress recorder for the coordinator's ``on_progress`` callback, the checks
shared by both test files, and the diagnosis of a stalled run.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import redis

from orchestrator import Task, Workflow, current_task

HOST_ENV = "ORCH_TEST_HOST"
"""Environment variable naming the (simulated) machine a worker runs on."""
MODULUS = 1_000_003

_clients: dict[tuple[str, int], redis.Redis] = {}


def count_key(tag: str) -> str:
    return f"ct:{tag}:count"


def log_key(tag: str) -> str:
    return f"ct:{tag}:log"


def _client(url: str) -> redis.Redis:
    """One client per process and URL (lean work processes are long-lived; RQ forks one horse per job)."""
    key = (url, os.getpid())
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    return client


def _record(url: str, tag: str) -> tuple[str, int, str]:
    """Record this execution in Redis; return ``(task, attempt, host)``."""
    ctx = current_task()
    task, attempt = (ctx.task, ctx.attempt) if ctx is not None else ("?", 0)
    host = os.environ.get(HOST_ENV, "local")
    pipe = _client(url).pipeline(transaction=True)
    pipe.hincrby(count_key(tag), task, 1)
    pipe.rpush(log_key(tag), json.dumps([task, attempt, host, os.getpid(), time.time()]))
    pipe.execute()
    return task, attempt, host


def _upstream(name: str) -> Any:
    ctx = current_task()
    if ctx is None:
        raise RuntimeError("not running inside an orch task")
    value = ctx.fetch_result(name)
    if value is None:
        raise RuntimeError(f"upstream result of {name!r} is missing")
    return value


def pause_for(i: int, low: float, high: float) -> float:
    """A deterministic duration in [low, high] for task number ``i``."""
    return low + (high - low) * ((i * 37) % 11) / 10


# ------------------------------------------------------------------ fan-out: root -> N items -> join
ROOT_VALUE = 7


def item_name(i: int) -> str:
    return f"item{i:03d}"


def fan_root(url: str, tag: str, seconds: float) -> dict:
    _, attempt, host = _record(url, tag)
    time.sleep(seconds)
    return {"value": ROOT_VALUE, "attempt": attempt, "host": host}


def fan_item(url: str, tag: str, i: int, seconds: float) -> dict:
    _, attempt, host = _record(url, tag)
    time.sleep(seconds)
    root = _upstream("root")
    return {"value": root["value"] + i * i, "attempt": attempt, "host": host}


def fan_join(url: str, tag: str, n: int) -> dict:
    _, attempt, host = _record(url, tag)
    total = sum(_upstream(item_name(i))["value"] for i in range(n))
    return {"value": total, "count": n, "attempt": attempt, "host": host}


def make_fanout(url: str, tag: str, n_items: int = 198, low: float = 0.05, high: float = 0.1,
                max_retries: int = 3) -> Workflow:
    """``root -> item000..item{n-1} -> join`` (``n_items + 2`` tasks)."""
    wf = Workflow("cluster-fanout")
    wf.add_task(Task("root", fan_root, args=(url, tag, low), max_retries=max_retries))
    for i in range(n_items):
        wf.add_task(Task(item_name(i), fan_item, dependencies=["root"], args=(url, tag, i, pause_for(i, low, high)),
                         max_retries=max_retries))
    wf.add_task(Task("join", fan_join, dependencies=[item_name(i) for i in range(n_items)], args=(url, tag, n_items),
                     max_retries=max_retries))
    return wf


def fanout_expected(n_items: int = 198) -> dict[str, int]:
    values = {"root": ROOT_VALUE}
    values.update({item_name(i): ROOT_VALUE + i * i for i in range(n_items)})
    values["join"] = sum(values[item_name(i)] for i in range(n_items))
    return values


# ----------------------------------------------------- layered DAG: each task needs two of the layer above
def layer_name(layer: int, i: int) -> str:
    return f"L{layer}-{i:02d}"


def layered_deps(layer: int, i: int, width: int) -> list[str]:
    if layer == 0:
        return []
    return sorted({layer_name(layer - 1, i), layer_name(layer - 1, (i + 1) % width)})


def layered_value_of(layer: int, i: int, width: int, upstream: Callable[[str], int]) -> int:
    if layer == 0:
        return i + 1
    left = upstream(layer_name(layer - 1, i))
    right = upstream(layer_name(layer - 1, (i + 1) % width))
    return (left + 2 * right + layer) % MODULUS


def layered_task(url: str, tag: str, layer: int, i: int, width: int, seconds: float) -> dict:
    _, attempt, host = _record(url, tag)
    time.sleep(seconds)
    value = layered_value_of(layer, i, width, lambda name: _upstream(name)["value"])
    return {"value": value, "attempt": attempt, "host": host}


def make_layered(url: str, tag: str, layers: int = 10, width: int = 50, low: float = 0.02, high: float = 0.05,
                 max_retries: int = 6) -> Workflow:
    """``layers`` x ``width`` tasks; task (L, i) depends on (L-1, i) and (L-1, i+1 mod width)."""
    wf = Workflow("cluster-layered")
    for layer in range(layers):
        for i in range(width):
            wf.add_task(Task(layer_name(layer, i), layered_task, dependencies=layered_deps(layer, i, width),
                             args=(url, tag, layer, i, width, pause_for(layer * width + i, low, high)),
                             max_retries=max_retries))
    return wf


def layered_expected(layers: int = 10, width: int = 50) -> dict[str, int]:
    values: dict[str, int] = {}
    for layer in range(layers):
        for i in range(width):
            values[layer_name(layer, i)] = layered_value_of(layer, i, width, values.__getitem__)
    return values


# =========================================================================== test-side helpers
class ProgressLog:
    """An ``on_progress`` callback that records every transition the coordinator applies.

    Each record: ``{task, start, finish, attempt, at, error, kind, worker}`` (``at`` is the
    coordinator's ``time.time()``; ``worker`` is the task's worker as the coordinator knows it).
    With ``path``, records are also appended to that file as JSON lines, flushed at once.
    """

    def __init__(self, tasks: dict[str, Task], path: Optional[str] = None) -> None:
        self.tasks = tasks
        self.records: list[dict[str, Any]] = []
        self.last_at = time.time()
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1) if path else None

    def __call__(self, scheduler: Any, transitions: Iterable[Any]) -> None:
        with self._lock:
            for move in transitions:
                record = {
                    "task": move.task, "start": move.start.value, "finish": move.finish.value,
                    "attempt": move.attempt, "at": move.at, "error": move.error,
                    "kind": move.kind.value if move.kind is not None else None,
                    "worker": self.tasks[move.task].worker,
                }
                self.records.append(record)
                if self._file is not None:
                    self._file.write(json.dumps(record) + "\n")
            self.last_at = time.time()

    def note(self, **fields: Any) -> None:
        """Append a non-transition record (``{"event": ...}``) to the file."""
        if self._file is not None:
            with self._lock:
                self._file.write(json.dumps(fields) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.endswith("}"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def snapshot(conn: redis.Redis, run_id: str, tag: str) -> dict[str, Any]:
    """Everything the checks need, read from Redis: run meta, task records, results, executions."""
    from shared import codec, keys

    meta = {_text(k): _text(v) for k, v in conn.hgetall(keys.run(run_id)).items()}
    meta.pop("spec", None)
    records = {_text(k): json.loads(v) for k, v in conn.hgetall(keys.tasks(run_id)).items()}
    results = {_text(k): codec.decode(v) for k, v in conn.hgetall(keys.results(run_id)).items()}
    counts = {_text(k): int(v) for k, v in conn.hgetall(count_key(tag)).items()}
    executions = [json.loads(raw) for raw in conn.lrange(log_key(tag), 0, -1)]
    return {"meta": meta, "records": records, "results": results, "counts": counts, "executions": executions}


@dataclass
class RunFigures:
    tasks: int
    lost_attempts: int                       # attempts failed as WorkerLost
    crashed_attempts: int                    # attempts failed as WorkerCrash (a killed worker noticed by itself)
    retried_tasks: list[str]                 # tasks whose final attempt is >= 2
    executions: int                          # task bodies that ran (and reached Redis)
    executed_twice_or_more: list[str] = field(default_factory=list)
    lost_by_worker: dict[str, list[dict]] = field(default_factory=dict)


def host_of_worker(worker: Optional[str]) -> str:
    """The host a worker of these tests runs on: ``w1-0`` (RQ) and ``w1`` (lean) run on ``w1``;
    a chaos worker (``chaos-3``) is a host of its own."""
    if not worker:
        return "?"
    return worker if worker.startswith("chaos") else worker.split("-")[0]


def check_run(snap: dict[str, Any], expected: dict[str, int], transitions: list[dict[str, Any]],
              allowed_failure_kinds: frozenset = frozenset({"lost"})) -> RunFigures:
    """Assert that the run succeeded with every result right and committed exactly once.

    - the run and every task record are ``success``, and the results hash holds exactly one
      field per task, with the expected value;
    - the committed result is the one of the task's current attempt (its ``attempt`` equals
      the record's), produced on the worker the record names;
    - the coordinator applied exactly one success per task (a result is written only in the
      step that applies the success, so exactly one write), and no failure other than
      ``allowed_failure_kinds``; every task's final attempt = 1 + its failed attempts;
    - per the executions recorded by the tasks themselves: a task never retried ran once;
      a retried task ran at most as often as its attempts, and its final attempt ran.
    """
    meta, records, results = snap["meta"], snap["records"], snap["results"]
    assert meta.get("state") == "success", f"run state {meta.get('state')!r}, counts {meta.get('counts')}"
    assert set(records) == set(expected), sorted(set(records) ^ set(expected))
    not_ok = {name: rec for name, rec in records.items() if rec["state"] != "success"}
    assert not not_ok, f"{len(not_ok)} task(s) did not succeed: {dict(list(not_ok.items())[:5])}"
    assert set(results) == set(expected), f"results hash fields differ: {sorted(set(results) ^ set(expected))[:10]}"
    assert len(results) == len(expected)
    wrong = {name: (results[name], value) for name, value in expected.items() if results[name]["value"] != value}
    assert not wrong, f"{len(wrong)} wrong result(s) (got, expected): {dict(list(wrong.items())[:5])}"
    stale = {name: (results[name]["attempt"], records[name]["attempt"]) for name in expected
             if results[name]["attempt"] != records[name]["attempt"]}
    assert not stale, f"committed results not from the current attempt (result's, record's): {stale}"
    elsewhere = {name: (results[name]["host"], records[name]["worker"]) for name in expected
                 if results[name]["host"] != host_of_worker(records[name]["worker"])}
    assert not elsewhere, f"result produced on another host than the recorded worker's: {elsewhere}"

    successes: dict[str, int] = {}
    failures: dict[str, list[dict]] = {}
    for move in transitions:
        if move["finish"] == "success":
            successes[move["task"]] = successes.get(move["task"], 0) + 1
        if move["finish"] in ("retrying", "failure"):
            failures.setdefault(move["task"], []).append(move)
    assert all(successes.get(name) == 1 for name in expected), {
        name: successes.get(name, 0) for name in expected if successes.get(name) != 1}
    bad = [m for moves in failures.values() for m in moves if m["kind"] not in allowed_failure_kinds]
    assert not bad, f"unexpected failures: {bad[:5]}"
    for name in expected:
        assert records[name]["attempt"] == 1 + len(failures.get(name, [])), (
            name, records[name], failures.get(name))

    counts = snap["counts"]
    ran: dict[str, list[tuple[int, str]]] = {}
    for task, attempt, host, _pid, _at in snap["executions"]:
        ran.setdefault(task, []).append((attempt, host))
    assert sum(counts.values()) == len(snap["executions"])
    for name in expected:
        attempt = records[name]["attempt"]
        assert counts.get(name, 0) == len(ran.get(name, [])), name
        if attempt == 1:
            assert counts.get(name) == 1, f"{name} ran {counts.get(name)} times in a single attempt: {ran.get(name)}"
        else:
            assert 1 <= counts.get(name, 0) <= attempt, (name, attempt, ran.get(name))
            assert (attempt, results[name]["host"]) in ran[name], (name, attempt, ran[name])
        assert all(a <= attempt for a, _ in ran[name]), (name, ran[name])

    lost = [m for moves in failures.values() for m in moves if m["kind"] == "lost"]
    by_worker: dict[str, list[dict]] = {}
    for move in lost:
        by_worker.setdefault(lost_worker(move["error"]), []).append(move)
    return RunFigures(
        tasks=len(expected),
        lost_attempts=len(lost),
        crashed_attempts=sum(1 for moves in failures.values() for m in moves if m["kind"] == "crashed"),
        retried_tasks=sorted(name for name in expected if records[name]["attempt"] >= 2),
        executions=len(snap["executions"]),
        executed_twice_or_more=sorted(name for name, n in counts.items() if n >= 2),
        lost_by_worker=by_worker,
    )


def lost_worker(error: Optional[str]) -> str:
    """The worker named in a ``WorkerLost: worker NAME ...`` error."""
    words = (error or "").split()
    return words[2] if len(words) > 2 and words[0] == "WorkerLost:" and words[1] == "worker" else "?"


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"min {min(values):.2f}s, median {statistics.median(values):.2f}s, max {max(values):.2f}s "
            f"(n={len(values)})")


# ------------------------------------------------------------------------ stall diagnosis
def diagnose_stall(conn: redis.Redis, run_id: str, transport: str,
                   alive_workers: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Where the unfinished tasks of a stalled run are.

    For each task not final in Redis: its record and, for its current attempt, whether the
    job is in the queue, in RQ's intermediate queue (dequeued by some worker, not yet started),
    in RQ's started registry (and which worker holds it, and whether that worker's heartbeat
    key exists), or in a lean worker's in-flight list.
    """
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from shared import keys

    meta = {_text(k): _text(v) for k, v in conn.hgetall(keys.run(run_id)).items()}
    names = json.loads(meta.get("spec") or '{"names": []}')["names"]
    index = {name: i for i, name in enumerate(names)}
    records = {_text(k): json.loads(v) for k, v in conn.hgetall(keys.tasks(run_id)).items()}
    queue = Queue("default", connection=conn, serializer=JSONSerializer)
    queued_ids = set(queue.get_job_ids())
    intermediate = set(queue.intermediate_queue.get_job_ids())
    started = set(queue.started_job_registry.get_job_ids(cleanup=False))
    lean_queue = [json.loads(raw)[:3] for raw in conn.lrange(keys.lean_queue("default"), 0, -1)]
    inflight: dict[str, list] = {}
    for worker in conn.smembers(keys.LEAN_WORKERS):
        worker = _text(worker)
        inflight[worker] = [json.loads(raw)[:3] for raw in conn.lrange(keys.inflight(worker), 0, -1)]
    stuck = {}
    for name, record in records.items():
        if record["state"] in ("pending", "success", "failure", "cancelled"):
            continue  # pending: waiting for its dependencies, not stuck itself
        attempt = record["attempt"]
        where: dict[str, Any] = {"record": record}
        if transport == "rq" and name in index:
            job_id = keys.job_id(run_id, index[name], attempt)
            where["job_id"] = job_id
            where["in_queue"] = job_id in queued_ids
            where["in_intermediate_queue"] = job_id in intermediate
            where["in_started_registry"] = job_id in started
            try:
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
                where["rq_status"] = str(job.get_status(refresh=False))
                where["rq_worker"] = job.worker_name
                if job.worker_name:
                    where["rq_worker_heartbeat"] = bool(conn.exists(keys.alive(job.worker_name)))
            except Exception as exc:  # noqa: BLE001 - diagnosis only
                where["rq_job"] = f"{type(exc).__name__}: {exc}"
        else:
            where["in_lean_queue"] = [run_id, name, attempt] in lean_queue
            where["in_flight_at"] = [w for w, entries in inflight.items() if [run_id, name, attempt] in entries]
        stuck[name] = where
    return {"run_id": run_id, "state": meta.get("state"), "counts": meta.get("counts"), "stuck": stuck,
            "alive_keys": sorted(_text(k) for k in conn.keys(keys.alive("*"))),
            "alive_workers": sorted(alive_workers or [])}


def is_rq_dequeue_gap(diagnosis: dict[str, Any], dead_workers: Iterable[str]) -> bool:
    """True if every stuck task is the RQ-mode gap the README names: an attempt still ``queued``
    for the coordinator (never reported started) whose job a worker that is gone had already
    taken off the queue (it sits in RQ's intermediate queue, or in the started registry under
    that worker), so no heartbeat watch covers it and nothing ever reports it."""
    dead = set(dead_workers)
    stuck = diagnosis["stuck"]
    if not stuck:
        return False
    for where in stuck.values():
        if where["record"]["state"] != "queued" or where.get("in_queue"):
            return False
        if where.get("in_intermediate_queue"):
            continue
        if where.get("in_started_registry") and where.get("rq_worker") in dead:
            continue
        return False
    return True
