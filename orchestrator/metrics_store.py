"""Orch's counters and histograms as Redis keeps them: one hash, ``orch:metrics``, added to in batches.

Counters must outlive every process that shows them (a dashboard, ``orch coordinator --metrics-port``),
and must not be recomputed by scanning runs, so the coordinators keep them in Redis as they apply
outcomes. Each value is one field of :data:`shared.keys.METRICS`: the field is the JSON array
``[name, label value, ...]`` (:func:`metric_field`), the value a number. A histogram keeps one field per
bucket (its own count, not cumulative: an observation adds to one bucket only) and one for its sum.

Cost: a coordinator adds to a :class:`Tally` in memory (no Redis command) and writes it with
:func:`flush`, one Lua call that reads and writes every field it changes in a few commands however
many fields there are: at most once a second and at the end of the run (:class:`RunMetrics`). So
the commands per task of a large run do not grow by one per task, and per-task labels cost nothing
more than per-workflow ones. Increments are at least once: a flush whose reply is lost to a
connection error is sent again.

This module holds the names and the arithmetic; :mod:`orchestrator.metrics` turns the hash into the
Prometheus text format.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import redis

from shared import keys
from shared.states import ACTIVE_STATES, TaskState

if TYPE_CHECKING:
    from orchestrator.coordinator import Step

log = logging.getLogger("orch.metrics")

RUNS_STARTED = "runs_started"
"""Counter; labels: workflow. Runs created (``orch run``, ``orch submit``, a schedule's tick)."""
RUNS_FINISHED = "runs_finished"
"""Counter; labels: workflow, state. Runs that ended (a run retried from failure counts again when it ends again)."""
RUN_RETRIES = "run_retries"
"""Counter; labels: workflow. Runs reopened by ``orch retry`` (a rerun from failure)."""
TASK_ATTEMPTS = "task_attempts"
"""Counter; labels: workflow, task, outcome (:func:`attempt_outcome`). Attempts that ended."""
TASK_RETRIES = "task_retries"
"""Counter; labels: workflow, task. Failed attempts that the task's retry policy tries again."""
TASK_DURATION = "task_duration"
"""Histogram; labels: workflow, task. Seconds from an attempt's start to its end (attempts that started)."""
SCHEDULE_LAG = "schedule_lag"
"""Histogram; labels: schedule. Seconds from a schedule's tick to the creation of its run."""

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""Upper bounds (seconds) of the task duration buckets, besides +Inf: milliseconds to an hour."""
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Upper bounds (seconds) of the schedule lag buckets, besides +Inf."""
HISTOGRAMS: dict[str, tuple[float, ...]] = {TASK_DURATION: DURATION_BUCKETS, SCHEDULE_LAG: LAG_BUCKETS}
BUCKET, SUM = "_bucket", "_sum"
"""Suffixes of a histogram's field names: ``[name + BUCKET, *labels, le]`` and ``[name + SUM, *labels]``."""
INF = "+Inf"

FLUSH_INTERVAL = 1.0
"""Most seconds a coordinator keeps increments in memory while its run goes on."""
FIELDS_PER_CALL = 1000
"""Fields the flush script reads and writes per HMGET/HSET (Lua's ``unpack`` takes a few thousand)."""

_ADD = """
-- KEYS[1]: the metrics hash. ARGV: field, increment, field, increment, ...
-- One HMGET and one HSET per FIELDS_PER_CALL fields, whatever their number: atomic, so coordinators
-- adding to the same fields at once lose nothing.
local pairs_count = #ARGV / 2
local per_call = tonumber(ARGV_PER_CALL)
for first = 1, pairs_count, per_call do
  local last = math.min(pairs_count, first + per_call - 1)
  local fields = {}
  for i = first, last do fields[#fields + 1] = ARGV[2 * i - 1] end
  local old = redis.call('HMGET', KEYS[1], unpack(fields))
  local new = {}
  for i = first, last do
    local value = (tonumber(old[i - first + 1]) or 0) + tonumber(ARGV[2 * i])
    new[#new + 1] = ARGV[2 * i - 1]
    local text = string.format('%.15g', value)
    if tonumber(text) ~= value then text = string.format('%.17g', value) end
    new[#new + 1] = text
  end
  redis.call('HSET', KEYS[1], unpack(new))
end
return pairs_count
""".replace("ARGV_PER_CALL", str(FIELDS_PER_CALL))


def metric_field(name: str, *labels: str) -> str:
    """The hash field of one value: ``["name","label value",...]`` (any characters in a label value)."""
    return json.dumps([name, *labels], separators=(",", ":"), ensure_ascii=False)


def parse_field(raw: bytes | str) -> tuple[str, tuple[str, ...]]:
    """``(name, label values)`` of a :func:`metric_field`; ``ValueError`` for anything else."""
    try:
        parts = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"not a metric field: {raw!r:.80}") from None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"not a metric field: {raw!r:.80}")
    return parts[0], tuple(parts[1:])


def bucket_bound(value: float, buckets: Sequence[float]) -> str:
    """The ``le`` of the bucket ``value`` falls in: the first bound at or above it, else ``+Inf``."""
    i = bisect.bisect_left(buckets, value)
    return INF if i == len(buckets) else repr(float(buckets[i]))


class Tally:
    """Increments not written yet: field -> amount. Pure arithmetic, no I/O."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, name: str, labels: Sequence[str], amount: float = 1.0) -> None:
        field = metric_field(name, *labels)
        self.pending[field] = self.pending.get(field, 0.0) + amount

    def observe(self, name: str, labels: Sequence[str], value: float) -> None:
        """One observation of histogram ``name`` (one of :data:`HISTOGRAMS`)."""
        if math.isnan(value):
            return
        value = max(0.0, value)
        self.add(name + BUCKET, [*labels, bucket_bound(value, HISTOGRAMS[name])])
        self.add(name + SUM, labels, value)

    def take(self) -> dict[str, float]:
        """The pending increments, leaving none."""
        taken, self.pending = self.pending, {}
        return taken


def attempt_outcome(finish: TaskState, kind: Optional[Any]) -> str:
    """The ``outcome`` label of an attempt that ended in ``finish``: ``success``, ``skipped``,
    ``cancelled``, or for a failure (retried or not) its kind: ``error``, ``timeout``, ``crashed``, ``lost``."""
    if finish in (TaskState.SUCCESS, TaskState.SKIPPED, TaskState.CANCELLED):
        return finish.value
    return str(getattr(kind, "value", kind) or "error")


def tally_step(tally: Tally, workflow: str, step: "Step", tasks: Mapping[str, Any]) -> None:
    """Add what ``step`` (written) changed: attempts that ended, their durations, retries, the run's end.

    ``tasks``: the run's Task objects (a mapped task's children count under the mapped task's name;
    the mapped task's own moves are not attempts: its children are)."""
    if step.rerun:
        tally.add(RUN_RETRIES, [workflow])
    for move in step.transitions:
        if move.start not in ACTIVE_STATES or move.finish in ACTIVE_STATES or move.finish is TaskState.PENDING:
            continue
        task = tasks.get(move.task)
        if task is None or getattr(task, "map_over", None):
            continue
        name = getattr(task, "map_parent", None) or move.task
        tally.add(TASK_ATTEMPTS, [workflow, name, attempt_outcome(move.finish, move.kind)])
        if move.finish is TaskState.RETRYING:
            tally.add(TASK_RETRIES, [workflow, name])
        started = step.attempt_starts.get(move.task)
        if started is not None:
            tally.observe(TASK_DURATION, [workflow, name], move.at - started)
    if step.finished:
        tally.add(RUNS_FINISHED, [workflow, step.finished.state.value])


def add_to_metrics(connection: redis.Redis, increments: Mapping[str, float]) -> None:
    """Add ``increments`` (field -> amount) to the metrics hash in one Lua call (EVALSHA)."""
    _Adder(connection)(increments)


class _Adder:
    """The flush script registered on one connection (loaded into Redis on its first use)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self.script: Any = None

    def __call__(self, increments: Mapping[str, float]) -> None:
        if not increments:
            return
        if self.script is None:  # registered when first needed: a backend that never flushes needs no script
            self.script = self.connection.register_script(_ADD)
        args: list[Any] = []
        for field, amount in increments.items():
            args += [field, repr(float(amount))]
        self.script(keys=[keys.METRICS], args=args)


def count_run_started(pipeline: Any, workflow: str, queues: Iterable[str]) -> None:
    """Queue, on the pipeline that writes a new run, its ``runs_started`` increment and the names of
    the queues its tasks use (for the queue depth gauges): two commands per run."""
    pipeline.hincrbyfloat(keys.METRICS, metric_field(RUNS_STARTED, workflow), 1)
    names = sorted(set(queues))
    if names:
        pipeline.sadd(keys.QUEUES, *names)


def record_schedule_lag(pipeline_or_connection: Any, schedule: str, seconds: float) -> None:
    """Record that a tick of ``schedule`` created its run ``seconds`` after its time (the schedule service
    calls this; on a pipeline it joins that pipeline's round trip). Two commands, once per tick."""
    for command in schedule_lag_commands(schedule, seconds):
        pipeline_or_connection.execute_command(*command)


def schedule_lag_commands(schedule: str, seconds: float) -> list[tuple]:
    """The same as command tuples, for a caller that commits a list of them in one script
    (the schedule service's fenced commit)."""
    tally = Tally()
    tally.observe(SCHEDULE_LAG, [schedule], seconds)
    return [("HINCRBYFLOAT", keys.METRICS, field, repr(amount)) for field, amount in tally.take().items()]


class RunMetrics:
    """A coordinator's metrics of one run: added to as steps are written, flushed at most once a
    :data:`FLUSH_INTERVAL` and when the run ends.

    A flush cut off by a connection error keeps its increments and raises (the backend retries it
    as it retries its own writes); one that Redis refuses (out of memory, a missing ACL right) is
    logged and dropped: metrics never stop a run."""

    def __init__(self, connection: redis.Redis, workflow: str, tasks: Mapping[str, Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._add = _Adder(connection)
        self.workflow = workflow
        self.tasks = tasks
        self.clock = clock
        self.tally = Tally()
        self._flushed_at = clock()

    def count(self, step: "Step") -> None:
        """Count what ``step`` changed, once it is written (the caller flushes when it ends the run)."""
        tally_step(self.tally, self.workflow, step, self.tasks)

    def flush_if_due(self) -> None:
        if self.tally and self.clock() - self._flushed_at >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Send the increments, :data:`FIELDS_PER_CALL` fields a call: a large run's second of
        per-task fields (15,000 at 5,000 tasks/s) packed as one command held several copies of
        itself at once, a spike of 20 MB in the coordinator's memory."""
        self._flushed_at = self.clock()
        items = list(self.tally.take().items())
        for first in range(0, len(items), FIELDS_PER_CALL):
            try:
                self._add(dict(items[first:first + FIELDS_PER_CALL]))
            except (redis.ConnectionError, redis.TimeoutError):
                for field, amount in items[first:]:  # kept for the next flush
                    self.tally.pending[field] = self.tally.pending.get(field, 0.0) + amount
                raise
            except redis.RedisError as exc:
                log.warning("metrics of workflow %r: Redis refused %d increments (%s); dropped",
                            self.workflow, len(items) - first, exc)
                return


def read_all(connection: redis.Redis) -> Iterable[tuple[str, tuple[str, ...], float]]:
    """Every stored value as ``(name, label values, value)``; damaged fields are skipped."""
    for raw_field, raw_value in (connection.hgetall(keys.METRICS) or {}).items():
        try:
            name, labels = parse_field(raw_field)
            value = float(raw_value)
        except ValueError:
            continue
        yield name, labels, value
