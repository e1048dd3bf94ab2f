"""Schedules in Redis (orchestrator/schedules.py) and the service that fires them
(orchestrator/schedule_service.py) on fakeredis with an injected clock: bad input writes
nothing, each tick starts at most one run even when two coordinators race for it, and a
schedule written by someone without the signing key, or naming a module outside the
allowlist, never loads."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest

import orchestrator.schedule_service as service_module
from orchestrator.schedule_service import ScheduleService
from orchestrator.schedules import (add_schedule, backfill_schedule, describe_schedule, list_schedules,
                                    pause_schedule, remove_schedule, resume_schedule, trigger_schedule)
from orchestrator.run_views import find_runs
from orchestrator.schedule_logic import iso
from shared import codec, keys
from shared.errors import ScheduleError, ScheduleExistsError, ScheduleNotFoundError, TargetError
from shared.params import decode_params

TARGET = f"{Path(__file__).parent / 'schedule_tasks.py'}:marking"
T0 = 1_800_000_000.0  # a whole minute


@pytest.fixture
def conn() -> Any:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def service(conn: Any, clock: Clock) -> ScheduleService:
    return ScheduleService(conn, clock=clock, poll=0.25)


def runs_of(conn: Any, name: str) -> list[Any]:
    return find_runs(conn, schedule=name, limit=100)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "bad name"}, "schedule name 'bad name'"),
    ({"name": "../x"}, "schedule name '../x'"),
    ({"cron": "61 * * * *"}, "cron expression '61 * * * *'"),
    ({"cron": "* * *"}, "cron expression"),
    ({"cron": "0 * * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"cron": "0 * * * *", "every": "1m"}, "not both"),
    ({"every": None}, "needs a cron expression or an interval"),
    ({"every": "0.5s"}, "shorter than 1 s"),
    ({"every": "soon"}, "is not a number with a unit"),
    ({"overlap": "sometimes"}, "overlap 'sometimes': expected one of skip, queue, allow, cancel"),
    ({"start": "tomorrow"}, "'tomorrow' is not an ISO 8601 date"),
    ({"end": "2020-01-01"}, "schedule 'nightly' would never fire: its end"),
    ({"start": "2031-01-02", "end": "2031-01-01"}, "would never fire"),
    ({"max_catchup": 1001}, "max catch-up 1001: expected a whole number from 0 to 1000"),
    ({"jitter": "1m"}, "jitter 60 s is not shorter than the schedule's interval"),
    ({"cron": "*/5 * * * *", "jitter": "10m"}, "jitter 600 s is not shorter than the schedule's interval .300 s"),
    ({"target": "no_such_module_here:flow"}, "no module named 'no_such_module_here'"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(conn: Any, kwargs: dict, message: str) -> None:
    args = {"name": "nightly", "target": TARGET, **({} if "cron" in kwargs else {"every": "1m"}), **kwargs}
    if "every" in args and args["every"] is None:
        args.pop("every")
    with pytest.raises((ScheduleError, TargetError), match=message.replace("(", r"\(").replace("*", r"\*")):
        add_schedule(conn, args.pop("name"), args.pop("target"), **args)
    assert conn.keys("*") == []


def test_a_name_in_use_is_refused_and_the_schedule_kept(conn: Any) -> None:
    add_schedule(conn, "nightly", TARGET, cron="30 2 * * *", tz="Europe/Paris", now=T0)
    before = conn.hgetall(keys.schedule("nightly"))
    with pytest.raises(ScheduleExistsError, match="a schedule named 'nightly' exists already"):
        add_schedule(conn, "nightly", TARGET, every="1s", now=T0)
    assert conn.hgetall(keys.schedule("nightly")) == before
    with pytest.raises(ScheduleNotFoundError, match="no schedule named 'other'"):
        pause_schedule(conn, "other")


def test_a_tick_fires_one_run_with_its_schedule_tick_and_scheduled_at(conn: Any) -> None:
    add_schedule(conn, "beat", TARGET, every="10s", params={"region": "eu"}, now=T0)
    clock = Clock(T0 + 5)
    first = service(conn, clock)
    assert first.step() > 0 and runs_of(conn, "beat") == []
    clock.now = T0 + 10.3
    first.step()
    (run,) = runs_of(conn, "beat")
    assert (run.schedule, run.tick, run.trigger) == ("beat", T0 + 10, "fired")
    params = decode_params(conn.hget(keys.run(run.run_id), "params"))
    assert params == {"region": "eu", "scheduled_at": "2027-01-15T08:00:10+00:00"}
    assert conn.zscore(keys.SCHEDULES_DUE, "beat") == T0 + 20
    service(conn, clock).step()  # another coordinator, same moment: nothing more
    assert len(runs_of(conn, "beat")) == 1


def test_a_tick_at_the_start_fires_on_time_and_the_ticks_stop_at_the_end(conn: Any) -> None:
    add_schedule(conn, "window", TARGET, every="10s", start=T0 + 30, end=T0 + 50, overlap="allow", now=T0)
    assert conn.zscore(keys.SCHEDULES_DUE, "window") == T0 + 30  # its first tick is the start itself
    clock = Clock(T0 + 30.1)
    svc = service(conn, clock)
    svc.step()
    assert [run.tick for run in runs_of(conn, "window")] == [T0 + 30]
    for moment in (T0 + 40.1, T0 + 50.1, T0 + 60.1):
        clock.now = moment
        svc.step()
    assert sorted(run.tick for run in runs_of(conn, "window")) == [T0 + 30, T0 + 40, T0 + 50]
    assert conn.zscore(keys.SCHEDULES_DUE, "window") is None
    document = describe_schedule(conn, "window", now=clock.now)
    assert document["next_fires"] == [] and document["next"] is None and document["ended"]


def test_a_catch_up_longer_than_the_claim_ttl_renews_the_claim_and_commits(
        conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_LEASE_TTL", "1")
    monkeypatch.setenv("SCHEDULE_LOAD_PAUSE", "0.3")  # each tick's target takes 0.3 s to load: 6 take 1.8 s
    add_schedule(conn, "slow", TARGET, every="10s", catchup="all", grace="1s", overlap="allow", check=False, now=T0)
    svc = service(conn, Clock(T0 + 65))
    svc.step()
    assert sorted(run.tick for run in runs_of(conn, "slow")) == [T0 + 10 * k for k in range(1, 7)]
    assert conn.get(keys.schedule_claim("slow")) is None  # released
    conn.set(keys.schedule_claim("slow"), "another coordinator's token")  # ours lapsed and another took it
    svc._held, svc._renewed_at = ["slow"], 0.0
    with pytest.raises(service_module.TickTaken, match="claim lapsed"):
        svc._keep_claim("slow")


def test_a_batch_longer_than_the_claim_ttl_keeps_every_claim_and_commits_them_all(
        conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_LEASE_TTL", "1")
    monkeypatch.setenv("SCHEDULE_LOAD_PAUSE", "0.3")  # six schedules' targets take 1.8 s to load in all
    for i in range(6):
        add_schedule(conn, f"s{i}", TARGET, every="10s", overlap="allow", check=False, now=T0)
    service(conn, Clock(T0 + 10.5)).step()
    assert [len(runs_of(conn, f"s{i}")) for i in range(6)] == [1] * 6


def test_two_coordinators_racing_for_one_tick_start_one_run(conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    add_schedule(conn, "race", TARGET, every="10s", now=T0)
    clock = Clock(T0 + 10.1)
    slow, fast = service(conn, clock), service(conn, clock)
    real_start_run = service_module.start_run
    calls: list[str] = []

    def paused_past_its_claim(*args: Any, **kwargs: Any) -> str:
        if not calls:  # the slow coordinator, while it loads the target: its claim lapses, the other fires
            calls.append("slow")
            conn.delete(keys.schedule_claim("race"))
            assert fast.handle("race")
        return real_start_run(*args, **kwargs)

    monkeypatch.setattr(service_module, "start_run", paused_past_its_claim)
    assert slow.handle("race") == []  # its commit is refused: nothing written
    (run,) = runs_of(conn, "race")
    assert run.tick == T0 + 10
    assert len(conn.keys(keys.run("*") + "")) >= 1 and len(conn.zrange(keys.RUNS, 0, -1)) == 1
    history = [json.loads(x) for x in conn.lrange(keys.schedule_ticks("race"), 0, -1)]
    assert [h["outcome"] for h in history] == ["fired"]


def test_pause_skips_and_remove_keeps_the_runs(conn: Any) -> None:
    add_schedule(conn, "ops", TARGET, every="10s", now=T0)
    clock = Clock(T0 + 10.1)
    svc = service(conn, clock)
    svc.step()
    pause_schedule(conn, "ops")
    clock.now = T0 + 20.1
    svc.step()
    document = describe_schedule(conn, "ops", now=clock.now)
    assert document["paused"] and [t["reason"] for t in document["ticks"]] == ["the schedule is paused"]
    assert len(document["runs"]) == 1 and len(document["next_fires"]) == 5
    manual = trigger_schedule(conn, "ops", {"who": "me"}, now=clock.now)
    assert runs_of(conn, "ops")[0].run_id == manual and runs_of(conn, "ops")[0].trigger == "manual"
    remove_schedule(conn, "ops")
    assert list_schedules(conn) == [] and conn.zscore(keys.SCHEDULES_DUE, "ops") is None
    assert len(runs_of(conn, "ops")) == 2  # the history of its runs stays
    with pytest.raises(ScheduleNotFoundError):
        describe_schedule(conn, "ops")


def test_a_paused_schedule_is_looked_at_once_a_minute_and_resume_records_the_rest(conn: Any) -> None:
    add_schedule(conn, "quiet", TARGET, every="1s", overlap="allow", now=T0)
    pause_schedule(conn, "quiet")
    clock = Clock(T0 + 1.1)
    svc = service(conn, clock)
    svc.step()  # its first tick: recorded as skipped, and the next look a minute later
    assert conn.zscore(keys.SCHEDULES_DUE, "quiet") == pytest.approx(T0 + 61.1)
    clock.now = T0 + 30.5
    svc.step()  # not due: nothing looked at
    resume_schedule(conn, "quiet", now=T0 + 30.5)
    history = [json.loads(x) for x in conn.lrange(keys.schedule_ticks("quiet"), 0, -1)]
    assert [(h["outcome"], h["reason"], h["tick"], h.get("count"), h.get("until")) for h in history] == [
        ("skipped", "the schedule is paused", T0 + 2, 29, T0 + 30),
        ("skipped", "the schedule is paused", T0 + 1, None, None)]
    assert conn.zscore(keys.SCHEDULES_DUE, "quiet") == T0 + 31  # fires from its next tick on
    clock.now = T0 + 31.1
    svc.step()
    assert [run.tick for run in runs_of(conn, "quiet")] == [T0 + 31]  # none of the paused ticks fired late
    newest = describe_schedule(conn, "quiet", now=clock.now)["ticks"][0]
    assert (newest["count"], newest["tick"], newest["until"]) == (29, iso(T0 + 2, "UTC"), iso(T0 + 30, "UTC"))


def test_backfill_starts_one_run_per_tick_in_the_zone_and_refuses_a_huge_range(conn: Any) -> None:
    add_schedule(conn, "daily", TARGET, cron="30 2 * * *", tz="Europe/Paris", now=T0)
    run_ids = backfill_schedule(conn, "daily", "2026-10-24", "2026-10-26")
    stamps = [decode_params(conn.hget(keys.run(r), "params"))["scheduled_at"] for r in run_ids]
    assert stamps == ["2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    with pytest.raises(ScheduleError, match="more than 1000 ticks"):
        backfill_schedule(conn, "daily", "2020-01-01", "2026-01-01")
    with pytest.raises(ScheduleError, match="the end is before the start"):
        backfill_schedule(conn, "daily", "2026-10-26", "2026-10-24")
    assert len(runs_of(conn, "daily")) == 3


@pytest.mark.parametrize("cron, tz, start, end, expected", [
    ("30 2 * * *", "Europe/Paris", "2026-03-28", "2026-03-30",
     ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    ("30 1 * * *", "America/New_York", "2026-10-31", "2026-11-02",
     ["2026-10-31T01:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    ("0 * * * *", "America/New_York", "2026-11-01T00:00", "2026-11-01T03:00",
     ["2026-11-01T00:00:00-04:00", "2026-11-01T01:00:00-04:00", "2026-11-01T02:00:00-05:00",
      "2026-11-01T03:00:00-05:00"]),
    ("0 2 * * *", "America/New_York", "2026-03-07", "2026-03-09",
     ["2026-03-07T02:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"]),
])
def test_backfill_across_a_dst_change_runs_once_per_local_tick(conn: Any, cron: str, tz: str, start: str, end: str,
                                                               expected: list[str]) -> None:
    add_schedule(conn, "dst", TARGET, cron=cron, tz=tz, now=T0)
    run_ids = backfill_schedule(conn, "dst", start, end)
    assert [decode_params(conn.hget(keys.run(r), "params"))["scheduled_at"] for r in run_ids] == expected


def test_backfill_reaches_before_the_schedule_was_added_or_its_start(conn: Any) -> None:
    add_schedule(conn, "hourly", TARGET, every="1h", now=T0 + 0.4)  # ticks at T0 + k hours
    run_ids = backfill_schedule(conn, "hourly", T0 - 3 * 3600 - 1, T0 - 1)
    assert [run.tick for run in sorted(runs_of(conn, "hourly"), key=lambda r: r.tick)] == \
        [T0 - 3 * 3600, T0 - 2 * 3600, T0 - 3600]
    assert len(run_ids) == 3
    add_schedule(conn, "later", TARGET, cron="0 3 * * *", start="2031-01-01", now=T0)
    assert len(backfill_schedule(conn, "later", "2026-11-01", "2026-11-02")) == 2


def test_a_damaged_schedule_is_an_error_line_and_the_service_goes_on(conn: Any) -> None:
    add_schedule(conn, "broken", TARGET, every="10s", now=T0)
    add_schedule(conn, "fine", TARGET, every="10s", now=T0)
    conn.hset(keys.schedule("broken"), "definition", "{not json")
    with pytest.raises(ScheduleError, match="schedule 'broken' is damaged in Redis"):
        describe_schedule(conn, "broken")
    clock = Clock(T0 + 10.1)
    service(conn, clock).step()
    assert len(runs_of(conn, "fine")) == 1 and runs_of(conn, "broken") == []
    assert conn.zscore(keys.SCHEDULES_DUE, "broken") > clock.now + 30  # looked at again later, not in a loop


def _failed_reasons(conn: Any, name: str) -> list[str]:
    return [json.loads(x).get("reason", "") for x in conn.lrange(keys.schedule_ticks(name), 0, -1)
            if json.loads(x)["outcome"] == "failed"]


def test_with_a_signing_key_a_schedule_forged_or_tampered_in_redis_never_loads(
        conn: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORCH_SIGNING_KEY", "k" * 32)
    marker = tmp_path / "imported"
    evil = tmp_path / "evil_flow.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    add_schedule(conn, "signed", TARGET, every="10s", now=T0)
    add_schedule(conn, "tampered", TARGET, every="10s", now=T0)
    definition = json.loads(conn.hget(keys.schedule("tampered"), "definition"))
    definition["target"] = f"{evil}:workflow"  # an attacker who can write to Redis, without the key
    conn.hset(keys.schedule("tampered"), "definition", json.dumps(definition))
    conn.hset(keys.schedule("forged"), mapping={**{k.decode(): v for k, v in
                                                   conn.hgetall(keys.schedule("tampered")).items()},
                                                "signature": "0" * 64})
    conn.sadd(keys.SCHEDULES, "forged")
    conn.zadd(keys.SCHEDULES_DUE, {"forged": T0 + 10})
    conn.hset(keys.schedule("params"), mapping={k.decode(): v for k, v in
                                                conn.hgetall(keys.schedule("signed")).items()})
    conn.hset(keys.schedule("params"), "params", codec.encode({"region": "attacker"}))
    conn.zadd(keys.SCHEDULES_DUE, {"params": T0 + 10})
    service(conn, Clock(T0 + 10.1)).step()
    assert len(runs_of(conn, "signed")) == 1
    for name in ("tampered", "forged", "params"):
        assert runs_of(conn, name) == [], name
        assert any("is not signed with this coordinator's key" in r for r in _failed_reasons(conn, name)), name
    assert not marker.exists()


def test_a_coordinator_loads_no_schedule_target_outside_its_allowlist(
        conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    add_schedule(conn, "mine", TARGET, every="10s", overlap="allow", now=T0)
    conn.hset(keys.schedule("stdlib"), mapping={k.decode(): v for k, v in conn.hgetall(keys.schedule("mine")).items()})
    definition = json.loads(conn.hget(keys.schedule("stdlib"), "definition"))
    definition["target"] = "antigravity:workflow"
    conn.hset(keys.schedule("stdlib"), "definition", json.dumps(definition))
    conn.zadd(keys.SCHEDULES_DUE, {"stdlib": T0 + 10})
    service(conn, Clock(T0 + 10.1)).step()
    assert runs_of(conn, "stdlib") == [] and len(runs_of(conn, "mine")) == 1
    assert "target module 'antigravity' is not allowed" in _failed_reasons(conn, "stdlib")[0]
    monkeypatch.setenv("ORCH_ALLOW", "etl")
    service(conn, Clock(T0 + 20.1)).step()
    assert len(runs_of(conn, "mine")) == 1
    assert "target module 'schedule_tasks' is not allowed on this coordinator (allowed: etl" in \
        _failed_reasons(conn, "mine")[0]


def test_two_coordinators_share_a_minute_of_ticks_each_fired_once(conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(250):
        add_schedule(conn, f"m{i}", TARGET, cron="* * * * *", overlap="allow", check=False, now=T0 - 30)
    clock = Clock(T0 + 0.5)
    first, second = service(conn, clock), service(conn, clock)
    real_start_run = service_module.start_run
    by_second: list[str] = []

    def meanwhile(*args: Any, **kwargs: Any) -> str:
        if not by_second and not getattr(meanwhile, "busy", False):  # while the first holds its first batch
            meanwhile.busy = True  # type: ignore[attr-defined]
            by_second.extend(second.handle_all([f"m{i}" for i in range(250)])[0])
        return real_start_run(*args, **kwargs)

    monkeypatch.setattr(service_module, "start_run", meanwhile)
    first.step()
    assert 0 < len(by_second) < 250  # the second took what the first did not hold
    ticks = [conn.zrange(keys.schedule_runs(f"m{i}"), 0, -1) for i in range(250)]
    assert all(len(t) == 1 for t in ticks), "a schedule fired twice or not at all"
    assert conn.zcard(keys.RUNS) == 250


def test_list_and_show_say_ended_paused_and_waiting(conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import orchestrator.cli_schedules as cli_schedules
    from orchestrator.cli import main

    monkeypatch.setattr(cli_schedules, "connect", lambda url: conn)
    now = __import__("time").time()
    add_schedule(conn, "done", TARGET, every="1h", start=now - 3599.5, end=now + 1, now=now - 1)  # one tick left
    add_schedule(conn, "held", TARGET, every="1h", overlap="queue", now=now)
    pause_schedule(conn, "held")
    conn.hset(keys.schedule("held"), mapping={"waiting": repr(T0), "last_run": "20270115T080000-abc"})
    conn.hset(keys.schedule("done"), "last_tick", repr(now + 1))
    runner = CliRunner()
    listed = runner.invoke(main, ["schedule", "list", "--redis-url", "redis://unused"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:] if line.strip()}
    assert rows["done"].split()[1] == "ended" and "every 1h" in rows["done"]
    assert "(paused)" in listed.output
    shown = runner.invoke(main, ["schedule", "show", "held", "--redis-url", "redis://unused"]).output
    assert "next (paused: skipped unless resumed): " in shown
    assert "waiting: tick 2027-01-15T08:00:00+00:00 starts when 20270115T080000-abc ends (overlap 'queue')" in shown
    ended = runner.invoke(main, ["schedule", "show", "done", "--redis-url", "redis://unused"]).output
    assert "next: none (the schedule has ended)" in ended


def test_show_gives_each_next_fire_time_with_its_jitter(conn: Any) -> None:
    add_schedule(conn, "spread", TARGET, cron="0 * * * *", jitter="30m", now=T0)
    fires = describe_schedule(conn, "spread", now=T0)["next_fires"]
    hours = [datetime.fromisoformat(text).timestamp() for text in fires]
    ticks = [T0 - T0 % 3600 + 3600 * k for k in range(1, 6)]
    assert all(tick <= fire < tick + 1800 for tick, fire in zip(ticks, hours)), (fires, ticks)
    assert hours != ticks  # the offsets are there (a sha-256 offset of exactly 0 five times: never)
