"""``/metrics``: orch's state in the Prometheus text format, read from Redis at scrape time.

The counters and histograms are the ones coordinators keep in ``orch:metrics``
(:mod:`orchestrator.metrics_store`), so every process that shows them shows the same
values, and they survive restarts of the dashboard and of ``orch coordinator``. The gauges
(queue depths, tasks waiting on a queue that no live worker serves, live workers, active
runs) are read at scrape time. A scrape costs a handful of Redis commands (a few per
queue), whatever the number of runs.

:func:`metrics_text` gives one scrape's body and content type (the dashboard's route
serves it); :func:`serve_metrics` serves it over HTTP with prometheus_client's own server
(``orch coordinator --metrics-port``).
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any, Iterable, Iterator, Optional

import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator import metrics_store as store
from shared import keys
from shared.errors import MetricsServerError
from shared.workers import KINDS, LEAN, RQ, WorkerInfo, live_workers

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format every Prometheus version reads (what prometheus_client's own server sends
unless asked for a newer one)."""
RQ_QUEUES = "rq:queues"
"""RQ's own set of its queues' keys (``rq:queue:{name}``)."""
RQ_QUEUE_PREFIX = "rq:queue:"

COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    store.RUNS_STARTED: ("orch_runs_started", "Runs created, by workflow.", ("workflow",)),
    store.RUNS_FINISHED: ("orch_runs_finished", "Runs that ended, by workflow and final state.",
                          ("workflow", "state")),
    store.RUN_RETRIES: ("orch_run_retries", "Runs reopened by 'orch retry' (rerun from failure), by workflow.",
                        ("workflow",)),
    store.TASK_ATTEMPTS: ("orch_task_attempts", "Task attempts that ended, by workflow, task and outcome "
                          "(success, error, timeout, crashed, lost, cancelled, skipped); a mapped task's "
                          "children count under its name.", ("workflow", "task", "outcome")),
    store.TASK_RETRIES: ("orch_task_retries", "Failed attempts that the task's retry policy tries again.",
                         ("workflow", "task")),
}
"""Stored name -> (Prometheus name without ``_total``, help, label names)."""
HISTOGRAMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    store.TASK_DURATION: ("orch_task_duration_seconds", "Seconds from an attempt's start to its end.",
                          ("workflow", "task")),
    store.SCHEDULE_LAG: ("orch_schedule_lag_seconds", "Seconds from a schedule's tick to its run's creation.",
                         ("schedule",)),
}


class OrchCollector(Collector):
    """A prometheus_client collector that reads orch's metrics from Redis on each ``collect()``."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        values = list(store.read_all(self.connection))
        yield from stored_families(values)
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        workers = live_workers(self.connection)
        alive = GaugeMetricFamily("orch_workers_alive", "Workers whose heartbeat is live, by kind.", labels=["kind"])
        for kind in KINDS:
            alive.add_metric([kind], sum(1 for w in workers if w.kind == kind))
        yield alive
        depth = GaugeMetricFamily("orch_queue_depth", "Attempts waiting on a queue (both job forms).",
                                  labels=["queue"])
        unserved = GaugeMetricFamily("orch_queue_unserved_tasks", "Attempts waiting on a queue that no live "
                                     "worker of their form serves (no live worker serves it).", labels=["queue"])
        for queue, (lean, rq) in queue_lengths(self.connection, workers).items():
            depth.add_metric([queue], lean + rq)
            unserved.add_metric([queue], waiting_unserved(queue, lean, rq, workers))
        yield depth
        yield unserved
        active = GaugeMetricFamily("orch_runs_active", "Runs not finished yet.")
        active.add_metric([], self.connection.scard(keys.ACTIVE))
        yield active

def queue_lengths(connection: redis.Redis, workers: list[WorkerInfo]) -> dict[str, tuple[int, int]]:
    """queue -> (lean jobs, RQ jobs) waiting, for every queue a coordinator used, RQ knows or a worker
    serves (the depth gauges and the dashboard's workers page)."""
    names = set(_texts(connection.smembers(keys.QUEUES)))
    names.update(q[len(RQ_QUEUE_PREFIX):] for q in _texts(connection.smembers(RQ_QUEUES))
                 if q.startswith(RQ_QUEUE_PREFIX))
    names.update(q for w in workers for q in w.queues)
    ordered = sorted(names)
    pipe = connection.pipeline(transaction=False)
    for queue in ordered:
        pipe.llen(keys.lean_queue(queue))
        pipe.llen(RQ_QUEUE_PREFIX + queue)
    lengths = pipe.execute() if ordered else []
    return {queue: (int(lengths[2 * i]), int(lengths[2 * i + 1])) for i, queue in enumerate(ordered)}


def waiting_unserved(queue: str, lean: int, rq: int, workers: Iterable[WorkerInfo]) -> int:
    """Of ``lean`` and ``rq`` jobs waiting on ``queue``, those no live worker runs: lean jobs where no
    live ``orch worker`` serves the queue, RQ jobs where no live ``orch worker --mode rq`` does."""
    kinds = {w.kind for w in workers if queue in w.queues}
    return (0 if LEAN in kinds else lean) + (0 if RQ in kinds else rq)


def stored_families(values: Iterable[tuple[str, tuple[str, ...], float]]) -> Iterator[Metric]:
    """The counter and histogram families of the stored values (:func:`metrics_store.read_all`).

    Every family is yielded even with no sample, so a scrape always names every metric."""
    counters = {name: CounterMetricFamily(prom, doc, labels=list(labels))
                for name, (prom, doc, labels) in COUNTERS.items()}
    buckets: dict[str, dict[tuple[str, ...], dict[str, float]]] = {name: defaultdict(dict) for name in HISTOGRAMS}
    sums: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in HISTOGRAMS}
    for name, labels, value in values:
        if name in counters and len(labels) == len(COUNTERS[name][2]):
            counters[name].add_metric(list(labels), value)
        elif name.endswith(store.BUCKET) and name[:-len(store.BUCKET)] in HISTOGRAMS and labels:
            buckets[name[:-len(store.BUCKET)]][labels[:-1]][labels[-1]] = value
        elif name.endswith(store.SUM) and name[:-len(store.SUM)] in HISTOGRAMS:
            sums[name[:-len(store.SUM)]][labels] = value
    yield from counters.values()
    for name, (prom, doc, labels) in HISTOGRAMS.items():
        family = HistogramMetricFamily(prom, doc, labels=list(labels))
        for series in sorted(set(buckets[name]) | set(sums[name])):
            if len(series) == len(labels):
                family.add_metric(list(series), cumulative_buckets(buckets[name].get(series, {}),
                                                                   store.HISTOGRAMS[name]),
                                  sums[name].get(series, 0.0))
        yield family


def cumulative_buckets(counts: dict[str, float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Prometheus's cumulative ``(le, count)`` pairs, ``+Inf`` last, from per-bucket counts keyed by ``le``.

    A stored ``le`` that is not one of ``bounds`` (kept by a version with other buckets) counts in the
    first bucket at or above it, so the total and every bucket's upper bound stay true."""
    own = [0.0] * (len(bounds) + 1)
    for le, count in counts.items():
        try:
            own[bisect.bisect_left(bounds, float(le))] += count
        except ValueError:
            continue
    pairs, total = [], 0.0
    for le, count in zip([repr(float(b)) for b in bounds] + [store.INF], own):
        total += count
        pairs.append((le, total))
    return pairs


def registry_for(connection: redis.Redis) -> CollectorRegistry:
    """A registry holding only orch's collector on ``connection`` (no process metrics of whoever serves it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OrchCollector(connection))
    return registry


def metrics_text(connection: redis.Redis) -> tuple[bytes, str]:
    """One scrape: ``(body, content type)`` in the Prometheus text format, read from Redis now."""
    return generate_latest(registry_for(connection)), CONTENT_TYPE


def serve_metrics(connection: redis.Redis, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread (prometheus_client's server); returns
    ``(server, thread)`` for :func:`stop_serving`. Raises :class:`MetricsServerError` if it cannot listen."""
    try:
        return start_http_server(port, addr=host, registry=registry_for(connection))
    except OSError as exc:
        raise MetricsServerError(host, port, exc.strerror or str(exc)) from None


def stop_serving(served: Optional[Any]) -> None:
    if served is not None:
        server, thread = served
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _texts(raw: Iterable[Any]) -> list[str]:
    return [r.decode("utf-8", "replace") if isinstance(r, bytes) else str(r) for r in raw]
