"""The loop of one lean work process: take a job, run it, report it, with its own Redis connection.

While jobs are waiting, a work process spends one round trip per task: one
script reports the attempt it just ran (its start and outcome, ``XADD`` on the
run's stream, ``LREM`` from its slot's in-flight list) and moves the next job
from a queue into that list (``LMOVE``). When the queues are empty it waits on
``BLMOVE`` (at most :data:`BLOCK_SECONDS`, so a shutdown is seen). A job's
start is reported with its outcome, in the same stream entry, unless the parent reported
it first (it does for an attempt still running after ``START_REPORT_DELAY``): a
short task costs the coordinator one wake-up, not two, and the moment many
tasks end together (a wave of equal tasks) carries only their outcomes.

Before it decodes a job any further than its run, task and attempt, a work process refuses an
entry longer than any honest one (``ORCH_MAX_PAYLOAD_BYTES``) and, with a signing key, one whose
signature is missing or wrong (:func:`shared.jobs.parse_job_message`); it signs every report it
makes.

Nothing goes through the parent: the work process only keeps its
:class:`~worker.slot_record.SlotRecord` current, from which the parent times
attempts out, finds the attempt a stop request names and learns, after a
death, what the work process held. It reads two words its parent writes
(:class:`~worker.slot_record.ParentWords`): a shutdown, and when the parent's
heartbeat last reached Redis. It takes jobs only while that heartbeat stands
(a stopped or cut-off parent means the coordinator will count the worker lost),
and dies with its parent (``PR_SET_PDEATHSIG``). Each slot has an in-flight list of its own
(``orch:inflight:{worker}#{n}``), so a work process that dies right after a
take strands that job only in a list its parent, or the coordinator's
``LossWatch``, inspects.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import redis

from shared import keys
from shared.config import max_job_entry_bytes
from shared.connection import connect
from shared.jobs import JobRefused, MalformedJob, parse_job_message
from shared.messages import FAILED, STARTED, Outcome
from worker import task_log
from shared.signing import configured_signer
from worker.rq_job import attempt_outcome
from worker.slot_record import ParentWords, SlotRecord, State, attempt_id
from worker.wire import Wire

log = logging.getLogger("orch.worker")

BLOCK_SECONDS = 1.0
"""Longest wait for a job in one call, so shutdown requests are seen within a second."""
REDIS_RETRY_SECONDS = 1.0
"""Pause after a Redis error before the loop tries again."""
MIN_BLOCK_SECONDS = 0.01
"""The shortest wait a blocking take asks for (Redis counts its timeouts in hundredths)."""
REPLY_TIMEOUT_SECONDS = BLOCK_SECONDS + 9.0
"""Longest wait for Redis's reply on the loop's connection (a blocking take waits at most
:data:`BLOCK_SECONDS` there): a connection that went silent without closing (a network that dropped
it) is given up after this, not after the operating system's minutes, and the loop's recovery from
its in-flight list takes over."""
HEARTBEAT_MARGIN_SECONDS = 0.5
"""How long before the parent's heartbeat lapses a work process stops taking jobs (a quarter of the TTL
at the most)."""
PARENT_WAIT_SECONDS = 0.1
"""Pause between two looks at the parent's heartbeat while it does not stand."""

FINISH_AND_TAKE = """
-- KEYS[1]: this slot's in-flight list; KEYS[2..]: queues, in the order to try.
-- ARGV: finished job ('' for none), its run's event stream, then its outcome's fields (none: an
-- unreadable entry, dropped unreported). Reports go only to a stream that exists (NOMKSTREAM):
-- the coordinator opens it with the run.
if ARGV[1] ~= '' then
  if #ARGV > 2 then
    redis.call('XADD', ARGV[2], 'NOMKSTREAM', '*', unpack(ARGV, 3))
  end
  redis.call('LREM', KEYS[1], 1, ARGV[1])
end
for i = 2, #KEYS do
  local job = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
  if job then
    return {i - 2, job}
  end
end
return false
"""

Done = tuple[bytes, Optional[Outcome], Optional[Outcome]]
"""A job that ran, its outcome (``None``: an unreadable entry, dropped without a report) and its
start report if that is still to be made."""


@dataclass(frozen=True)
class SlotConfig:
    """What a work process needs to know, fixed when its parent forks it."""

    redis_url: str
    worker: str
    number: int
    queue_keys: tuple[str, ...]
    burst: bool
    parent_pid: int
    heartbeat_ttl: float

    @property
    def slot(self) -> str:
        return keys.lean_slot(self.worker, self.number)


def serve(config: SlotConfig, record: SlotRecord, parent: ParentWords) -> None:
    """The body of a forked work process: take, run and report jobs until ``parent.halt`` is set
    (a warm shutdown: the job in hand is finished and reported first) or, with ``burst``, until
    the queues are empty; take none while the parent's heartbeat does not stand. Returns (exit
    code 0) after writing :attr:`State.DONE`."""
    _detach(config.parent_pid)
    task_log.install()  # once: each attempt then only switches its log capture on and off
    _Loop(config, record, parent).run()


def _detach(parent_pid: int) -> None:
    """A process group of its own (a timeout or a cancel kills the task's children too), no
    reaction to the terminal's Ctrl-C (the parent decides), and death with the parent."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a SIGKILLed parent takes its work processes along
    except (OSError, AttributeError):
        pass  # not Linux: the loop checks its parent between jobs instead
    if os.getppid() != parent_pid:
        os._exit(0)


def _flat(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


class _Loop:
    def __init__(self, config: SlotConfig, record: SlotRecord, parent: ParentWords) -> None:
        self.config = config
        self.record = record
        self.parent = parent
        # The loop's own commands go on a bare connection that never re-sends a command behind its
        # back (a take re-sent after a lost reply would leave the first job in the in-flight list
        # unseen); tasks reading upstream results use a client that may.
        self.task_connection = connect(config.redis_url, check=False)
        self.wire = Wire(self.task_connection, REPLY_TIMEOUT_SECONDS)
        self.inflight = keys.inflight(config.slot)
        self._finish_and_take = self.wire.script(FINISH_AND_TAKE)
        self._next_queue = config.number % len(config.queue_keys)  # slots start on different queues
        self._unsure = False
        self._adopted: list[tuple[int, bytes]] = []
        self.signer = configured_signer()
        self.max_entry = max_job_entry_bytes()

    def _stopping(self) -> bool:
        return self.parent.halt or os.getppid() != self.config.parent_pid

    def _heartbeat_left(self) -> float:
        """Seconds the parent's last heartbeat still stands for, less a margin (jobs are taken only while
        > 0): a blocking take asked for just before the heartbeat lapses must not outlive it though this
        process is descheduled between the asking and the sending (a loaded machine)."""
        ttl = self.config.heartbeat_ttl
        left = self.parent.beat_at + ttl - min(HEARTBEAT_MARGIN_SECONDS, ttl / 4) - time.monotonic()
        return left if left >= MIN_BLOCK_SECONDS else 0.0

    def run(self) -> None:
        done: Optional[Done] = None
        while not self._stopping():
            try:
                if self._unsure:
                    done = self._recover(done)
                if not self._heartbeat_left():
                    self.finish_and_take(done, take=False)
                    done = None
                    self.record.set(State.IDLE)
                    time.sleep(PARENT_WAIT_SECONDS)
                    continue
                taken = self._next(done)
            except redis.RedisError as exc:
                log.warning("%s: Redis error (%s); retrying", self.config.slot, exc)
                self._unsure = True
                self.record.set(State.IDLE)
                time.sleep(REDIS_RETRY_SECONDS)
                continue
            done = None
            if taken is None:
                if self.config.burst and self._heartbeat_left():
                    break  # --burst: the queues are empty, this slot is done
                continue
            done = self.run_job(*taken)
        if done is not None:
            try:
                self.finish_and_take(done, take=False)
            except redis.RedisError as exc:  # the parent reports it from the in-flight list
                log.warning("%s: could not report the last attempt (%s)", self.config.slot, exc)
                return
        self.record.set(State.DONE)

    def _next(self, done: Optional[Done]) -> Optional[tuple[int, bytes]]:
        """Report ``done`` and take the next job: its queue number and entry, or ``None``."""
        if self._adopted:
            self.finish_and_take(done, take=False)
            return self._adopted.pop(0)
        taken = self.finish_and_take(done, take=True)
        if taken is not None:
            return taken
        return self.take_blocking()

    def _recover(self, done: Optional[Done]) -> Optional[Done]:
        """After a Redis error it is unknown whether the failed call reported ``done`` or took a
        job: the in-flight list says. Entries other than ``done`` are jobs taken whose reply was
        lost; they are run next (queue unknown: -1). Returns ``done`` if it is still to report."""
        entries = self.wire.call("LRANGE", self.inflight, 0, -1)
        if done is not None and done[0] not in entries:
            done = None  # the script that reported it ran
        self._adopted = [(-1, raw) for raw in entries if done is None or raw != done[0]]
        self._unsure = False
        return done

    def _queues_in_turn(self) -> list[int]:
        """Queue numbers in the order to try: round robin, one step per call."""
        n = len(self.config.queue_keys)
        first = self._next_queue
        self._next_queue = (first + 1) % n
        return [(first + i) % n for i in range(n)]

    def finish_and_take(self, done: Optional[Done], take: bool) -> Optional[tuple[int, bytes]]:
        """One round trip: report ``done`` (its start with it, unless the parent reported that) and, if
        ``take``, move the next waiting job into this slot's in-flight list.
        Returns (queue number, entry) or ``None``."""
        if done is None and not take:
            return None
        raw, outcome, start = done if done is not None else (b"", None, None)
        if (outcome is not None and start is not None
                and self.record.claimed() != attempt_id(start.run_id, start.task, start.attempt)):
            outcome = replace(outcome, with_start=True, started_at=start.at)  # else the parent reported it
        order = self._queues_in_turn() if take else []
        self.record.set(State.TAKING)
        reply = self._finish_and_take(
            keys=[self.inflight, *(self.config.queue_keys[i] for i in order)],
            args=[raw, keys.events(outcome.run_id) if outcome is not None else "",
                  *(_flat(outcome.to_fields(self.signer)) if outcome is not None else [])])
        if not reply:
            return None
        position, job = reply
        return order[int(position)], job

    def take_blocking(self) -> Optional[tuple[int, bytes]]:
        """Wait up to :data:`BLOCK_SECONDS`, and no longer than the parent's heartbeat stands, for a
        job on the next queue in turn (its start is not reported here: it goes with its outcome,
        see :meth:`run_job`)."""
        # never past the parent's heartbeat: a job taken after it lapsed would be counted lost
        wait = min(BLOCK_SECONDS, self._heartbeat_left())
        if not wait:
            return None
        number = self._queues_in_turn()[-1]
        self.record.set(State.BLOCKING, queue=number)
        raw = self.wire.call("BLMOVE", self.config.queue_keys[number], self.inflight, "LEFT", "RIGHT",
                             round(wait, 2))
        if raw is None:
            self.record.set(State.IDLE)
            return None
        return number, raw

    def _queue_name(self, number: int) -> str:
        return self.config.queue_keys[number] if number >= 0 else "an unknown queue"

    def run_job(self, queue: int, raw: bytes) -> Done:
        """Run one job taken from queue number ``queue``; return it with its outcome for reporting,
        and its start (the parent reports that one instead if the attempt runs longer than
        ``worker.settle.START_REPORT_DELAY``: the record says it is unreported)."""
        worker = self.config.worker
        try:
            job = parse_job_message(raw, self.signer, self.max_entry)
        except MalformedJob as exc:
            if exc.attempt_key is None:
                log.error("dropped an unreadable job from %s: %s", self._queue_name(queue), exc)
                return raw, None, None
            run_id, task, attempt = exc.attempt_key
            log.error("job of task %.80r attempt %s in run %.80r refused: %s", task, attempt, run_id, exc)
            error = (f"TaskRefused: {exc}" if isinstance(exc, JobRefused)
                     else f"SerializationError: malformed job: {exc}")
            return raw, Outcome(run_id=run_id, task=task, attempt=attempt, status=FAILED, at=time.time(),
                                error=error, worker=worker), None
        started = time.time()
        deadline = float("inf") if job.timeout is None else time.monotonic() + job.timeout
        self.record.set(State.RUNNING, queue=queue, attempt=attempt_id(job.run_id, job.task, job.attempt),
                        started=started, deadline=deadline, timeout=job.timeout or 0.0, unreported=True)
        start = Outcome(run_id=job.run_id, task=job.task, attempt=job.attempt, status=STARTED, at=started,
                        worker=worker)
        outcome = attempt_outcome(self.task_connection, job.run_id, job.task, job.attempt, job.ref, job.payload,
                                  None, job.max_result_bytes, worker, kill_at=deadline if job.timeout else None)
        return raw, outcome, start
