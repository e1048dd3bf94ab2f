"""``orch worker`` (the default, lean mode): persistent work processes that take and report their own jobs.

RQ's worker forks a work horse for every job and spends about sixty Redis
commands on each job's lifecycle; for short tasks that is most of the cost.
The lean worker keeps one forked *work process* per slot alive across tasks.
Each has its own Redis connection and its own in-flight list and runs the loop
of :mod:`worker.work_process`: while jobs are waiting, one round trip per task
reports the attempt it ran and takes the next one. Nothing is relayed through
this process.

This module is the parent, which only supervises:

- it registers the worker (heartbeat descriptor, ``orch:workers``, its slots in
  ``orch:lean-workers``) and beats every second (its work processes take jobs
  only while that heartbeat stands);
- it listens for stop requests (cancellation) and kills the work process that
  holds the attempt named, which is reported ``Cancelled``;
- it kills a work process whose attempt runs past its timeout (``TaskTimeout``);
- it notices a work process's death at once (its sentinel), and reports what
  was in its hands, or puts it back on its queue, then starts a new one;
- it reports the start of an attempt taken while the worker was idle once it
  has run for ``START_REPORT_DELAY`` (a shorter one's start goes with its
  outcome: one wake-up of the coordinator per task instead of two).

It learns what each work process holds, and since when, from the slot's shared
record (:mod:`worker.slot_record`), which the work process writes without ever
waiting on the parent; after a death, the slot's in-flight list is the truth.
What the parent writes, it writes through :mod:`worker.settle`, in scripts that
first check the entry is still in the list, so an attempt the work process
reported itself is never reported twice.

The semantics are the RQ mode's: the same attempt function
(:func:`worker.rq_job.attempt_outcome`), the same outcomes on the same stream,
the same heartbeat key. Shutdown: the first SIGTERM/SIGINT lets the work
processes finish the job in hand and take no new one; the second kills them
and hands their jobs back to the front of their queues.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Optional

import redis

from shared import keys
from shared.config import Settings, heartbeat_socket_timeout
from shared.connection import connect
from shared.states import FailureKind
from shared.workers import LEAN, WorkerInfo, beat, retire
from worker.execute import death_error, kill_group
from worker.settle import COLD, START_REPORT_DELAY, Death, Reason, Settler
from worker.slot_record import ParentWords, SlotRecord, State, attempt_id
from worker.work_process import BLOCK_SECONDS, SlotConfig, serve

__all__ = ["LeanWorker", "BLOCK_SECONDS"]

log = logging.getLogger("orch.worker")

POLL_SECONDS = 0.1
"""Longest the parent sleeps between two looks at its slots' records (timeouts, start reports)."""
RETRY_SECONDS = 1.0
"""Pause before the parent writes for a slot again after a Redis error."""
TAKING_WAIT_SECONDS = 1.0
"""Longest a cold shutdown waits for a work process to get the reply of a take in progress."""

_FORGET_EMPTY = """
-- KEYS[1]: orch:lean-workers; KEYS[2..]: in-flight lists; ARGV: their slot names, in order.
-- A slot whose list is empty leaves the set (one that still holds work stays, for the LossWatch).
for i = 2, #KEYS do
  if redis.call('LLEN', KEYS[i]) == 0 then
    redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return 1
"""


class _Slot:
    """One work process, its shared record and its in-flight list, as the parent sees them."""

    def __init__(self, worker: "LeanWorker", number: int) -> None:
        self.worker = worker
        self.number = number
        self.name = keys.lean_slot(worker.name, number)
        self.inflight = keys.inflight(self.name)
        self.record = SlotRecord()
        self.process: Optional[multiprocessing.process.BaseProcess] = None
        self.death: Optional[Death] = None
        self.retry_at = 0.0
        """When the parent may write for this slot again (after a Redis error)."""
        self._reason: Optional[Reason] = None
        self._lock = threading.Lock()

    def spawn(self) -> None:
        """Fork a new work process (from the main thread: it dies with the thread that forked it)."""
        w = self.worker
        self.record.set(State.IDLE)
        self.record.claim(0)
        config = SlotConfig(w.redis_url, w.name, self.number, tuple(w.queue_keys), w.burst, os.getpid(),
                            w.settings.heartbeat_ttl)
        process = multiprocessing.get_context("fork").Process(
            target=serve, args=(config, self.record, w.parent), daemon=True, name=f"orch-work-{self.number}")
        process.start()
        self.process = process

    def kill(self, reason: Optional[Reason] = None) -> None:
        """SIGKILL the work process and everything its task started (any thread may call this)."""
        with self._lock:
            if self.process is None:
                return
            if self._reason is None:
                self._reason = reason
            kill_group(self.process.pid)
            self.process.kill()

    def stop_if_holding(self, attempt: int, kind: FailureKind) -> None:
        snapshot = self.record.read()
        if snapshot is not None and snapshot.holds(attempt):
            self.kill(Reason(kind, attempt))

    def reap(self) -> None:
        """Collect a dead work process: what it held is settled next (:attr:`death`)."""
        with self._lock:
            process, self.process = self.process, None
            reason, self._reason = self._reason, None
        if process is None:
            return
        process.join()
        kill_group(process.pid)  # whatever its task started and left behind
        self.death = Death(process.exitcode, reason, self.record.read(), self.record.claimed())


class LeanWorker:
    """``concurrency`` work processes serving the lean queues of ``queues``, supervised."""

    def __init__(self, redis_url: str, queues: list[str], concurrency: int = 1, name: Optional[str] = None,
                 settings: Optional[Settings] = None, burst: bool = False) -> None:
        self.redis_url = redis_url
        self.burst = burst
        self.connection = connect(redis_url)
        self.queue_keys = [keys.lean_queue(q) for q in queues]
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.settings = settings or Settings()
        self.beat_connection = connect(redis_url, check=False,
                                       socket_timeout=heartbeat_socket_timeout(self.settings.heartbeat_ttl))
        """The heartbeat's own connection, with a short timeout (see :func:`heartbeat_socket_timeout`)."""
        self.parent = ParentWords()
        """Shared with the work processes: ``halt`` on the first signal, the last heartbeat's time."""
        self.finished = threading.Event()
        self.slots = [_Slot(self, n) for n in range(concurrency)]
        self.info = WorkerInfo(self.name, LEAN, tuple(queues), concurrency)
        self._signals = 0
        self.settler = Settler(self.connection, self.queue_keys, self.name)
        self._forget_empty = self.connection.register_script(_FORGET_EMPTY)

    # ------------------------------------------------------------------ registry
    def _beat(self) -> None:
        """The heartbeat, and this worker's slots in ``orch:lean-workers`` (re-added each time, like
        ``orch:workers``: a coordinator that thought the worker dead may have forgotten them)."""
        pipe = self.beat_connection.pipeline(transaction=False)
        beat(pipe, self.info, self.settings.heartbeat_ttl)
        pipe.sadd(keys.LEAN_WORKERS, *(slot.name for slot in self.slots))
        sent = time.monotonic()
        pipe.execute()
        self.parent.beat_at = sent  # the key stands until at least sent + TTL

    def _heartbeat(self) -> None:
        while not self.finished.wait(1.0):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _retire(self, cold: bool) -> None:
        """Leave the registry; a slot whose in-flight list still holds work stays for the LossWatch.

        After a cold shutdown the heartbeat is left to lapse: the attempts handed back were reported
        started here, and the coordinator follows each to whichever worker takes it next; until then
        (at most a heartbeat TTL) this worker's heartbeat stands for them."""
        pipe = self.connection.pipeline(transaction=True)
        if not cold:
            retire(pipe, self.name)
        self._forget_empty(keys=[keys.LEAN_WORKERS, *(slot.inflight for slot in self.slots)],
                           args=[slot.name for slot in self.slots], client=pipe)
        pipe.execute()

    # ----------------------------------------------------------------- stop requests
    def _listen_for_stops(self) -> None:
        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.STOP_CHANNEL)
        while not self.finished.is_set():
            try:
                message = pubsub.get_message(timeout=1.0)
            except redis.RedisError:
                time.sleep(1.0)
                continue
            if not message:
                continue
            try:
                run_id, task, attempt = json.loads(message["data"])
                target = attempt_id(run_id, task, int(attempt))
            except (ValueError, TypeError):
                continue
            for slot in self.slots:
                slot.stop_if_holding(target, FailureKind.CANCELLED)

    # ------------------------------------------------------------------ supervision
    def _supervise(self) -> bool:
        """Until every slot is done: reap deaths, settle them, respawn, time attempts out. Returns
        ``True`` after a cold shutdown (a second signal)."""
        while True:
            if self._signals >= 2:
                self._cold_shutdown()
                return True
            live = [slot for slot in self.slots if slot.process is not None]
            if not live and not any(slot.death for slot in self.slots):
                return False
            wait = self._watch_records()
            ready = multiprocessing.connection.wait([p.sentinel for p in (slot.process for slot in live) if p], wait)
            for slot in live:
                if slot.process is not None and slot.process.sentinel in ready:
                    slot.reap()
            for slot in self.slots:
                if slot.death is not None and time.monotonic() >= slot.retry_at:
                    self._settle_and_respawn(slot)

    def _watch_records(self) -> float:
        """Kill the work processes whose attempt ran past its timeout, report the starts of attempts
        running longer than :data:`START_REPORT_DELAY` unreported; return how long the supervisor
        may sleep before the next of these is due."""
        now, wall = time.monotonic(), time.time()
        wait = POLL_SECONDS
        for slot in self.slots:
            snapshot = slot.record.read() if slot.process is not None else None
            if snapshot is None or snapshot.state is not State.RUNNING:
                continue
            if snapshot.deadline <= now:
                slot.kill(Reason(FailureKind.TIMEOUT, snapshot.attempt))
                continue
            wait = min(wait, snapshot.deadline - now)
            if not snapshot.unreported or slot.record.claimed() == snapshot.attempt or now < slot.retry_at:
                continue
            due = snapshot.started + START_REPORT_DELAY
            if due > wall:
                wait = min(wait, due - wall)
                continue
            try:
                self.settler.report_start(slot.inflight, snapshot)
                slot.record.claim(snapshot.attempt)
            except redis.RedisError as exc:
                log.warning("%s: cannot report a start (%s); retrying", slot.name, exc)
                slot.retry_at = now + RETRY_SECONDS
        return max(0.0, wait)

    def _settle_and_respawn(self, slot: _Slot) -> None:
        death = slot.death
        assert death is not None
        try:
            self.settler.settle(slot.inflight, death)
        except redis.RedisError as exc:
            log.warning("%s: cannot settle its in-flight list yet (%s); retrying", slot.name, exc)
            slot.retry_at = time.monotonic() + RETRY_SECONDS
            return
        slot.death = None
        done = death.snapshot is not None and death.snapshot.state is State.DONE
        if not (self.parent.halt or done):
            if death.reason is None:
                log.warning("%s: work process died (%s); starting another", slot.name, death_error(death.exitcode))
            slot.spawn()

    def _cold_shutdown(self) -> None:
        """Kill every work process and hand the jobs in hand back to the front of their queues."""
        self.parent.halt = True
        deadline = time.monotonic() + TAKING_WAIT_SECONDS
        for slot in self.slots:
            while slot.process is not None and time.monotonic() < deadline:
                snapshot = slot.record.read()
                if snapshot is None or snapshot.state is not State.TAKING:
                    break
                time.sleep(0.001)  # a take in flight: once its reply is in, the job's queue is known
            slot.kill(COLD)
            slot.reap()
        for slot in self.slots:
            if slot.death is not None:
                try:
                    self.settler.settle(slot.inflight, slot.death)
                except redis.RedisError as exc:
                    log.error("%s: could not hand its job back (%s); the coordinator will fail it as lost",
                              slot.name, exc)

    # ------------------------------------------------------------------------ main
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self.parent.halt = True
        if self._signals == 1:
            log.info("warm shut down: finishing the jobs in hand (signal again to stop at once)")
        else:
            log.info("cold shut down: handing the jobs in hand back to their queues")

    def work(self) -> None:
        """Serve until SIGTERM/SIGINT (first: finish jobs in hand; second: hand them back and exit
        with status 1) or, with ``burst``, until the queues are empty."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._beat()  # registered before any work process can take a job into its list
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        threading.Thread(target=self._listen_for_stops, name="stops", daemon=True).start()
        try:
            for slot in self.slots:
                slot.spawn()
            cold = self._supervise()
        finally:
            self.finished.set()
            heartbeat.join()  # no beat may land after the retirement
        try:
            self._retire(cold)
        except redis.RedisError as exc:
            log.warning("could not leave the registry (%s): the heartbeat will lapse", exc)
        if cold:
            raise SystemExit(1)
