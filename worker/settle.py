"""What the lean worker's parent writes for its work processes: the entries a dead one left in its
in-flight list, and the start of an attempt a live one runs longer than a moment.

A work process reports its own attempts; its parent writes only what a work
process cannot. Each write first checks, in the same script, that the entry is
still in the slot's in-flight list, which the work process's own report removes
atomically with the report: so the parent never reports an attempt the work
process reported (and never reports a start after the attempt's end).

:func:`verdict` decides, from the slot's last record and why the parent killed
the work process (if it did), what each entry left behind becomes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import redis

from shared import keys
from shared.config import max_job_entry_bytes
from shared.jobs import JobRefused, MalformedJob, parse_job_message
from shared.messages import FAILED, STARTED, Outcome
from shared.signing import configured_signer
from shared.states import FailureKind
from worker.execute import death_error, timeout_error
from worker.slot_record import Snapshot, State, attempt_id

log = logging.getLogger("orch.worker")

START_REPORT_DELAY = 0.05
"""Seconds an attempt taken while the worker was idle may run before the parent reports its start
(a shorter one has its start reported with its outcome, by the work process)."""

_SETTLE = """
-- KEYS[1]: a slot's in-flight list; KEYS[2]: a run's event stream, or a queue.
-- ARGV[1]: an entry of the list; ARGV[2]: the mode:
--   'report': ARGV[3] = n, then n start fields (n = 0: no start to report), then the outcome's fields;
--   'start': ARGV[3..]: start fields, added only while the entry is in the list (which it keeps);
--   'requeue': the entry goes back to the front of the queue; 'drop': it is removed.
if ARGV[2] == 'start' then
  if redis.call('LPOS', KEYS[1], ARGV[1]) then
    redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 3))
    return 1
  end
  return 0
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
if ARGV[2] == 'report' then
  local n = tonumber(ARGV[3])
  if n > 0 then
    redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 4, 3 + n))
  end
  redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', unpack(ARGV, 4 + n))
elseif ARGV[2] == 'requeue' then
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class Reason:
    """Why the parent killed a work process: ``kind`` is TIMEOUT or CANCELLED for the attempt
    numbered ``attempt`` (:func:`~worker.slot_record.attempt_id`), or ``None`` for a cold shutdown."""

    kind: Optional[FailureKind]
    attempt: int = 0


COLD = Reason(None)


@dataclass(frozen=True)
class Death:
    """A work process that died: its exit code, why the parent killed it (``None``: it died by
    itself), its record as it left it (``None``: torn) and the attempt whose start the parent had
    reported (:meth:`~worker.slot_record.SlotRecord.claimed`)."""

    exitcode: Optional[int]
    reason: Optional[Reason]
    snapshot: Optional[Snapshot]
    claimed: int = 0


@dataclass(frozen=True)
class Verdict:
    """What becomes of one entry: ``action`` is ``"report"`` (``outcome``, after ``start`` if its
    start was never reported), ``"requeue"`` (to queue number ``queue``) or ``"drop"`` (``message``)."""

    action: str
    outcome: Optional[Outcome] = None
    start: Optional[Outcome] = None
    queue: int = 0
    message: str = ""


def verdict(raw: bytes, death: Death, queues: int, worker: str) -> Verdict:
    """What an entry left in a dead work process's in-flight list becomes.

    The attempt the record shows in hand fails as the parent's reason says (a timeout, a stop
    request; else a crash), or goes back to its queue in a cold shutdown. An entry taken and not
    shown in hand yet never ran: it goes back to its queue if that is known (a blocking take names
    its queue; a worker with one queue knows it), else it fails as a crash. An unreadable entry, and
    with signing on one whose signature is missing or wrong, is dropped.
    """
    try:
        job = parse_job_message(raw, configured_signer(), max_job_entry_bytes())
        run_id, task, attempt = job.run_id, job.task, job.attempt
    except MalformedJob as exc:
        if isinstance(exc, JobRefused):
            return Verdict("drop", message=f"dropped a refused job from a dead work process: {exc}")
        if exc.attempt_key is None:
            return Verdict("drop", message=f"dropped an unreadable job from a dead work process: {exc}")
        run_id, task, attempt = exc.attempt_key
    number = attempt_id(run_id, task, attempt)
    snapshot, reason = death.snapshot, death.reason
    held = snapshot if snapshot is not None and snapshot.holds(number) else None
    queue = _known_queue(snapshot, held is not None, queues)
    if queue is not None and (reason is COLD or held is None):
        return Verdict("requeue", queue=queue)
    common: dict[str, Any] = dict(run_id=run_id, task=task, attempt=attempt, worker=worker)
    start = None
    if held is not None and held.unreported and death.claimed != number:
        start = Outcome(status=STARTED, at=held.started, **common)
    failed: dict[str, Any] = dict(common, status=FAILED, at=time.time(), started_at=held.started if held else None)
    if held is not None and reason is not None and reason.kind is not None and reason.attempt == number:
        if reason.kind is FailureKind.TIMEOUT:
            outcome = Outcome(error=timeout_error(held.timeout), kind=FailureKind.TIMEOUT, **failed)
        else:
            outcome = Outcome(error="Cancelled: attempt stopped on request", kind=FailureKind.CANCELLED, **failed)
    else:
        outcome = Outcome(error=death_error(death.exitcode), kind=FailureKind.CRASHED, **failed)
    return Verdict("report", outcome=outcome, start=start)


def _known_queue(snapshot: Optional[Snapshot], in_hand: bool, queues: int) -> Optional[int]:
    if snapshot is not None and (in_hand or snapshot.state is State.BLOCKING) and 0 <= snapshot.queue < queues:
        return snapshot.queue
    return 0 if queues == 1 else None


def _flat(outcome: Outcome) -> list:
    return [item for pair in outcome.to_fields(configured_signer()).items() for item in pair]


class Settler:
    """The parent's writes for its slots, each one script (one round trip) per entry."""

    def __init__(self, connection: redis.Redis, queue_keys: list[str], worker: str) -> None:
        self.connection = connection
        self.queue_keys = queue_keys
        self.worker = worker
        self._script = connection.register_script(_SETTLE)

    def settle(self, inflight: str, death: Death) -> None:
        """Report, requeue or drop each entry a dead work process left in list ``inflight``."""
        for raw in self.connection.lrange(inflight, 0, -1):
            judged = verdict(raw, death, len(self.queue_keys), self.worker)
            if judged.action == "report":
                assert judged.outcome is not None
                start = _flat(judged.start) if judged.start is not None else []
                self._script(keys=[inflight, keys.events(judged.outcome.run_id)],
                             args=[raw, "report", len(start), *start, *_flat(judged.outcome)])
            elif judged.action == "requeue":
                self._script(keys=[inflight, self.queue_keys[judged.queue]], args=[raw, "requeue"])
            else:
                log.error("%s: %s", inflight, judged.message)
                self._script(keys=[inflight], args=[raw, "drop"])

    def report_start(self, inflight: str, snapshot: Snapshot) -> None:
        """Report the start of the attempt ``snapshot`` holds, if it is still in list ``inflight``
        (else the work process has reported it already, with its outcome)."""
        for raw in self.connection.lrange(inflight, 0, -1):
            try:
                job = parse_job_message(raw, configured_signer(), max_job_entry_bytes())
            except MalformedJob:
                continue
            if attempt_id(job.run_id, job.task, job.attempt) == snapshot.attempt:
                start = Outcome(run_id=job.run_id, task=job.task, attempt=job.attempt, status=STARTED,
                                at=snapshot.started, worker=self.worker)
                self._script(keys=[inflight, keys.events(job.run_id)], args=[raw, "start", *_flat(start)])
                return
