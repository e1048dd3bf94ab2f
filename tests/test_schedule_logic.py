"""The pure schedule logic (orchestrator/schedule_logic.py) over fixed dates: cron in zones across
daylight-saving changes both ways, intervals, catch-up, grace, overlap and jitter. No clock, no sleep."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from orchestrator.schedule_logic import (COUNT_LIMIT, MAX_DUE, Catchup, DueTicks, Missed, Overlap, TickAction,
                                         Timing, due_ticks, fire_at, on_tick, parse_every)
from shared.errors import ScheduleError

PARIS, NEW_YORK = ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")
T2030 = datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()


def at(zone, *fields) -> float:
    return datetime(*fields, tzinfo=zone).timestamp()


def local(tick: float, zone) -> str:
    return datetime.fromtimestamp(tick, zone).strftime("%Y-%m-%d %H:%M %z")


def first_ticks(timing: Timing, after: float, n: int) -> list[float]:
    out, ticks = [], timing.ticks(after)
    for _ in range(n):
        out.append(next(ticks))
    return out


def test_a_daily_cron_fires_at_its_local_time_in_its_zone() -> None:
    timing = Timing(cron="30 2 * * *", tz="Europe/Paris")
    ticks = first_ticks(timing, at(PARIS, 2026, 1, 10, 12, 0), 3)
    assert [local(t, PARIS) for t in ticks] == ["2026-01-11 02:30 +0100", "2026-01-12 02:30 +0100",
                                                 "2026-01-13 02:30 +0100"]


@pytest.mark.parametrize("zone, name, day", [(PARIS, "Europe/Paris", (2026, 3, 29)),
                                             (NEW_YORK, "America/New_York", (2026, 3, 8))])
def test_spring_forward_a_time_that_does_not_exist_fires_once_at_the_next_valid_instant(zone, name, day) -> None:
    timing = Timing(cron="30 2 * * *", tz=name)
    ticks = first_ticks(timing, at(zone, *day, 0, 0) - 86400, 3)
    shown = [local(t, zone) for t in ticks]
    assert shown[1].startswith(f"{day[0]}-{day[1]:02d}-{day[2]:02d} 03:00")  # 02:30 does not exist that day
    assert shown[0].endswith("02:30 " + shown[0][-5:]) and shown[2].split()[1] == "02:30"
    assert len(set(t // 86400 for t in ticks)) == 3


@pytest.mark.parametrize("zone, name, day", [(PARIS, "Europe/Paris", (2026, 10, 25)),
                                             (NEW_YORK, "America/New_York", (2026, 11, 1))])
def test_fall_back_a_time_that_occurs_twice_fires_once_at_its_first_occurrence(zone, name, day) -> None:
    hour = 2 if zone is PARIS else 1
    timing = Timing(cron=f"30 {hour} * * *", tz=name)
    ticks = timing.between(at(zone, *day, 0, 0), at(zone, *day, 23, 0))
    assert len(ticks) == 1
    moment = datetime.fromtimestamp(ticks[0], zone)
    assert (moment.hour, moment.minute, moment.fold) == (hour, 30, 0)
    assert moment.utcoffset() == (timedelta(hours=2) if zone is PARIS else timedelta(hours=-4))  # summer time


def test_an_hourly_cron_counts_23_and_24_ticks_on_the_days_the_clock_changes() -> None:
    timing = Timing(cron="0 * * * *", tz="Europe/Paris")
    spring = timing.between(at(PARIS, 2026, 3, 29, 0, 0) - 1, at(PARIS, 2026, 3, 29, 23, 59))
    fall = timing.between(at(PARIS, 2026, 10, 25, 0, 0) - 1, at(PARIS, 2026, 10, 25, 23, 59))
    assert len(spring) == 23 and len(fall) == 24  # 02:00 does not exist, then occurs twice but fires once
    assert sorted(Counter(local(t, PARIS)[11:16] for t in fall).values()) == [1] * 24


def test_three_years_of_a_daily_cron_fire_once_a_day_never_twice() -> None:
    timing = Timing(cron="15 2 * * *", tz="America/New_York")
    start = at(NEW_YORK, 2025, 1, 1, 0, 0)
    ticks = timing.between(start, start + 3 * 365 * 86400)
    days = Counter(datetime.fromtimestamp(t, NEW_YORK).date() for t in ticks)
    assert len(ticks) == 3 * 365 and set(days.values()) == {1}
    assert all(b > a for a, b in zip(ticks, ticks[1:]))


def test_an_interval_counts_real_seconds_across_dst() -> None:
    start = at(PARIS, 2026, 3, 29, 0, 0)
    timing = Timing(every=3600, start=start)
    ticks = timing.between(start, start + 24 * 3600)
    assert len(ticks) == 24 and all(b - a == 3600 for a, b in zip(ticks, ticks[1:]))
    assert timing.next_tick(start + 10) == start + 3600


def test_six_field_cron_has_seconds_and_start_and_end_bound_the_ticks() -> None:
    utc = timezone.utc
    timing = Timing(cron="*/20 * * * * *", start=at(utc, 2026, 1, 1, 0, 0), end=at(utc, 2026, 1, 1, 0, 1))
    ticks = timing.between(0, 2e9)
    assert [t - at(utc, 2026, 1, 1, 0, 0) for t in ticks] == [0, 20, 40, 60]  # start and end inclusive


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1.5s", 1.5)])
def test_intervals_parse(text, seconds) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("kwargs, message", [
    ({"cron": "61 * * * *"}, "cron expression '61 * * * *'"),
    ({"cron": "* * *"}, "cron expression"),
    ({"every": 0.5}, "shorter than 1 s"),
    ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({}, "needs a cron expression or an interval"),
    ({"cron": "* * * * *", "every": 5}, "not both"),
])
def test_bad_schedules_are_refused_naming_what_to_fix(kwargs, message) -> None:
    with pytest.raises(ScheduleError, match=message.replace("*", r"\*").replace("(", r"\(")):
        Timing(**kwargs)
    with pytest.raises(ScheduleError, match="not a number with a unit"):
        parse_every("often")


def test_on_time_ticks_fire_and_a_downtime_is_caught_up_by_policy() -> None:
    timing = Timing(every=60, start=0.0)
    assert due_ticks(timing, last=0, now=125) == due_ticks(timing, 0, 125, Catchup.LATEST)
    # 10 ticks missed while no coordinator ran (grace 30 s)
    late = [60.0 * k for k in range(1, 11)]
    now = 640
    assert due_ticks(timing, 0, now, Catchup.LATEST, grace=30).fire == [600.0]
    assert due_ticks(timing, 0, now, Catchup.LATEST, grace=30).missed == Missed(60.0, 540.0, 9)
    none = due_ticks(timing, 0, now, Catchup.NONE, grace=30)
    assert none.fire == [] and none.missed == Missed(60.0, 600.0, 10) and none.newest == 600.0
    caught = due_ticks(timing, 0, now, Catchup.ALL, max_catchup=4, grace=30)
    assert caught.fire == late[-4:] and caught.missed == Missed(60.0, 360.0, 6)
    on_time = due_ticks(timing, 0, 620, Catchup.NONE, grace=30)  # 600 is 20 s late: within the grace, it fires
    assert on_time.fire == [600.0] and on_time.missed == Missed(60.0, 540.0, 9)
    assert due_ticks(timing, 600, 610) == DueTicks([], None, None)


def _brute(timing: Timing, last: float, now: float, catchup: Catchup, max_catchup: int, grace: float):
    """What due_ticks decides, by walking every tick (the definition the shortcuts must agree with)."""
    ticks = timing.between(last, now)
    on_time = [t for t in ticks if now - t <= grace]
    late = [t for t in ticks if now - t > grace]
    keep = 0 if catchup is Catchup.NONE or (catchup is Catchup.LATEST and on_time) else \
        (1 if catchup is Catchup.LATEST else max_catchup)
    fire = (late[-keep:] if keep else []) + on_time
    missed = ticks[:len(ticks) - len(fire)]
    return fire, (missed[0], missed[-1], len(missed)) if missed else None


@pytest.mark.parametrize("timing", [Timing(every=7.5, start=1000.0), Timing(every=60, start=0.0, end=5000.0),
                                    Timing(cron="*/7 * * * * *"), Timing(cron="30 2 * * *", tz="Europe/Paris"),
                                    Timing(cron="0 9 * * 1-5", tz="America/New_York")])
@pytest.mark.parametrize("catchup, max_catchup", [(Catchup.LATEST, 100), (Catchup.ALL, 3), (Catchup.ALL, 0),
                                                  (Catchup.NONE, 100)])
def test_the_shortcuts_decide_as_walking_every_tick_would(timing: Timing, catchup: Catchup, max_catchup: int) -> None:
    gap = timing.typical_gap
    cases = [(1000.0, 3.0, 10.0), (1000.0, 40 * gap, 5 * gap), (400.0, 900.0, 60.0),  # (last, span, grace)
             (at(PARIS, 2026, 3, 20, 0, 0), 2000 * gap, 3600.0), (at(NEW_YORK, 2026, 10, 30, 1, 0), 7 * gap + 1, gap)]
    for last, span, grace in cases:
        due = due_ticks(timing, last, last + span, catchup, max_catchup, grace)
        fire, missed = _brute(timing, last, last + span, catchup, max_catchup, grace)
        assert due.fire == fire, (last, span, grace)
        assert (None if due.missed is None else (due.missed.first, due.missed.last, due.missed.count)) == missed


def test_a_year_of_downtime_costs_milliseconds_and_is_counted_or_bounded() -> None:
    import time
    year = 365 * 86400.0
    began = time.process_time()
    interval = due_ticks(Timing(every=1.0, start=T2030), T2030, T2030 + year, Catchup.ALL, 100, 1.0)
    cron = due_ticks(Timing(cron="* * * * * *"), T2030, T2030 + year, Catchup.ALL, 100, 1.0)
    assert time.process_time() - began < 2.0  # walking every tick takes minutes and gigabytes
    # the two ticks within the grace of 1 s, and the 100 newest late ones, fire
    assert len(interval.fire) == 102 and interval.missed == Missed(T2030 + 1, T2030 + year - 102, int(year) - 102)
    assert cron.fire == interval.fire and (cron.missed.first, cron.missed.last) == (T2030 + 1, T2030 + year - 102)
    assert not cron.missed.exact and cron.missed.count >= COUNT_LIMIT
    plan = plan_ticks("s", Timing(cron="* * * * * *"), Policies(catchup=Catchup.NONE), ScheduleState(T2030),
                      now=T2030 + year)
    missed, *fired = plan.decisions  # the two ticks within the grace (1 s) fire
    assert [(d.outcome, d.tick) for d in fired] == [(Outcome.FIRED, T2030 + year - 1), (Outcome.FIRED, T2030 + year)]
    assert missed.outcome is Outcome.MISSED and not missed.exact and "at least" in missed.reason
    assert plan.last_tick == T2030 + year


def test_a_grace_far_longer_than_the_interval_fires_at_most_max_due_ticks_at_once() -> None:
    due = due_ticks(Timing(every=1.0, start=0.0), 0.0, 86400.0, Catchup.LATEST, grace=86400.0)
    assert len(due.fire) == MAX_DUE and due.fire[-1] == 86400.0
    assert due.missed == Missed(1.0, 86400.0 - MAX_DUE, 86400 - MAX_DUE)


def test_grace_is_the_interval_at_most_an_hour() -> None:
    assert Timing(every=30).grace() == 30
    assert Timing(every=7200).grace() == 3600
    assert Timing(cron="*/5 * * * *").grace() == 300
    assert Timing(cron="0 3 * * *").grace() == 3600


@pytest.mark.parametrize("overlap, running, waiting, action", [
    (Overlap.SKIP, False, False, TickAction.FIRE),
    (Overlap.SKIP, True, False, TickAction.SKIP),
    (Overlap.QUEUE, True, False, TickAction.QUEUE),
    (Overlap.QUEUE, True, True, TickAction.SKIP),
    (Overlap.ALLOW, True, True, TickAction.FIRE),
    (Overlap.CANCEL, True, False, TickAction.CANCEL_AND_FIRE),
    (Overlap.CANCEL, False, False, TickAction.FIRE),
])
def test_overlap_policies(overlap, running, waiting, action) -> None:
    assert on_tick(overlap, running, waiting) is action


def test_jitter_is_deterministic_within_bounds_and_spreads_schedules() -> None:
    offsets = [fire_at(f"job-{k}", 1000.0, 30.0) - 1000.0 for k in range(500)]
    assert all(0 <= offset < 30 for offset in offsets) and max(offsets) - min(offsets) > 25
    assert fire_at("job-1", 1000.0, 30.0) == fire_at("job-1", 1000.0, 30.0)
    assert fire_at("job-1", 1000.0, 0.0) == 1000.0


# ------------------------------------------------------------------ plan_ticks: the service's decisions
from orchestrator.schedule_logic import (PAUSED_LOOK, Outcome, Policies, ScheduleState, iso, parse_moment,  # noqa: E402
                                         plan_ticks)

EVERY_10 = Timing(every=10.0, start=1000.0)


def test_a_plan_fires_the_tick_due_and_says_when_to_look_next() -> None:
    plan = plan_ticks("s", EVERY_10, Policies(), ScheduleState(last_tick=1000.0), now=1010.2)
    assert [(d.tick, d.outcome) for d in plan.decisions] == [(1010.0, Outcome.FIRED)]
    assert (plan.last_tick, plan.next_fire, plan.waiting) == (1010.0, 1020.0, None)


def test_a_plan_with_nothing_due_changes_nothing() -> None:
    plan = plan_ticks("s", EVERY_10, Policies(), ScheduleState(last_tick=1010.0), now=1015.0)
    assert plan.decisions == [] and plan.last_tick == 1010.0 and plan.next_fire == 1020.0


def test_overlap_skip_records_the_tick_skipped_naming_the_running_run() -> None:
    state = ScheduleState(last_tick=1000.0, previous_run="r1", previous_running=True)
    (decision,) = plan_ticks("s", EVERY_10, Policies(), state, now=1010.0).decisions
    assert decision.outcome is Outcome.SKIPPED and decision.reason == "r1 was still running (overlap 'skip')"


def test_overlap_queue_keeps_one_tick_waiting_then_fires_it_once_the_previous_run_ended() -> None:
    policies = Policies(overlap=Overlap.QUEUE)
    busy = ScheduleState(last_tick=1000.0, previous_run="r1", previous_running=True)
    plan = plan_ticks("s", EVERY_10, policies, busy, now=1010.0)
    assert [d.outcome for d in plan.decisions] == [Outcome.QUEUED] and plan.waiting == 1010.0
    assert plan.next_fire == 1011.0  # looked at again within RECHECK, not at the next tick
    still = ScheduleState(last_tick=1010.0, waiting=1010.0, previous_run="r1", previous_running=True)
    plan = plan_ticks("s", EVERY_10, policies, still, now=1020.0)
    assert [(d.tick, d.outcome) for d in plan.decisions] == [(1020.0, Outcome.SKIPPED)]
    assert "already waits" in plan.decisions[0].reason and plan.waiting == 1010.0
    ended = ScheduleState(last_tick=1020.0, waiting=1010.0, previous_run="r1", previous_running=False)
    plan = plan_ticks("s", EVERY_10, policies, ended, now=1021.0)
    assert [(d.tick, d.outcome) for d in plan.decisions] == [(1010.0, Outcome.FIRED)] and plan.waiting is None


def test_a_tick_waiting_when_the_schedule_is_paused_is_skipped_not_kept_for_the_resume() -> None:
    paused = ScheduleState(last_tick=1010.0, waiting=1010.0, paused=True, previous_run="r1", previous_running=True)
    plan = plan_ticks("s", EVERY_10, Policies(overlap=Overlap.QUEUE), paused, now=1012.0)
    assert [(d.tick, d.outcome, d.reason) for d in plan.decisions] == \
        [(1010.0, Outcome.SKIPPED, "the schedule was paused while it waited")]
    assert plan.waiting is None and plan.next_fire == 1012.0 + PAUSED_LOOK


def test_a_paused_schedule_records_its_ticks_as_one_skipped_entry_per_look_a_minute_apart() -> None:
    every_second = Timing(every=1.0, start=1000.0)
    plan = plan_ticks("s", every_second, Policies(), ScheduleState(last_tick=1000.0, paused=True), now=1100.5)
    (skipped,) = plan.decisions
    assert (skipped.outcome, skipped.reason, skipped.tick, skipped.until, skipped.count) == \
        (Outcome.SKIPPED, "the schedule is paused", 1001.0, 1100.0, 100)
    assert plan.last_tick == 1100.0 and plan.next_fire == 1100.5 + PAUSED_LOOK
    assert plan_ticks("s", every_second, Policies(), ScheduleState(last_tick=1100.0, paused=True),
                      now=1100.7).decisions == []
    hourly = Timing(every=3600.0, start=0.0)  # a tick further off than a minute: looked at then, not sooner
    assert plan_ticks("s", hourly, Policies(), ScheduleState(last_tick=0.0, paused=True), now=10.0).next_fire == 3600.0


def test_overlap_cancel_names_the_run_to_cancel_and_allow_fires_beside_it() -> None:
    state = ScheduleState(last_tick=1000.0, previous_run="r1", previous_running=True)
    (cancel,) = plan_ticks("s", EVERY_10, Policies(overlap=Overlap.CANCEL), state, now=1010.0).decisions
    assert (cancel.outcome, cancel.cancel) == (Outcome.FIRED, "r1")
    (allow,) = plan_ticks("s", EVERY_10, Policies(overlap=Overlap.ALLOW), state, now=1010.0).decisions
    assert (allow.outcome, allow.cancel) == (Outcome.FIRED, None)


def test_paused_ticks_are_skipped_as_paused_and_still_handled() -> None:
    plan = plan_ticks("s", EVERY_10, Policies(), ScheduleState(last_tick=1000.0, paused=True), now=1010.0)
    assert [(d.outcome, d.reason) for d in plan.decisions] == [(Outcome.SKIPPED, "the schedule is paused")]
    assert plan.last_tick == 1010.0


@pytest.mark.parametrize("catchup, fired, missed", [(Catchup.ALL, 10, 0), (Catchup.LATEST, 1, 9),
                                                    (Catchup.NONE, 0, 10)])
def test_a_downtime_of_ten_ticks_by_catch_up_policy(catchup, fired, missed) -> None:
    # at 1106 the last tick (1100) is 6 s late: over a grace of 5 s, so all ten are late
    plan = plan_ticks("s", EVERY_10, Policies(catchup=catchup, grace=5.0), ScheduleState(last_tick=1000.0),
                      now=1106.0)
    fires = [d for d in plan.decisions if d.outcome is Outcome.FIRED]
    assert len(fires) == fired and plan.last_tick == 1100.0 and plan.next_fire == 1110.0
    misses = [d for d in plan.decisions if d.outcome is Outcome.MISSED]
    assert sum(d.count for d in misses) == missed
    if catchup is Catchup.LATEST:
        assert fires[0].tick == 1100.0 and misses[0].until == 1090.0
    if catchup is Catchup.ALL:
        assert [d.tick for d in fires] == [1010.0 + 10 * k for k in range(10)]  # in order


def test_catch_up_all_beyond_its_limit_records_the_oldest_as_missed() -> None:
    plan = plan_ticks("s", EVERY_10, Policies(catchup=Catchup.ALL, max_catchup=3), ScheduleState(last_tick=1000.0),
                      now=1100.5)
    # 1100 is on time (within the grace); of the nine late ones the three most recent fire
    assert [d.tick for d in plan.decisions if d.outcome is Outcome.FIRED] == [1070.0, 1080.0, 1090.0, 1100.0]
    (missed,) = [d for d in plan.decisions if d.outcome is Outcome.MISSED]
    assert (missed.tick, missed.until, missed.count) == (1010.0, 1060.0, 6) and "max-catchup" in missed.reason


def test_the_default_grace_covers_a_failover_but_a_given_grace_is_kept() -> None:
    late = ScheduleState(last_tick=1000.0)
    plan = plan_ticks("s", EVERY_10, Policies(catchup=Catchup.NONE), late, now=1017.0, least_grace=8.0)
    assert [d.outcome for d in plan.decisions] == [Outcome.FIRED]  # 7 s late: within the failover time
    plan = plan_ticks("s", EVERY_10, Policies(catchup=Catchup.NONE, grace=5.0), late, now=1017.0, least_grace=8.0)
    assert [d.outcome for d in plan.decisions] == [Outcome.MISSED]


def test_jitter_delays_the_next_fire_within_its_bound_and_adds_to_the_grace() -> None:
    timing = Timing(every=60.0, start=0.0, jitter=30.0)
    plan = plan_ticks("s", timing, Policies(catchup=Catchup.NONE, grace=1.0), ScheduleState(last_tick=0.0), now=1.0)
    assert plan.next_fire is not None and 60.0 <= plan.next_fire < 90.0
    fired = plan_ticks("s", timing, Policies(catchup=Catchup.NONE, grace=1.0), ScheduleState(last_tick=0.0),
                       now=plan.next_fire)
    assert [d.outcome for d in fired.decisions] == [Outcome.FIRED]


def test_a_schedule_past_its_end_needs_no_more_looks() -> None:
    timing = Timing(every=10.0, start=1000.0, end=1020.0)
    plan = plan_ticks("s", timing, Policies(), ScheduleState(last_tick=1010.0), now=1020.5)
    assert [d.tick for d in plan.decisions] == [1020.0] and plan.next_fire is None


def test_parse_moment_reads_local_times_in_the_zone_and_whole_days() -> None:
    assert parse_moment("2026-11-01T02:30", "Europe/Paris") == at(PARIS, 2026, 11, 1, 2, 30)
    assert parse_moment("2026-11-01T02:30+00:00", "Europe/Paris") == at(timezone.utc, 2026, 11, 1, 2, 30)
    assert parse_moment("2026-11-07", "UTC", end_of_day=True) == at(timezone.utc, 2026, 11, 8, 0, 0) - 1e-3
    with pytest.raises(ScheduleError, match="not an ISO 8601 date"):
        parse_moment("next tuesday", "UTC")
    assert iso(at(PARIS, 2026, 7, 1, 2, 30), "Europe/Paris") == "2026-07-01T02:30:00+02:00"


def test_like_debian_cron_an_expression_with_a_wildcard_in_minute_or_hour_drops_the_skipped_hour() -> None:
    """Pinned (README, Daylight saving): only fixed-time expressions move a skipped time to 03:00."""
    spring = (at(NEW_YORK, 2026, 3, 8, 0, 0) - 1, at(NEW_YORK, 2026, 3, 8, 6, 0))
    hours = lambda expression: [local(t, NEW_YORK)[11:] for t in  # noqa: E731
                                Timing(cron=expression, tz="America/New_York").between(*spring)]
    assert hours("0,30 2 * * *") == ["03:00 -0400"]  # fixed times: both moved to 03:00, fired once
    assert hours("*/30 2 * * *") == []
    assert hours("0 */2 * * *") == ["00:00 -0500", "04:00 -0400", "06:00 -0400"]
    assert hours("30 * * * *") == ["00:30 -0500", "01:30 -0500", "03:30 -0400", "04:30 -0400", "05:30 -0400"]
    fall = (at(NEW_YORK, 2026, 11, 1, 0, 0) - 1, at(NEW_YORK, 2026, 11, 1, 3, 0))
    ticks = Timing(cron="30 * * * *", tz="America/New_York").between(*fall)
    assert [local(t, NEW_YORK)[11:] for t in ticks] == ["00:30 -0400", "01:30 -0400", "02:30 -0500"]
