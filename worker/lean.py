"""``orch worker --mode lean``: persistent work processes, no fork and no RQ job per task.

RQ's worker forks a work horse for every job and spends about sixty Redis
commands on each job's lifecycle; for short tasks that is most of the cost.
The lean worker keeps one forked *work process* per slot alive across tasks
and speaks to Redis itself, from the parent. While jobs are waiting, a slot
spends one round trip per task: one script reports the outcome of the task it
just ran (``XADD`` + ``LREM`` from its in-flight list), takes the next job
(``LMOVE`` from the queue into the in-flight list) and reports that one
started. When the queues are empty it blocks on ``BLMOVE`` and reports the
start separately.

The semantics are the RQ mode's: the same job function
(:func:`worker.rq_job.run_attempt_of`), the same outcomes on the same stream,
the same heartbeat key. Isolation and timeouts are kept: a work process that
runs past its attempt's timeout, or dies, is killed and replaced, and the
attempt is reported as a timeout or a crash. A stop request for a running
attempt (cancellation) kills its work process the same way.

Shutdown: the first SIGTERM/SIGINT stops taking jobs and lets the jobs in hand
finish; a second kills them and hands them back to their queue.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any, Optional

import redis

from shared import keys
from shared.config import Settings
from shared.connection import connect
from shared.jobs import parse_job_message, MalformedJob
from shared.messages import FAILED, STARTED, Outcome
from shared.workers import LEAN, WorkerInfo, beat, retire
from shared.states import FailureKind
from worker.execute import death_error, kill_group, timeout_error
from worker.rq_job import attempt_outcome

log = logging.getLogger("orch.worker")
BLOCK_SECONDS = 1.0
"""Longest wait for a job in one call, so shutdown requests are seen within a second."""


_FINISH_AND_TAKE = """
-- KEYS[1]: this worker's in-flight list; KEYS[2..]: queues, in the order to try.
-- ARGV: finished job ('' for none), its run's event stream, worker name, now,
-- event stream key prefix and suffix, then the finished job's outcome fields.
if ARGV[1] ~= '' then
  if #ARGV > 6 then
    redis.call('XADD', ARGV[2], '*', unpack(ARGV, 7))
  end
  redis.call('LREM', KEYS[1], 1, ARGV[1])
end
for i = 2, #KEYS do
  local job = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
  if job then
    local ok, decoded = pcall(cjson.decode, job)
    if ok and type(decoded) == 'table' and type(decoded[1]) == 'string' and type(decoded[2]) == 'string'
        and type(decoded[3]) == 'number' and decoded[3] >= 1 and decoded[3] < 1e9
        and decoded[3] == math.floor(decoded[3]) then
      redis.call('XADD', ARGV[5] .. decoded[1] .. ARGV[6], '*', 'run', decoded[1], 'task', decoded[2],
                 'attempt', string.format('%d', decoded[3]), 'status', 'started', 'at', ARGV[4],
                 'worker', ARGV[3])
    end
    return {KEYS[i], job}
  end
end
return false
"""


def _work_process(redis_url: str, jobs: Connection) -> None:
    """A work process's loop: run each job it is handed, send back its outcome."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    connection = connect(redis_url, check=False)
    while True:
        try:
            job = jobs.recv()
        except EOFError:
            return
        run_id, task, attempt, ref, payload, _timeout, max_result_bytes, worker = job
        outcome = attempt_outcome(connection, run_id, task, attempt, ref, payload, None, max_result_bytes, worker)
        jobs.send_bytes(pickle.dumps(outcome))


class _Slot:
    """One work process and the thread in the parent that feeds it."""

    def __init__(self, worker: "LeanWorker", number: int) -> None:
        self.worker = worker
        self.number = number
        self.process: Optional[multiprocessing.process.BaseProcess] = None
        self.conn: Optional[Connection] = None
        self.current: Optional[tuple[str, bytes]] = None  # (queue key, raw message) in hand
        self.thread = threading.Thread(target=self.loop, name=f"slot-{number}", daemon=True)
        self._stopped_attempt: Optional[tuple[str, str, int]] = None

    def spawn(self) -> None:
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_work_process, args=(self.worker.redis_url, child), daemon=True,
                                       name=f"orch-work-{self.number}")
        self.process.start()
        child.close()
        self.conn = parent

    def kill(self) -> None:
        if self.process is None:
            return
        kill_group(self.process.pid)
        self.process.kill()
        self.process.join()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def loop(self) -> None:
        w = self.worker
        done: Optional[tuple[bytes, Optional[Outcome]]] = None  # ran, not yet reported
        while not w.stopping.is_set():
            try:
                taken = w.finish_and_take(done)
                done = None
                reported = taken is not None
                if taken is None:
                    taken = w.take_job()
            except redis.RedisError as exc:
                log.warning("slot %s: Redis error (%s); retrying", self.number, exc)
                time.sleep(1.0)
                continue
            if taken is None:
                if w.burst:
                    break  # --burst: the queues are empty, this slot is done
                continue
            self.current = taken
            try:
                done = self.run(*taken, reported=reported)
            finally:
                self.current = None
        if done is not None:
            w.finish_and_take(done, take=False)
        self.kill()

    def run(self, queue_key: str, raw: bytes, reported: bool) -> tuple[bytes, Optional[Outcome]]:
        """Run one job; return it with its outcome (``None``: unreadable, dropped) for reporting."""
        w = self.worker
        try:
            job = parse_job_message(raw)
        except MalformedJob as exc:
            if exc.attempt_key is None:
                log.error("dropped an unreadable job from %s: %s", queue_key, exc)
                return raw, None
            run_id, task, attempt = exc.attempt_key
            log.error("job of task %r attempt %s in run %s is malformed: %s", task, attempt, run_id, exc)
            return raw, Outcome(run_id=run_id, task=task, attempt=attempt, status=FAILED, at=time.time(),
                                error=f"SerializationError: malformed job: {exc}", worker=w.name)
        run_id, task, attempt, ref, payload, timeout, max_result_bytes = job.args()
        started = time.time()
        if not reported:
            w.publish(Outcome(run_id=run_id, task=task, attempt=attempt, status=STARTED, at=started,
                              worker=w.name))
        if self.process is None or not self.process.is_alive():
            self.spawn()
        assert self.conn is not None and self.process is not None
        self.conn.send((run_id, task, attempt, ref, payload, timeout, max_result_bytes, w.name))
        w.running[(run_id, task, attempt)] = self
        try:
            return raw, self._await(run_id, task, attempt, timeout, started)
        finally:
            w.running.pop((run_id, task, attempt), None)

    def _await(self, run_id: str, task: str, attempt: int, timeout: Optional[float], started: float) -> Outcome:
        assert self.conn is not None and self.process is not None
        deadline = None if timeout is None else started + timeout
        common = dict(run_id=run_id, task=task, attempt=attempt, status=FAILED, worker=self.worker.name,
                      started_at=started)
        while True:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.time()))
            ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], wait)
            if self.conn in ready:
                try:
                    return pickle.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    pass
            if not self.process.is_alive() or (ready and self.conn not in ready):
                self.process.join(timeout=1.0)
                code = self.process.exitcode
                self.kill()
                if self._stopped_attempt == (run_id, task, attempt):
                    return Outcome(at=time.time(), error="Cancelled: attempt stopped on request",
                                   kind=FailureKind.CANCELLED, **common)
                return Outcome(at=time.time(), error=death_error(code),
                               kind=FailureKind.CRASHED, **common)
            if deadline is not None and time.time() >= deadline:
                self.kill()
                return Outcome(at=time.time(), error=timeout_error(timeout), kind=FailureKind.TIMEOUT, **common)

    def stop_attempt(self, key: tuple[str, str, int]) -> None:
        self._stopped_attempt = key
        if self.process is not None:
            kill_group(self.process.pid)


class LeanWorker:
    """``concurrency`` slots serving the lean queues of ``queues``."""

    def __init__(self, redis_url: str, queues: list[str], concurrency: int = 1, name: Optional[str] = None,
                 settings: Optional[Settings] = None, burst: bool = False) -> None:
        self.redis_url = redis_url
        self.burst = burst
        self.connection = connect(redis_url)
        self.queue_keys = [keys.lean_queue(q) for q in queues]
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.settings = settings or Settings()
        self.inflight_key = keys.inflight(self.name)
        self.stopping = threading.Event()
        self.running: dict[tuple[str, str, int], _Slot] = {}
        self.slots = [_Slot(self, n) for n in range(concurrency)]
        self._next_queue = 0
        self._finish_and_take = self.connection.register_script(_FINISH_AND_TAKE)
        self.info = WorkerInfo(self.name, LEAN, tuple(queues), concurrency)

    def take_job(self) -> Optional[tuple[str, bytes]]:
        """Move one job from a queue to this worker's in-flight list, waiting up to a second."""
        keys_in_turn = self._queues_in_turn()
        for key in keys_in_turn[:-1]:
            raw = self.connection.lmove(key, self.inflight_key, "LEFT", "RIGHT")
            if raw is not None:
                return key, raw
        raw = self.connection.blmove(keys_in_turn[-1], self.inflight_key, BLOCK_SECONDS, "LEFT", "RIGHT")
        return None if raw is None else (keys_in_turn[-1], raw)

    def publish(self, outcome: Outcome) -> None:
        self.connection.xadd(keys.events(outcome.run_id), outcome.to_fields())

    def finish_and_take(self, done: Optional[tuple[bytes, Optional[Outcome]]],
                        take: bool = True) -> Optional[tuple[str, bytes]]:
        """One round trip: report ``done`` (a job and its outcome) and take the next waiting job,
        reported started, if there is one (a job taken blocking is reported by the caller)."""
        if done is None and not take:
            return None
        raw, outcome = done if done is not None else (b"", None)
        fields = outcome.to_fields() if outcome is not None else {}
        events_key = keys.events(outcome.run_id) if outcome is not None else ""
        queue_keys = self._queues_in_turn() if take else []
        prefix, suffix = keys.events("\0").split("\0")
        reply = self._finish_and_take(
            keys=[self.inflight_key, *queue_keys],
            args=[raw, events_key, self.name, repr(time.time()), prefix, suffix,
                  *[item for pair in fields.items() for item in pair]])
        if not reply:
            return None
        key, job = reply
        return (key.decode() if isinstance(key, bytes) else key), job

    def _queues_in_turn(self) -> list[str]:
        turn = self.queue_keys[self._next_queue:] + self.queue_keys[:self._next_queue]
        self._next_queue = (self._next_queue + 1) % len(self.queue_keys)
        return turn

    def _beat(self) -> None:
        pipe = self.connection.pipeline(transaction=False)
        beat(pipe, self.info, self.settings.heartbeat_ttl)
        pipe.execute()

    def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stopping.wait(1.0)

    def _listen_for_stops(self) -> None:
        pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.STOP_CHANNEL)
        while not self.stopping.is_set():
            try:
                message = pubsub.get_message(timeout=1.0)
            except redis.RedisError:
                time.sleep(1.0)
                continue
            if not message:
                continue
            try:
                run_id, task, attempt = json.loads(message["data"])
                key = (run_id, task, int(attempt))
            except (ValueError, TypeError):
                continue
            slot = self.running.get(key)
            if slot is not None:
                slot.stop_attempt(key)

    def _hand_back(self) -> None:
        """Put the jobs still in hand back at the front of their queues (second signal)."""
        for slot in self.slots:
            taken = slot.current
            if taken is not None:
                queue_key, raw = taken
                pipe = self.connection.pipeline(transaction=True)
                pipe.lrem(self.inflight_key, 1, raw)
                pipe.lpush(queue_key, raw)
                pipe.execute()
            slot.kill()

    def work(self) -> None:
        """Serve until SIGTERM/SIGINT (first: finish jobs in hand; second: hand them back and exit)."""
        signals = {"count": 0}

        def on_signal(signum: int, frame: Any) -> None:
            signals["count"] += 1
            self.stopping.set()
            if signals["count"] == 1:
                log.info("warm shut down: finishing the jobs in hand (signal again to stop at once)")
            else:
                log.info("cold shut down: handing the jobs in hand back to their queues")
                self._hand_back()
                os._exit(1)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._beat()
        self.connection.sadd(keys.LEAN_WORKERS, self.name)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._listen_for_stops, name="stops", daemon=True).start()
        for slot in self.slots:
            slot.spawn()
            slot.thread.start()
        while any(slot.thread.is_alive() for slot in self.slots):
            for slot in self.slots:
                slot.thread.join(timeout=0.5)
        pipe = self.connection.pipeline(transaction=True)
        retire(pipe, self.name)
        pipe.delete(self.inflight_key)
        pipe.srem(keys.LEAN_WORKERS, self.name)
        pipe.execute()
