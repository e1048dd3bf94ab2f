"""The part of ``orch coordinator`` that fires schedules: claim, decide, record, submit.

Each coordinator looks at one sorted set (``orch:schedules:due``: schedule -> next fire
time) and handles the schedules whose time has come. To handle one it takes the
schedule's claim (``SET NX`` with the lease TTL, renewed while it loads a long catch-up's
targets), so that coordinators do not all load the same target; decides the due ticks with
the pure :func:`~orchestrator.schedule_logic.plan_ticks`; loads the target for each tick
that fires; and writes the runs, the history and the
schedule's new state in one fenced script (:func:`orchestrator.schedules.commit`): if
another coordinator handled the tick meanwhile (this one paused past its claim), nothing
is written. A coordinator killed while it held the claim leaves the schedule due: another
takes the claim once it lapses and fires the tick, within ``ORCH_LEASE_TTL`` + the poll.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import redis

from orchestrator.metrics_store import schedule_lag_commands
from orchestrator.schedule_logic import Decision, Outcome, TickPlan, plan_ticks
from orchestrator.schedules import (Schedule, TickTaken, commit_many, decode_record, history_commands,
                                    run_index_command, schedule_state, start_run, tick_record, vet)
from shared import keys
from shared.allow import Allowlist
from shared.config import Settings
from shared.errors import ScheduleError, ScheduleNotFoundError, WorkflowError
from shared.messages import cancel_fields
from shared.signing import Signer

log = logging.getLogger("orch.schedules")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
BATCH = 100
"""Due schedules claimed and read together."""
WINDOW = 1000
"""Due schedules read per look."""
RETRY_LATER = 60.0
"""Seconds before a schedule that could not be handled (damaged, refused by Redis) is looked at again."""
BUSY_WAIT = 0.05
"""Seconds before looking again when every due schedule is held by another coordinator."""


@dataclass
class Pending:
    """One schedule's decided ticks, ready to write: the fenced write and the runs it starts."""

    name: str
    last_tick_read: str
    commands: list[tuple]
    started: list[tuple[str, float]]


class ScheduleService:
    """Fires the schedules that are due. ``on_started(run_id)`` is called for each run it starts
    (the coordinator service drives it at once). ``clock`` is injectable for tests."""

    def __init__(self, connection: redis.Redis, *, settings: Optional[Settings] = None, poll: float = 0.25,
                 on_started: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.connection = connection
        self.settings = settings or Settings()
        self.poll = poll
        self.on_started = on_started or (lambda run_id: None)
        self.clock = clock
        self.token = secrets.token_hex(12)
        self.signer = Signer.from_environment()
        self.allowlist = Allowlist.from_settings()
        self._release = connection.register_script(_RELEASE)
        self._renew = connection.register_script(_RENEW)
        self._held: list[str] = []
        self._renewed_at = 0.0
        self._started: list[str] = []

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                wait = self.step()
            except redis.RedisError as exc:
                log.warning("schedules: Redis error (%s); retrying", exc)
                wait = 1.0
            stop.wait(wait)

    def step(self) -> float:
        """Handle the schedules due now; return how long to wait before the next look.

        The due schedules are read oldest first, up to :data:`WINDOW`, and handled a batch at a
        time; a batch another coordinator holds is passed over, so several coordinators share a
        minute's thousand ticks instead of queueing behind one another. The runs started are handed
        to ``on_started`` once every due schedule is handled: writing the runs of a minute's ticks
        on time comes before driving them (which is what threads would compete for).
        """
        now = self.clock()
        due = [raw.decode() if isinstance(raw, bytes) else raw for raw in
               self.connection.zrangebyscore(keys.SCHEDULES_DUE, "-inf", now, start=0, num=WINDOW)]
        handled = 0
        for first in range(0, len(due), BATCH):
            started, claimed = self.handle_all(due[first:first + BATCH])
            self._started += started
            handled += claimed
        if len(due) == WINDOW and handled:
            return 0.0
        started, self._started = self._started, []
        for run_id in started:
            self.on_started(run_id)
        if due and not handled:
            return min(self.poll, BUSY_WAIT)  # all held by other coordinators: look again soon
        first_due = self.connection.zrange(keys.SCHEDULES_DUE, 0, 0, withscores=True)
        if not first_due:
            return self.poll
        return max(0.01, min(self.poll, first_due[0][1] - self.clock()))

    @property
    def failover(self) -> float:
        """How late a tick can be when the coordinator about to fire it died: it still fires."""
        return self.settings.lease_ttl + 2 * self.poll + 1.0

    def handle(self, name: str) -> list[str]:
        """Handle one due schedule if no other coordinator is; the ids of the runs started."""
        started, _ = self.handle_all([name])
        for run_id in started:
            self.on_started(run_id)
        return started

    def handle_all(self, names: list[str]) -> tuple[list[str], int]:
        """Claim, read, decide and write the due schedules ``names`` (five round trips for them all:
        claim, read, read their last runs' states, write, release); the ids of the runs started, and
        how many schedules this coordinator claimed. A schedule another coordinator holds is left to it."""
        if not names:
            return [], 0
        ttl = int(self.settings.lease_ttl * 1000)
        with self.connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.set(keys.schedule_claim(name), self.token, nx=True, px=ttl)
            mine = [name for name, claimed in zip(names, pipe.execute()) if claimed]
        self._held, self._renewed_at = mine, time.monotonic()
        started: list[str] = []
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for name in mine:
                    pipe.hgetall(keys.schedule(name))
                records = [decode_record(raw) for raw in pipe.execute()]
            with self.connection.pipeline(transaction=False) as pipe:
                for record in records:
                    pipe.hget(keys.run(record.get("last_run") or "-"), "state")
                previous = [None if raw is None else raw.decode() for raw in pipe.execute()]
            pending = [self._plan_one(name, record, state) for name, record, state in zip(mine, records, previous)]
            self._keep_claims()
            started = self._write([item for item in pending if item is not None])
        finally:
            with self.connection.pipeline(transaction=False) as pipe:
                for name in mine:
                    self._release(keys=[keys.schedule_claim(name)], args=[self.token], client=pipe)
                pipe.execute()
        return started, len(mine)

    def _plan_one(self, name: str, record: dict[str, Any], previous_state: Optional[str]) -> Optional[Pending]:
        try:
            if not record:
                raise ScheduleNotFoundError(name)
            return self._decide(Schedule.from_record(name, record), record, previous_state)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # Redis itself is away: the whole look is retried
        except Exception as exc:  # noqa: BLE001  (one bad schedule must not stop the others)
            self._refused(name, exc)
        return None

    def _write(self, pending: list[Pending]) -> list[str]:
        """Commit the schedules' writes in one round trip; the runs of those that were written."""
        started: list[str] = []
        errors = commit_many(self.connection, [(p.name, p.last_tick_read, p.commands) for p in pending], self.token)
        for item, error in zip(pending, errors):
            if error is not None:
                self._refused(item.name, error)
                continue
            for run_id, tick in item.started:
                log.info("schedule %s: tick %s started run %s", item.name, tick, run_id)
                started.append(run_id)
        return started

    def _refused(self, name: str, error: Exception) -> None:
        if isinstance(error, TickTaken):
            log.info("%s", error)
        elif isinstance(error, ScheduleNotFoundError):
            self.connection.zrem(keys.SCHEDULES_DUE, name)
        elif isinstance(error, ScheduleError):
            log.error("%s", error)
            self._later(name)
        else:
            log.error("schedule %s: could not be handled (%s: %s); looked at again in %g s", name,
                      type(error).__name__, error, RETRY_LATER, exc_info=error)
            self._later(name)

    def _later(self, name: str) -> None:
        self.connection.zadd(keys.SCHEDULES_DUE, {name: self.clock() + RETRY_LATER})

    def _decide(self, schedule: Schedule, record: dict[str, Any], previous_state: Optional[str]) -> Pending:
        """Plan the schedule's due ticks and prepare their writes (runs loaded and built, not written)."""
        name = schedule.name
        state = schedule_state(schedule, record, previous_state)
        now = self.clock()
        plan = plan_ticks(name, schedule.timing, schedule.policies, state, now, least_grace=self.failover)
        commands: list[tuple] = []
        records: list[str] = []
        started: list[tuple[str, Decision]] = []
        for decision in plan.decisions:
            if decision.outcome is not Outcome.FIRED:
                records.append(tick_record(decision, at=now))
                continue
            self._keep_claim(name)
            if decision.cancel:
                commands.append(self._cancel(decision.cancel, name))
            run_id, error = self._prepare(schedule, record, decision, commands)
            if run_id:
                commands += schedule_lag_commands(name, max(0.0, self.clock() - decision.tick))
            records.append(tick_record(decision, run_id, error=error, at=now) if run_id
                           else tick_record(Decision(decision.tick, Outcome.FAILED), error=error, at=now))
            if run_id:
                started.append((run_id, decision))
        commands += self._state_commands(schedule, plan, [run_id for run_id, _ in started])
        commands += history_commands(name, records)
        return Pending(name, record.get("last_tick", ""), commands, [(r, d.tick) for r, d in started])

    def _keep_claim(self, name: str) -> None:
        """Keep this coordinator's claims of the batch (:meth:`_keep_claims`), and raise
        :class:`TickTaken` if the claim on ``name`` lapsed already."""
        if name in self._keep_claims():
            raise TickTaken(f"schedule {name!r}: this coordinator's claim lapsed; another coordinator handles it")

    def _keep_claims(self) -> set[str]:
        """Renew every claim of the batch in hand once a quarter of the TTL has gone (one round trip),
        before loading one more tick's target and before the batch's write: a long catch-up, slow
        targets or a large batch must not outlive the claims (the write would be refused, and every
        later try with it: no tick would ever fire). Returns the names whose claim had lapsed."""
        ttl = self.settings.lease_ttl
        if time.monotonic() - self._renewed_at < ttl / 4:
            return set()
        with self.connection.pipeline(transaction=False) as pipe:
            for held in self._held:
                self._renew(keys=[keys.schedule_claim(held)], args=[self.token, int(ttl * 1000)], client=pipe)
            renewed = pipe.execute()
        self._renewed_at = time.monotonic()
        return {held for held, ok in zip(self._held, renewed) if not ok}

    def _prepare(self, schedule: Schedule, record: dict, decision: Decision, commands: list[tuple]
                 ) -> tuple[Optional[str], Optional[str]]:
        """Load the target for the tick and add its run's writes to ``commands``; on a target that
        does not load or validate, ``(None, error)`` and nothing is added."""
        def collect(run_commands: list[tuple]) -> None:
            commands.extend(run_commands)

        try:
            vet(schedule, record, self.signer, self.allowlist)
            run_id = start_run(self.connection, schedule, decision.tick, Outcome.FIRED, collect,
                               settings=self.settings)
        except WorkflowError as exc:
            log.error("schedule %s: tick %s failed: %s", schedule.name, decision.tick, exc)
            return None, str(exc)
        except Exception as exc:  # a target's own code raised something else while building the workflow
            log.exception("schedule %s: tick %s failed", schedule.name, decision.tick)
            return None, f"{type(exc).__name__}: {exc}"
        commands.append(run_index_command(schedule.name, run_id, decision.tick))
        return run_id, None

    def _cancel(self, run_id: str, schedule: str) -> tuple:
        fields = cancel_fields(f"schedule {schedule} (overlap 'cancel')", run_id, Signer.from_environment())
        flat: list = []
        for field, value in fields.items():
            flat += [field, value]
        return ("XADD", keys.events(run_id), "NOMKSTREAM", "*", *flat)

    def _state_commands(self, schedule: Schedule, plan: TickPlan, run_ids: list[str]) -> list[tuple]:
        name = schedule.name
        mapping: list = ["last_tick", repr(plan.last_tick)]
        if run_ids:
            mapping += ["last_run", run_ids[-1]]
        commands: list[tuple] = [("HSET", keys.schedule(name), *mapping)]
        if plan.waiting is None:
            commands.append(("HDEL", keys.schedule(name), "waiting"))
        else:
            commands.append(("HSET", keys.schedule(name), "waiting", repr(plan.waiting)))
        if plan.next_fire is None:
            commands.append(("ZREM", keys.SCHEDULES_DUE, name))
        else:
            commands.append(("ZADD", keys.SCHEDULES_DUE, repr(plan.next_fire), name))
        return commands
