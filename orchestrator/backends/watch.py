"""Noticing attempts whose worker is gone, from what is in Redis.

Three ways an attempt can be stranded, and how each is seen:

1. Its worker reported it started, then died or was cut off: the worker's
   heartbeat key ``orch:alive:{worker}`` lapses (``Settings.heartbeat_ttl``).
2. An RQ worker took its job off the queue and died before reporting the
   start: RQ parks a job it is taking in the queue's *intermediate* list and
   removes it once the work horse starts it, milliseconds later. A job of ours
   still there after ``heartbeat_ttl`` belongs to a worker that died in between.
3. A lean worker took it and died: the job sits in the in-flight list of the
   work process that took it (``LMOVE``/``BLMOVE`` put it there atomically; one
   list per slot, each named in ``orch:lean-workers``), and the worker's
   heartbeat lapsed. (A work process that dies while its worker lives is
   settled by the worker itself.)

Each becomes a ``TaskFailed(kind=LOST)`` event; the scheduler retries it like
any failure, and ignores it if the attempt had finished after all.

All three read heartbeats, which lapse for live workers too while Redis is
down. So when the checks themselves were held up (an outage, a restart, a
paused coordinator: longer than ``STALL`` between two checks), no verdict is
given for one heartbeat TTL, long enough for live workers to beat again.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import redis

from shared import keys
from shared.events import Event, TaskFailed
from shared.states import FailureKind

STALL = 2.5
"""Seconds between two checks (normally about one) that mean the coordinator was held up."""


class LossWatch:
    """The attempts of one run that a worker holds or is taking, and the check on them."""

    def __init__(self, connection: redis.Redis, run_id: str, heartbeat_ttl: float,
                 running: Optional[dict[str, tuple[int, str]]] = None) -> None:
        self.connection = connection
        self.run_id = run_id
        self.heartbeat_ttl = heartbeat_ttl
        self.running: dict[str, tuple[int, str]] = dict(running or {})
        """task -> (attempt, worker) of attempts reported started."""
        self.queued: dict[str, tuple[str, int, str]] = {}
        """RQ job id -> (task, attempt, intermediate list key) of attempts not reported started."""
        self._in_transit_since: dict[str, float] = {}
        self._last_check: Optional[float] = None
        self._quiet_until = 0.0

    # ------------------------------------------------------------- bookkeeping
    def dispatched(self, job_id: str, task: str, attempt: int, intermediate_key: str) -> None:
        self.queued[job_id] = (task, attempt, intermediate_key)

    def started(self, job_id: Optional[str], task: str, attempt: int, worker: Optional[str]) -> None:
        if job_id is not None:
            self.queued.pop(job_id, None)
        if worker:
            self.running[task] = (attempt, worker)

    def finished(self, job_id: Optional[str], task: str, attempt: int) -> None:
        if job_id is not None:
            self.queued.pop(job_id, None)
        if self.running.get(task, (None,))[0] == attempt:
            del self.running[task]

    # ------------------------------------------------------------------- check
    def check(self, lean: bool) -> list[Event]:
        now = time.monotonic()
        if self._last_check is not None and now - self._last_check > STALL:
            self._quiet_until = now + self.heartbeat_ttl
            self._in_transit_since.clear()
        self._last_check = now
        if now < self._quiet_until:
            return []
        lost = self._stranded_in_transit()
        if lean:
            lost += self._stranded_lean()
        lost += self._silent_workers()
        return lost

    def _alive(self, workers: list[str]) -> list[bool]:
        pipe = self.connection.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(keys.alive(worker))
        return [bool(flag) for flag in pipe.execute()]

    def _lost(self, task: str, attempt: int, why: str) -> Event:
        return TaskFailed(task, attempt, time.time(), f"WorkerLost: {why}", FailureKind.LOST)

    def _silent_workers(self) -> list[Event]:
        if not self.running:
            return []
        workers = sorted({worker for _, worker in self.running.values()})
        alive = dict(zip(workers, self._alive(workers)))
        lost = []
        for task, (attempt, worker) in list(self.running.items()):
            if not alive[worker]:
                del self.running[task]
                lost.append(self._lost(task, attempt, f"worker {worker} stopped heartbeating "
                                                      f"(no heartbeat for {self.heartbeat_ttl:g}s)"))
        return lost

    def _stranded_in_transit(self) -> list[Event]:
        """RQ jobs of ours left in an intermediate list longer than a heartbeat TTL."""
        if not self.queued:
            self._in_transit_since.clear()
            return []
        lists = sorted({key for _, _, key in self.queued.values()})
        pipe = self.connection.pipeline(transaction=False)
        for key in lists:
            pipe.lrange(key, 0, -1)
        in_transit = {raw.decode() if isinstance(raw, bytes) else raw
                      for ids in pipe.execute() for raw in ids}
        now = time.monotonic()
        self._in_transit_since = {job_id: self._in_transit_since.get(job_id, now)
                                  for job_id in in_transit if job_id in self.queued}
        lost = []
        for job_id, since in list(self._in_transit_since.items()):
            if now - since < self.heartbeat_ttl:
                continue
            task, attempt, key = self.queued.pop(job_id)
            del self._in_transit_since[job_id]
            self.connection.lrem(key, 1, job_id)
            lost.append(self._lost(task, attempt, "the worker that took this attempt died before starting it"))
        return lost

    def _stranded_lean(self) -> list[Event]:
        """Attempts of this run in an in-flight list of a lean worker whose heartbeat lapsed.

        ``orch:lean-workers`` holds slot names (``{worker}#{n}``, one in-flight list each); a
        worker's slots are all inspected once its heartbeat is gone, and each empty one is
        forgotten."""
        slots = sorted(s.decode() if isinstance(s, bytes) else s
                       for s in self.connection.smembers(keys.LEAN_WORKERS))
        workers = sorted({keys.slot_worker(slot) for slot in slots})
        alive = dict(zip(workers, self._alive(workers)))
        dead = [slot for slot in slots if not alive[keys.slot_worker(slot)]]
        if not dead:
            return []
        pipe = self.connection.pipeline(transaction=False)
        for slot in dead:
            pipe.lrange(keys.inflight(slot), 0, -1)
        lost: list[Event] = []
        for slot, entries in zip(dead, pipe.execute()):
            worker, key = keys.slot_worker(slot), keys.inflight(slot)
            for raw in entries:
                try:
                    run_id, task, attempt = json.loads(raw)[:3]
                    attempt = int(attempt)
                except (ValueError, TypeError):
                    continue
                if run_id != self.run_id:
                    continue
                self.connection.lrem(key, 1, raw)
                self.running.pop(task, None)
                lost.append(self._lost(task, attempt, f"worker {worker} died holding this attempt"))
            if not entries:
                self._forget_if_empty(slot, key)
        return lost

    def _forget_if_empty(self, slot: str, key: str) -> None:
        """A dead lean worker's slot with nothing in flight leaves the set (atomically: it may still
        hold work)."""
        def forget(pipe: redis.client.Pipeline) -> None:
            if pipe.llen(key) == 0:
                pipe.multi()
                pipe.srem(keys.LEAN_WORKERS, slot)

        try:
            self.connection.transaction(forget, key)
        except redis.WatchError:
            pass

