"""The pure schedule logic: when a schedule fires, and what becomes of each tick.

Everything here takes the time as an argument and does no I/O, so it is tested
over years of ticks with fixed dates and no sleeping; the coordinator service
only claims ticks, records them and submits runs.

- Cron expressions (5 fields, or 6 with seconds first) are evaluated in an IANA
  time zone by ``cronsim``, which follows Debian cron across daylight-saving
  changes: a local time that does not exist (spring forward) fires once, at the
  first valid instant after it; one that occurs twice (fall back) fires once, at
  its first occurrence. Interval schedules count real seconds from their start,
  so DST does not touch them.
- Ticks missed while no coordinator ran are decided by the catch-up policy
  (``latest``, ``all`` up to ``max_catchup``, ``none``) and the grace period.
- A tick that comes while the previous run still goes is decided by the overlap
  policy (Temporal's words: skip, buffer one, allow all, cancel other).
"""
from __future__ import annotations

import enum
import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from shared.errors import ScheduleError

MIN_INTERVAL = 1.0
MAX_GRACE = 3600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


class Overlap(str, enum.Enum):
    SKIP = "skip"      # the tick is recorded as skipped
    QUEUE = "queue"    # at most one tick waits, started when the previous run ends
    ALLOW = "allow"    # runs overlap
    CANCEL = "cancel"  # the running one is cancelled, then the tick starts


class Catchup(str, enum.Enum):
    LATEST = "latest"  # one run, for the most recent missed tick
    ALL = "all"        # every missed tick in order, at most max_catchup (the most recent ones)
    NONE = "none"      # missed ticks are only recorded


class TickAction(str, enum.Enum):
    FIRE = "fire"
    SKIP = "skip"
    QUEUE = "queue"
    CANCEL_AND_FIRE = "cancel_and_fire"


def parse_every(text: str) -> float:
    """``"30s"``, ``"15m"``, ``"1h"``, ``"2d"`` as seconds (at least 1 s)."""
    match = _EVERY.match(text) if isinstance(text, str) else None
    if not match:
        raise ScheduleError(f"interval {text!r} is not a number with a unit s, m, h or d (e.g. 30s, 15m, 1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < MIN_INTERVAL:
        raise ScheduleError(f"interval {text!r} is shorter than {MIN_INTERVAL:g} s")
    return seconds


def format_every(seconds: float) -> str:
    """An interval as ``parse_every`` reads it, in its largest whole unit: 3600 -> ``"1h"``, 90 -> ``"90s"``."""
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone {name!r} (give an IANA name such as Europe/Paris or UTC)") from None


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: a cron expression in a zone, or an interval in seconds; ``start`` and
    ``end`` (epoch seconds) bound it; ``jitter`` (seconds) spreads each tick's fire time."""

    cron: Optional[str] = None
    tz: str = "UTC"
    every: Optional[float] = None
    start: float = 0.0
    end: Optional[float] = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ScheduleError("a schedule needs a cron expression or an interval (--cron or --every), not both")
        if self.every is not None and self.every < MIN_INTERVAL:
            raise ScheduleError(f"interval {self.every:g} s is shorter than {MIN_INTERVAL:g} s")
        if self.jitter < 0:
            raise ScheduleError("jitter cannot be negative")
        zone(self.tz)
        if self.cron is not None:
            try:
                CronSim(self.cron, _EPOCH)
            except CronSimError as exc:
                raise ScheduleError(f"cron expression {self.cron!r}: {exc}") from None
            if len(self.cron.split()) not in (5, 6):
                raise ScheduleError(f"cron expression {self.cron!r} has {len(self.cron.split())} fields, not 5 (or 6)")

    def ticks(self, after: float) -> Iterator[float]:
        """The ticks strictly after ``after`` (epoch seconds), in order, up to ``end``."""
        after = max(after, self.start - 1e-6)
        if self.every is not None:
            k = self._index_after(after)
            while True:
                tick = self.start + k * self.every
                if self.end is not None and tick > self.end:
                    return
                yield tick
                k += 1
        tz = zone(self.tz)
        for moment in CronSim(self.cron, datetime.fromtimestamp(after, tz)):  # type: ignore[arg-type]
            tick = moment.timestamp()
            if tick <= after or datetime.fromtimestamp(tick, tz).fold:
                continue  # fold: the second occurrence of a local time (fall back), which fired at the first
            if self.end is not None and tick > self.end:
                return
            yield tick

    def next_tick(self, after: float) -> Optional[float]:
        return next(self.ticks(after), None)

    def between(self, after: float, until: float) -> list[float]:
        """The ticks in ``(after, until]``."""
        out = []
        for tick in self.ticks(after):
            if tick > until:
                break
            out.append(tick)
        return out

    def _index_after(self, after: float) -> int:
        """An interval's index ``k`` (tick = start + k * every) of its first tick after ``after``."""
        return int((max(after, self.start - 1e-6) - self.start) // self.every) + 1  # type: ignore[operator]

    def _index_until(self, until: float) -> int:
        """An interval's index of its last tick at or before ``until`` (and ``end``)."""
        until = until if self.end is None else min(until, self.end)
        return int((until - self.start) // self.every)  # type: ignore[operator]

    def newest(self, after: float, until: float, n: int) -> list[float]:
        """The newest ``n`` ticks in ``(after, until]``, in order, without walking the older ones: by
        arithmetic for an interval; for a cron, over a window that widens until it holds ``n``."""
        if n <= 0 or until <= after:
            return []
        if self.every is not None:
            last = self._index_until(until)
            return [self.start + k * self.every for k in range(max(self._index_after(after), last - n + 1), last + 1)]
        span = self.typical_gap * (n + 1)
        while True:
            lower = max(after, until - span)
            found = self.between(lower, until)
            if len(found) >= n or lower <= after:
                return found[-n:]
            span *= 4

    def count(self, after: float, until: float, limit: int) -> tuple[int, bool]:
        """How many ticks in ``(after, until]``, and whether that is exact: an interval's count is
        arithmetic; a cron's ticks are counted one by one up to ``limit`` (then it is a lower bound)."""
        if until <= after:
            return 0, True
        if self.every is not None:
            return max(0, self._index_until(until) - self._index_after(after) + 1), True
        counted = 0
        for tick in self.ticks(after):
            if tick > until:
                return counted, True
            counted += 1
            if counted >= limit:
                return counted, False
        return counted, True

    @functools.cached_property
    def typical_gap(self) -> float:
        """The interval, or a cron's gap between its first two ticks after ``start`` (computed once)."""
        if self.every is not None:
            return self.every
        first = self.next_tick(self.start or 0.0) or 0.0
        second = self.next_tick(first) or first + MAX_GRACE
        return second - first

    def grace(self) -> float:
        """How late a tick may fire and still count as on time: the interval (a cron's, its typical gap),
        at most one hour."""
        return min(max(self.typical_gap, MIN_INTERVAL), MAX_GRACE)


def fire_at(name: str, tick: float, jitter: float) -> float:
    """When tick ``tick`` of schedule ``name`` fires: the tick plus a pseudo-random offset in
    ``[0, jitter)`` that is the same every time it is asked (any coordinator computes the same)."""
    if jitter <= 0:
        return tick
    digest = hashlib.sha256(f"{name}\0{tick!r}".encode()).digest()
    return tick + jitter * (int.from_bytes(digest[:8], "big") / 2**64)


MAX_DUE = 1000
"""Ticks at most fired in one handling of a schedule (a grace given far longer than the interval
cannot make one look start more runs than this); older due ticks are recorded as missed."""
COUNT_LIMIT = 10_000
"""A cron's missed ticks counted one by one at most: past it the count is a lower bound, so a year
of downtime on ``* * * * * *`` costs a coordinator milliseconds, not minutes."""


@dataclass(frozen=True)
class Missed:
    """A run of consecutive ticks recorded as missed: the first, the last, and how many
    (``exact`` false: at least that many, see :data:`COUNT_LIMIT`)."""

    first: float
    last: float
    count: int
    exact: bool = True


@dataclass(frozen=True)
class DueTicks:
    """What to do with the ticks that came since the last one handled: fire these, record those as
    missed; ``newest`` is the newest tick handled (``None``: no tick came)."""

    fire: list[float]
    missed: Optional[Missed]
    newest: Optional[float]


def due_ticks(timing: Timing, last: float, now: float, catchup: Catchup = Catchup.LATEST,
              max_catchup: int = 100, grace: Optional[float] = None) -> DueTicks:
    """The ticks in ``(last, now]``: those within ``grace`` of ``now`` fire (at most :data:`MAX_DUE`);
    the late ones (a downtime) fire or are missed by the catch-up policy.

    The work is bounded by the ticks that fire, not by the length of the downtime: only the newest
    ticks are enumerated, and the missed ones are counted (by arithmetic for an interval).
    """
    grace = timing.grace() if grace is None else grace
    keep = {Catchup.NONE: 0, Catchup.LATEST: 1, Catchup.ALL: max_catchup}[catchup]
    recent = timing.newest(last, now, MAX_DUE + keep)
    if not recent:
        return DueTicks([], None, None)
    on_time = [tick for tick in recent if now - tick <= grace][-MAX_DUE:]
    late = [tick for tick in recent if now - tick > grace]
    if len(on_time) == MAX_DUE or (catchup is Catchup.LATEST and on_time):
        keep = 0  # what fires stays the newest ticks in a row: everything older is missed
    fire = (late[-keep:] if keep else []) + on_time
    if len(recent) == len(fire):
        return DueTicks(fire, None, recent[-1])
    total, exact = timing.count(last, now, COUNT_LIMIT + len(fire))
    missed = Missed(timing.next_tick(last) or recent[0], recent[-len(fire) - 1], total - len(fire), exact)
    return DueTicks(fire, missed, recent[-1])


def on_tick(overlap: Overlap, previous_running: bool, tick_waiting: bool) -> TickAction:
    """What a tick does given the schedule's previous run (still going or not) and whether a tick
    already waits for it (``queue`` keeps at most one)."""
    if not previous_running or overlap is Overlap.ALLOW:
        return TickAction.FIRE
    if overlap is Overlap.CANCEL:
        return TickAction.CANCEL_AND_FIRE
    if overlap is Overlap.QUEUE and not tick_waiting:
        return TickAction.QUEUE
    return TickAction.SKIP


class Outcome(str, enum.Enum):
    """What became of a tick, as the schedule's history records it."""

    FIRED = "fired"
    SKIPPED = "skipped"
    MISSED = "missed"
    QUEUED = "queued"
    FAILED = "failed"      # the target did not load or validate (recorded by the service)
    MANUAL = "manual"      # orch schedule trigger
    BACKFILL = "backfill"  # orch schedule backfill


@dataclass(frozen=True)
class Decision:
    """One tick's fate. ``cancel`` names the run a ``cancel`` overlap stops first; a ``missed``
    decision may stand for ``count`` ticks (at least that many when not ``exact``), from ``tick``
    to ``until``."""

    tick: float
    outcome: Outcome
    reason: str = ""
    cancel: Optional[str] = None
    count: int = 1
    until: Optional[float] = None
    exact: bool = True


@dataclass(frozen=True)
class Policies:
    overlap: Overlap = Overlap.SKIP
    catchup: Catchup = Catchup.LATEST
    max_catchup: int = 100
    grace: Optional[float] = None


@dataclass(frozen=True)
class ScheduleState:
    """What the store knows of a schedule between two handlings of its due ticks."""

    last_tick: float
    waiting: Optional[float] = None
    paused: bool = False
    previous_run: Optional[str] = None
    previous_running: bool = False


@dataclass(frozen=True)
class TickPlan:
    decisions: list[Decision]
    last_tick: float
    waiting: Optional[float]
    next_fire: Optional[float]
    """When the schedule next needs handling (``None``: it has ended)."""


RECHECK = 1.0
"""Seconds between looks at a schedule whose queued tick waits for the previous run to end."""


def plan_ticks(name: str, timing: Timing, policies: Policies, state: ScheduleState, now: float,
               least_grace: float = 0.0) -> TickPlan:
    """Decide every tick due by ``now`` since ``state.last_tick``.

    A tick queued behind the previous run fires first once that run ended (or is skipped if the
    schedule was paused meanwhile). The ticks due now form one batch, decided against the run
    that was going before the batch (catch-up ticks of a downtime all fire, in order, when
    nothing was running: the user asked for them). A paused schedule's ticks are skipped as one
    entry per look, and it is looked at every :data:`PAUSED_LOOK`. ``least_grace`` keeps the
    default grace at least the time a failover takes, so a tick fired late because the
    coordinator about to fire it died is fired, not missed (a grace the user gave is kept as
    given). A tick's jitter adds to its grace: it fires that late on purpose.
    """
    decisions: list[Decision] = []
    running, waiting = state.previous_running, state.waiting
    if waiting is not None and state.paused:  # a queued tick does not outlive a pause, to fire days later
        decisions.append(Decision(waiting, Outcome.SKIPPED, WAITED_PAUSED))
        waiting = None
    if state.paused:
        return _paused_plan(name, timing, state, now, decisions)
    if waiting is not None and not running:
        decisions.append(Decision(waiting, Outcome.FIRED, "queued until the previous run ended"))
        waiting, running = None, True
    grace = timing.jitter + (policies.grace if policies.grace is not None else max(timing.grace(), least_grace))
    due = due_ticks(timing, state.last_tick, now, policies.catchup, policies.max_catchup, grace)
    if due.missed:
        decisions.append(_missed(due.missed, policies.catchup))
    for tick in due.fire:
        decisions.append(_decide(tick, policies.overlap, state, running, waiting is not None))
        if decisions[-1].outcome is Outcome.QUEUED:
            waiting = tick
    last_tick = state.last_tick if due.newest is None else max(state.last_tick, due.newest)
    upcoming = timing.next_tick(max(last_tick, now))
    next_fire = None if upcoming is None else fire_at(name, upcoming, timing.jitter)
    if waiting is not None:
        next_fire = now + RECHECK if next_fire is None else min(next_fire, now + RECHECK)
    return TickPlan(decisions, last_tick, waiting, next_fire)


PAUSED_LOOK = 60.0
"""Seconds between looks at a paused schedule: the ticks that came meanwhile are recorded as one
skipped entry with their count (a paused every-second schedule does not push its history out, nor
cost a coordinator a look a second)."""
PAUSED = "the schedule is paused"
WAITED_PAUSED = "the schedule was paused while it waited"


def paused_span(timing: Timing, last: float, now: float) -> Optional[Decision]:
    """The ticks in ``(last, now]`` of a paused schedule as one skipped decision (``None``: none came)."""
    newest = timing.newest(last, now, 1)
    if not newest:
        return None
    count, exact = timing.count(last, now, COUNT_LIMIT)
    return Decision(timing.next_tick(last) or newest[0], Outcome.SKIPPED, PAUSED, count=count, until=newest[0],
                    exact=exact)


def _paused_plan(name: str, timing: Timing, state: ScheduleState, now: float, decisions: list[Decision]) -> TickPlan:
    skipped = paused_span(timing, state.last_tick, now)
    last_tick = state.last_tick if skipped is None else max(state.last_tick, skipped.until or skipped.tick)
    upcoming = timing.next_tick(max(last_tick, now))
    next_fire = None if upcoming is None else max(fire_at(name, upcoming, timing.jitter), now + PAUSED_LOOK)
    return TickPlan(decisions + ([skipped] if skipped else []), last_tick, None, next_fire)


def _missed(missed: Missed, catchup: Catchup) -> Decision:
    why = {Catchup.NONE: "catch-up 'none' fires no late tick",
           Catchup.LATEST: "catch-up 'latest' fires only the most recent late tick",
           Catchup.ALL: "over the catch-up limit (--max-catchup)"}[catchup]
    if not missed.exact:
        why += f"; at least {missed.count} ticks (not counted past {COUNT_LIMIT:,})"
    return Decision(missed.first, Outcome.MISSED, f"no coordinator fired it within its grace; {why}",
                    count=missed.count, until=missed.last, exact=missed.exact)


def _decide(tick: float, overlap: Overlap, state: ScheduleState, running: bool, tick_waiting: bool) -> Decision:
    action = on_tick(overlap, running, tick_waiting)
    previous = state.previous_run or "the previous run"
    if action is TickAction.FIRE:
        return Decision(tick, Outcome.FIRED)
    if action is TickAction.CANCEL_AND_FIRE:
        return Decision(tick, Outcome.FIRED, f"cancelled {previous} (overlap 'cancel')", cancel=state.previous_run)
    if action is TickAction.QUEUE:
        return Decision(tick, Outcome.QUEUED, f"waits for {previous} to end (overlap 'queue')")
    why = "a tick already waits" if tick_waiting else f"{previous} was still running"
    return Decision(tick, Outcome.SKIPPED, f"{why} (overlap '{overlap.value}')")


def parse_moment(text: str, tz: str, end_of_day: bool = False) -> float:
    """An ISO 8601 date or date-time as epoch seconds; without an offset it is a local time in
    ``tz``. A bare date is its midnight, or with ``end_of_day`` the last instant before the next."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ScheduleError(f"{text!r} is not an ISO 8601 date or date-time (e.g. 2026-11-01 or "
                            f"2026-11-01T02:30)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone(tz))
    stamp = moment.timestamp()
    if end_of_day and len(text.strip()) == 10:
        following = (moment.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=moment.tzinfo)
        return following.timestamp() - 1e-3
    return stamp


def iso(tick: float, tz: str) -> str:
    """A tick as ISO 8601 with its offset, in the schedule's zone (what ``scheduled_at`` holds)."""
    return datetime.fromtimestamp(tick, zone(tz)).isoformat()
