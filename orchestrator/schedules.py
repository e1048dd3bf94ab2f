"""Schedules in Redis, and what ``orch schedule ...`` does with them: the Python API.

A schedule is one hash (``orch:schedule:{name}``, layout in :mod:`shared.keys`): its
definition, its parameters, and the state the coordinators keep (``last_tick``, the tick
handled last; ``last_run``; a ``waiting`` tick; ``paused``). Its next fire time sits in
one sorted set, ``orch:schedules:due``, which is all an idle coordinator reads.

Every write that starts a run for a tick goes through :func:`commit`, one Lua script
that checks the schedule's ``last_tick`` is still what the writer read (and, for the
coordinator service, that it still holds the schedule's claim): two coordinators that
decided the same tick cannot both start its run. The run's own keys are written by that
same script, so a run exists if and only if its tick was recorded as fired.

Functions here take a redis-py connection (``shared.connection.connect(url)``); the CLI and
the dashboard call them, so both do exactly the same thing.
"""
from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import redis

from orchestrator.distributed import submit_run
from orchestrator.lease import flatten, run_commands_lua
from orchestrator.loading import load_workflow, split_target
from orchestrator.run_store import Apply
from orchestrator.schedule_logic import (MAX_DUE, WAITED_PAUSED, Catchup, Decision, Outcome, Overlap, Policies,
                                         ScheduleState, Timing, fire_at, format_every, iso, parse_every, parse_moment,
                                         paused_span)
from shared import keys
from shared.allow import Allowlist
from shared.config import Settings, retention
from shared.errors import (ScheduleError, ScheduleExistsError, ScheduleNotFoundError,
                           WorkflowError)
from shared.params import decode_params, encode_params
from shared.signing import Signer
from shared.states import RunState

HISTORY = 200
"""Tick records kept per schedule (``orch:schedule:{name}:ticks``)."""
MAX_BACKFILL = 1000
SIGNATURE_KIND = "schedule"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_COMMIT = """
-- KEYS: schedule hash, claim. ARGV: claim token ('' = no claim needed), last_tick as read
-- ('' = none, '*' = any: a manual run), then commands as count, args..., count, args...
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return redis.error_reply('ORCH_CLAIM_LOST')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('ORCH_SCHEDULE_GONE')
end
local last = redis.call('HGET', KEYS[1], 'last_tick') or ''
if ARGV[2] ~= '*' and last ~= ARGV[2] then
  return redis.error_reply('ORCH_TICK_TAKEN')
end
""" + run_commands_lua(3)


class TickTaken(WorkflowError):
    """Another coordinator handled the tick first (or the schedule went away): nothing was written."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScheduleError(f"schedule name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Schedule:
    """A schedule's definition: what it starts (``target``, as ``orch submit`` takes it, with
    ``params``), when (``timing``) and how ticks that overlap or come late are treated."""

    name: str
    target: str
    timing: Timing
    params: dict[str, Any] = field(default_factory=dict)
    policies: Policies = field(default_factory=Policies)
    created_at: float = 0.0

    def definition(self) -> str:
        timing, policies = asdict(self.timing), asdict(self.policies)
        policies["overlap"], policies["catchup"] = self.policies.overlap.value, self.policies.catchup.value
        return json.dumps({"target": self.target, "timing": timing, "policies": policies,
                           "created_at": self.created_at})

    @classmethod
    def from_record(cls, name: str, record: Mapping[str, Any]) -> "Schedule":
        """The schedule a stored record holds (the same object while the record is unchanged: a
        coordinator handling a thousand schedules a minute parses each definition once)."""
        return _parsed(name, record.get("definition"), record.get("params") or b"")

    @classmethod
    def _from_record(cls, name: str, record: Mapping[str, Any]) -> "Schedule":
        try:
            document = json.loads(record["definition"])
            policies = dict(document["policies"])
            policies["overlap"], policies["catchup"] = Overlap(policies["overlap"]), Catchup(policies["catchup"])
            params = decode_params(record["params"]) if record.get("params") else {}
            return cls(name, str(document["target"]), Timing(**document["timing"]), params, Policies(**policies),
                       float(document.get("created_at") or 0.0))
        except (KeyError, TypeError, ValueError, WorkflowError) as exc:
            raise ScheduleError(f"schedule {name!r} is damaged in Redis ({exc}); remove it and add it again") from None

    def describe_timing(self) -> str:
        if self.timing.cron is not None:
            return f"cron {self.timing.cron!r} in {self.timing.tz}"
        return f"every {format_every(self.timing.every or 0.0)}"


@functools.lru_cache(maxsize=4096)
def _parsed(name: str, definition: Any, params: Any) -> Schedule:
    return Schedule._from_record(name, {"definition": definition, "params": params})


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_record(connection: redis.Redis, name: str) -> dict[str, Any]:
    """The schedule's hash, text fields decoded (``params`` kept as stored); ``{}`` if absent."""
    return decode_record(connection.hgetall(keys.schedule(name)))


def decode_record(raw: Mapping[Any, Any]) -> dict[str, Any]:
    return {as_text(k): (v if as_text(k) == "params" else as_text(v)) for k, v in raw.items()}


def load_schedule(connection: redis.Redis, name: str) -> tuple[Schedule, dict[str, Any]]:
    """The schedule and its raw record; raises :class:`ScheduleNotFoundError`."""
    record = read_record(connection, check_name(name))
    if not record:
        raise ScheduleNotFoundError(name)
    return Schedule.from_record(name, record), record


def as_number(value: Any) -> Optional[float]:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def run_state(connection: redis.Redis, run_id: Optional[str]) -> Optional[str]:
    if not run_id:
        return None
    state = connection.hget(keys.run(run_id), "state")
    return None if state is None else as_text(state)


def schedule_state(schedule: Schedule, record: Mapping[str, Any], previous_state: Optional[str]) -> ScheduleState:
    """The state :func:`~orchestrator.schedule_logic.plan_ticks` decides from, given the state of
    the schedule's last run (``record["last_run"]``)."""
    return ScheduleState(last_tick=as_number(record.get("last_tick")) or schedule.created_at,
                         waiting=as_number(record.get("waiting")), paused=record.get("paused") == "1",
                         previous_run=record.get("last_run") or None,
                         previous_running=previous_state == RunState.RUNNING.value)


def add_schedule(connection: redis.Redis, name: str, target: str, *, cron: Optional[str] = None,
                 every: Optional[float | str] = None, tz: str = "UTC", params: Optional[Mapping[str, Any]] = None,
                 start: Optional[float | str] = None, end: Optional[float | str] = None,
                 jitter: float | str = 0.0, overlap: str = "skip", catchup: str = "latest", max_catchup: int = 100,
                 grace: Optional[float | str] = None, check: bool = True, now: Optional[float] = None) -> Schedule:
    """Write a new schedule; its first tick is the first after ``now`` (or ``start``).

    With ``check`` the target is loaded here first (with the parameters and a ``scheduled_at``),
    so a typo is one error now rather than a failed tick later; give ``check=False`` when the
    code lives only where the coordinators run. Nothing is written on a bad input.
    """
    check_name(name)
    now = time.time() if now is None else now
    seconds = _seconds(every, "every") if every is not None else None
    anchor = _moment(start, tz) if start is not None else (float(math.floor(now)) if seconds is not None else 0.0)
    timing = Timing(cron=cron, tz=tz, every=seconds, start=anchor,
                    end=_moment(end, tz, end_of_day=True) if end is not None else None,
                    jitter=_seconds(jitter, "jitter") if jitter else 0.0)
    policies = Policies(overlap=_choice(Overlap, overlap, "overlap"), catchup=_choice(Catchup, catchup, "catchup"),
                        max_catchup=_count(max_catchup), grace=_seconds(grace, "grace") if grace is not None else None)
    encoded = encode_params(dict(params or {}))
    schedule = Schedule(name, target, timing, dict(params or {}), policies, now)
    if timing.jitter and timing.jitter >= timing.typical_gap:
        raise ScheduleError(f"jitter {timing.jitter:g} s is not shorter than the schedule's interval "
                            f"({timing.typical_gap:g} s): its ticks would fire out of order, several at once")
    first = timing.next_tick(now)  # ticks() starts no earlier than --start, and includes a tick at it
    if first is None:
        raise ScheduleError(f"schedule {name!r} would never fire: its end ({end}) comes before its first tick")
    if check:
        load_workflow(target, {**schedule.params, "scheduled_at": iso(now, tz)})
    with connection.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.schedule(name))
            if pipe.exists(keys.schedule(name)):
                raise ScheduleExistsError(name)
            pipe.multi()
            record: dict[str, Any] = {"definition": schedule.definition(), "params": encoded or b"",
                                      "last_tick": repr(now), "paused": "0"}
            signer = Signer.from_environment()
            if signer is not None:
                record["signature"] = definition_signature(signer, name, record["definition"], record["params"])
            pipe.hset(keys.schedule(name), mapping=record)
            pipe.sadd(keys.SCHEDULES, name)
            pipe.zadd(keys.SCHEDULES_DUE, {name: fire_at(name, first, timing.jitter)})
            pipe.persist(keys.schedule_ticks(name))
            pipe.persist(keys.schedule_runs(name))
            pipe.execute()
        except redis.WatchError:
            raise ScheduleExistsError(name) from None
    return schedule


def definition_signature(signer: Signer, name: str, definition: str | bytes, params: str | bytes) -> str:
    """The HMAC a schedule carries when signing is on: over its name, definition and parameters, so
    that a schedule written to Redis by someone without the key never fires (see :func:`vet`)."""
    raw = [part.encode() if isinstance(part, str) else part for part in (definition, params)]
    return signer.sign(SIGNATURE_KIND, name, 0, raw[0] + b"\0" + raw[1])


def vet(schedule: Schedule, record: Mapping[str, Any], signer: Optional[Signer], allowlist: Allowlist) -> None:
    """Refuse, before anything is imported, a schedule this process must not load: one not signed
    with its key (when it has one), or whose target module is outside its allowlist (the
    standard library's and orch's own are refused without one, as on workers)."""
    if signer is not None:
        params = record.get("params") or b""
        expected = record.get("signature") or ""
        if not signer.verify(SIGNATURE_KIND, schedule.name, 0, _raw(record.get("definition", "")) + b"\0" +
                             _raw(params), expected):
            raise ScheduleError(f"schedule {schedule.name!r} is not signed with this coordinator's key "
                                f"(ORCH_SIGNING_KEY): refused; add it again where the key is set")
    source, _ = split_target(schedule.target)
    module = Path(source).stem if source.endswith(".py") or "/" in source else source
    if not allowlist.allows(f"{module}:workflow"):
        why = (f"allowed: {', '.join(allowlist.prefixes)}" if allowlist.prefixes else
               "standard-library, builtin and orch's own modules are refused")
        raise ScheduleError(f"schedule {schedule.name!r}: target module {module!r} is not allowed on this "
                            f"coordinator ({why}; --allow / ORCH_ALLOW choose what loads)")


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _seconds(value: float | str | None, what: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ScheduleError(f"{what} cannot be negative")
        return float(value)
    if isinstance(value, str) and what != "every" and value.strip() in ("0", "0s"):
        return 0.0
    return parse_every(value)  # type: ignore[arg-type]


def _moment(value: float | str, tz: str, end_of_day: bool = False) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    return parse_moment(value, tz, end_of_day)


def _choice(kind: Any, value: str, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ScheduleError(f"{what} {value!r}: expected one of {', '.join(m.value for m in kind)}") from None


def _count(value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= MAX_DUE:
        raise ScheduleError(f"max catch-up {value!r}: expected a whole number from 0 to {MAX_DUE} (the most "
                            "runs one look at a schedule starts)")
    return value


def commit(connection: redis.Redis, name: str, last_tick_read: str, commands: list[tuple],
           token: str = "") -> None:
    """Run ``commands`` atomically if the schedule's ``last_tick`` is still ``last_tick_read`` (and,
    with ``token``, the caller still holds the schedule's claim); else :class:`TickTaken`.
    ``last_tick_read`` ``"*"``: whatever it is (a manual run fences nothing)."""
    (error,) = commit_many(connection, [(name, last_tick_read, commands)], token)
    if error is not None:
        raise error


Write = tuple[str, str, list[tuple]]
"""One schedule's fenced write: its name, its ``last_tick`` as read, the commands."""


def commit_many(connection: redis.Redis, writes: list[Write], token: str = "") -> list[Optional[Exception]]:
    """Several schedules' fenced writes (:func:`commit`) in one round trip, each atomic on its own;
    per write ``None`` or the error that refused it (:class:`TickTaken`, :class:`ScheduleNotFoundError`,
    or what Redis said)."""
    script = connection.register_script(_COMMIT)
    with connection.pipeline(transaction=False) as pipe:
        for name, last_tick_read, commands in writes:
            script(keys=[keys.schedule(name), keys.schedule_claim(name)],
                   args=[token, last_tick_read, *flatten(commands)], client=pipe)
        replies = pipe.execute(raise_on_error=False)
    return [_refusal(name, reply) for (name, _, _), reply in zip(writes, replies)]


def _refusal(name: str, reply: Any) -> Optional[Exception]:
    if not isinstance(reply, Exception):
        return None
    if "ORCH_SCHEDULE_GONE" in str(reply):
        return ScheduleNotFoundError(name)
    if "ORCH_CLAIM_LOST" in str(reply) or "ORCH_TICK_TAKEN" in str(reply):
        return TickTaken(f"schedule {name!r}: another coordinator handled this tick")
    return reply


def tick_record(decision: Decision, run_id: Optional[str] = None, error: Optional[str] = None,
                at: Optional[float] = None) -> str:
    """One entry of the schedule's history (``orch:schedule:{name}:ticks``)."""
    record: dict[str, Any] = {"tick": decision.tick, "outcome": decision.outcome.value, "at": at or time.time()}
    if decision.reason or error:
        record["reason"] = error or decision.reason
    if run_id:
        record["run_id"] = run_id
    if decision.count > 1:
        record["count"], record["until"] = decision.count, decision.until
    if not decision.exact:
        record["at_least"] = True
    return json.dumps(record)


def history_commands(name: str, records: list[str]) -> list[tuple]:
    if not records:
        return []
    return [("LPUSH", keys.schedule_ticks(name), *records), ("LTRIM", keys.schedule_ticks(name), 0, HISTORY - 1)]


def start_run(connection: redis.Redis, schedule: Schedule, tick: float, trigger: Outcome, apply: Apply,
              extra_params: Optional[Mapping[str, Any]] = None, settings: Optional[Settings] = None) -> str:
    """Load the schedule's target for ``tick`` and hand its run's writes to ``apply`` (which adds its
    own and writes them atomically). Raises what loading or submitting raises; writes nothing then."""
    params = {**schedule.params, **dict(extra_params or {}), "scheduled_at": iso(tick, schedule.timing.tz)}
    workflow = load_workflow(schedule.target, params, reload=True)
    extra = {"schedule": schedule.name, "tick": repr(tick), "trigger": trigger.value}
    return submit_run(workflow, connection, settings=settings, params=params, extra=extra, apply=apply).run_id


def run_index_command(name: str, run_id: str, tick: float) -> tuple:
    return ("ZADD", keys.schedule_runs(name), repr(tick), run_id)


def trigger_schedule(connection: redis.Redis, name: str, params: Optional[Mapping[str, Any]] = None,
                     now: Optional[float] = None) -> str:
    """Start one run of the schedule now, recorded as manual (``orch schedule trigger``); an
    ``orch coordinator`` drives it. Returns its run id."""
    schedule, record = load_schedule(connection, name)
    now = time.time() if now is None else now
    return _manual_run(connection, schedule, record, now, Outcome.MANUAL, params, last_run=True)


def _manual_run(connection: redis.Redis, schedule: Schedule, record: Mapping[str, Any], tick: float,
                trigger: Outcome, params: Optional[Mapping[str, Any]], last_run: bool) -> str:
    """Whoever loads a schedule's target vets it first with its own key and allowlist (this process
    may be a dashboard reading a schedule someone else wrote)."""
    vet(schedule, record, Signer.from_environment(), Allowlist.from_settings())
    run_ids: list[str] = []

    def apply(commands: list[tuple]) -> None:
        run_id = _run_id_of(commands)
        ours = [run_index_command(schedule.name, run_id, tick),
                *history_commands(schedule.name, [tick_record(Decision(tick, trigger), run_id)])]
        if last_run:
            ours.append(("HSET", keys.schedule(schedule.name), "last_run", run_id))
        commit(connection, schedule.name, "*", commands + ours)
        run_ids.append(run_id)

    start_run(connection, schedule, tick, trigger, apply, params)
    return run_ids[0]


def _run_id_of(commands: list[tuple]) -> str:
    """The run id in the commands that create a run (its hash is the first HSET)."""
    for args in commands:
        if str(args[0]).upper() == "HSET" and str(args[1]).startswith(keys.run("")):
            return str(args[1])[len(keys.run("")):]
    raise WorkflowError("no run in the commands")  # a programming error: create_run always writes the hash


def backfill_schedule(connection: redis.Redis, name: str, start: float | str, end: float | str,
                      params: Optional[Mapping[str, Any]] = None, limit: int = MAX_BACKFILL) -> list[str]:
    """One run per tick of the schedule in ``[start, end]`` (a bare end date counts whole), oldest
    first, each with its tick as ``scheduled_at``, recorded as backfill; coordinators drive them.
    The range may lie before the schedule's ``--start`` (an interval's ticks keep their phase).
    More than ``limit`` ticks is refused before anything is written."""
    schedule, record = load_schedule(connection, name)
    tz, every = schedule.timing.tz, schedule.timing.every
    first, last = _moment(start, tz), _moment(end, tz, end_of_day=True)
    if last < first:
        raise ScheduleError(f"backfill of {name!r}: the end is before the start")
    anchor = 0.0
    if every is not None:
        anchor = schedule.timing.start - max(0, math.ceil((schedule.timing.start - first) / every)) * every
    ticks: list[float] = []
    for tick in Timing(cron=schedule.timing.cron, tz=tz, every=every, start=anchor).ticks(first - 1e-6):
        if tick > last:
            break
        ticks.append(tick)
        if len(ticks) > limit:
            raise ScheduleError(f"backfill of {name!r}: more than {limit} ticks in the range; give a shorter range")
    if not ticks:
        raise ScheduleError(f"backfill of {name!r}: no tick of {schedule.describe_timing()} in the range")
    return [_manual_run(connection, schedule, read_record(connection, name), tick, Outcome.BACKFILL, params,
                        last_run=False) for tick in ticks]


def set_paused(connection: redis.Redis, name: str, paused: bool) -> None:
    """Pause or resume (``orch schedule pause|resume``)."""
    (pause_schedule if paused else resume_schedule)(connection, name)


def pause_schedule(connection: redis.Redis, name: str) -> None:
    """Pause: the next look at the schedule (at its next tick) sees it; ticks that come while it is
    paused are recorded as skipped, one entry per look with their count."""
    load_schedule(connection, name)
    connection.hset(keys.schedule(name), "paused", "1")


def resume_schedule(connection: redis.Redis, name: str, now: Optional[float] = None) -> None:
    """Resume from the next tick on. The ticks that came while paused and were not recorded yet
    (a paused schedule is looked at once a minute) are recorded as skipped here, in one write
    fenced like a coordinator's, so none of them fires late."""
    for _ in range(5):
        schedule, record = load_schedule(connection, name)
        if record.get("paused") != "1":
            return
        at = time.time() if now is None else now
        state = schedule_state(schedule, record, None)
        skipped = [Decision(state.waiting, Outcome.SKIPPED, WAITED_PAUSED)] if state.waiting is not None else []
        span = paused_span(schedule.timing, state.last_tick, at)
        skipped += [span] if span else []
        last_tick = state.last_tick if span is None else max(state.last_tick, span.until or span.tick)
        upcoming = schedule.timing.next_tick(max(last_tick, at))
        due = (("ZREM", keys.SCHEDULES_DUE, name) if upcoming is None else
               ("ZADD", keys.SCHEDULES_DUE, repr(fire_at(name, upcoming, schedule.timing.jitter)), name))
        commands: list[tuple] = [("HSET", keys.schedule(name), "paused", "0", "last_tick", repr(last_tick)),
                                 ("HDEL", keys.schedule(name), "waiting"),
                                 *history_commands(name, [tick_record(d, at=at) for d in skipped]), due]
        try:
            return commit(connection, name, record.get("last_tick", ""), commands)
        except TickTaken:
            continue  # a coordinator recorded the paused ticks meanwhile: read again
    raise ScheduleError(f"schedule {name!r}: could not resume, it kept changing; try again")


def remove_schedule(connection: redis.Redis, name: str) -> None:
    """Remove the schedule; its history of ticks and runs stays for the retention
    (``orch runs --schedule NAME`` lists the runs). Runs going on are not touched."""
    load_schedule(connection, name)
    keep = retention()
    with connection.pipeline(transaction=True) as pipe:
        pipe.delete(keys.schedule(name), keys.schedule_claim(name))
        pipe.srem(keys.SCHEDULES, name)
        pipe.zrem(keys.SCHEDULES_DUE, name)
        pipe.expire(keys.schedule_ticks(name), keep)
        pipe.expire(keys.schedule_runs(name), keep)
        pipe.execute()


# The read-only views (orch schedule list|show --json) live in their own module; re-exported here so
# the Python API stays ``orchestrator.schedules.*``.
from orchestrator.schedule_views import describe_schedule, list_schedules  # noqa: E402,F401
