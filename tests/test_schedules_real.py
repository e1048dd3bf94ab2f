"""Schedules with real ``orch coordinator`` processes, real ``orch worker`` processes and a real
redis-server: ticks fire on time with ``scheduled_at`` reaching the tasks, exactly once through
coordinator deaths, overlap, downtime catch-up, pause/resume/trigger/backfill/remove, and a target
that stops importing. Markers left by each execution (tests/schedule_tasks.py) prove what ran."""
from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from fault_helpers import TESTS_DIR, AofRedis, Processes, fast_processes, procs  # noqa: F401  (a fixture)
from schedule_tasks import marks
from shared import keys

pytestmark = pytest.mark.slow

TARGET = f"{TESTS_DIR / 'schedule_tasks.py'}:marking"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"not within {timeout} s: {what}")


def orch_ok(procs: Processes, args: list[str]) -> str:
    done = procs.orch(args)
    assert done.returncode == 0, f"orch {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def show(procs: Processes, name: str) -> dict[str, Any]:
    return json.loads(orch_ok(procs, ["schedule", "show", name, "--json"]))


def schedule_runs(procs: Processes, name: str) -> list[dict[str, Any]]:
    return json.loads(orch_ok(procs, ["runs", "--schedule", name, "--json", "-n", "1000"]))


def coordinator(procs: Processes, env: dict[str, str] | None = None) -> Any:
    return procs.start("coordinator", ["coordinator", "--redis-url", procs.redis_url, "--poll", "0.2",
                                       "--path", str(TESTS_DIR)], env=env)


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_an_every_2s_schedule_runs_each_tick_with_scheduled_at_reaching_the_tasks(procs: Processes) -> None:
    procs.workers(1)
    orch_ok(procs, ["schedule", "add", "beat", TARGET, "--every", "2s", "--param", "region=eu"])
    coordinator(procs)
    found = wait_for(lambda: len(marks(procs.directory)) >= 3 and marks(procs.directory), 15, "three ticks run")
    ticks = sorted(stamp(m["scheduled_at"]) for m in found)
    assert all(m["params"]["region"] == "eu" for m in found)
    assert [round(b - a, 3) for a, b in zip(ticks, ticks[1:])][:2] == [2.0, 2.0]
    runs = schedule_runs(procs, "beat")
    assert {r["schedule"] for r in runs} == {"beat"} and {r["trigger"] for r in runs} == {"fired"}
    for run in runs:
        if run["state"] == "success":  # created within a second of its tick
            assert 0 <= run["created_at"] - run["tick"] < 1.0, run
    status = json.loads(orch_ok(procs, ["status", runs[-1]["run_id"], "--json"]))
    assert status["schedule"] == "beat" and status["tick"] == runs[-1]["tick"]
    assert stamp(status["params"]["scheduled_at"]) == runs[-1]["tick"] and status["params"]["region"] == "eu"
    document = show(procs, "beat")
    assert len(document["next_fires"]) == 5 and document["runs"][0]["state"] in ("success", "running")


def test_three_coordinators_fire_each_of_30_ticks_once_while_one_is_killed_and_restarted(procs: Processes) -> None:
    procs.workers(2)
    orch_ok(procs, ["schedule", "add", "pulse", TARGET, "--every", "1s", "--overlap", "allow"])
    first = time.time()
    coordinators = [coordinator(procs) for _ in range(3)]
    time.sleep(8)
    coordinators[0].signal_all(signal.SIGKILL)
    time.sleep(6)
    coordinators[0] = coordinator(procs)
    time.sleep(8)
    coordinators[1].signal_all(signal.SIGKILL)
    wait_for(lambda: len(marks(procs.directory)) >= 36, 30, "36 ticks run")
    last = time.time() - 3  # ticks before this have had time to run
    ran = Counter(stamp(m["scheduled_at"]) for m in marks(procs.directory))
    twice = {tick: n for tick, n in ran.items() if n > 1}
    assert not twice, f"ticks run more than once: {twice}"
    expected = [t for t in (min(ran) + k for k in range(80)) if first + 1 < t < last]
    assert len(expected) >= 30
    lost = [t for t in expected if t not in ran]
    assert not lost, f"ticks never run: {lost}"
    runs = schedule_runs(procs, "pulse")
    assert len(runs) == len({r["tick"] for r in runs}), "two runs for one tick"


def test_the_coordinator_that_was_about_to_fire_dies_and_another_fires_within_the_lease_ttl(
        procs: Processes) -> None:
    procs.workers(1)
    orch_ok(procs, ["schedule", "add", "slowload", TARGET, "--every", "3s"])
    client = redis.Redis.from_url(procs.redis_url)
    tick = client.zscore(keys.SCHEDULES_DUE, "slowload")  # its first tick (no jitter)
    # This coordinator's loading of the target takes 30 s: it holds the claim when killed.
    doomed = coordinator(procs, env={"SCHEDULE_LOAD_PAUSE": "30"})
    wait_for(lambda: client.exists(keys.schedule_claim("slowload")), 10, "the doomed coordinator claims the tick")
    claimed_at = time.time()
    coordinator(procs)
    doomed.signal_all(signal.SIGKILL)
    run = wait_for(lambda: [r for r in schedule_runs(procs, "slowload") if abs(r["tick"] - tick) < 1e-3], 15,
                   "the tick fired by the other coordinator")[0]
    assert run["created_at"] - claimed_at <= 2.0 + 1.0 + 0.5, run  # ORCH_LEASE_TTL (2 s here) + 1 s, and a margin
    wait_for(lambda: any(stamp(m["scheduled_at"]) == tick for m in marks(procs.directory)), 15, "its run ran")
    assert len([r for r in schedule_runs(procs, "slowload") if abs(r["tick"] - tick) < 1e-3]) == 1


def _spans(found: list[dict[str, Any]], pause: float) -> list[tuple[float, float]]:
    return sorted((m["at"], m["at"] + pause) for m in found)


def test_overlap_skip_and_queue_with_a_task_slower_than_the_interval(procs: Processes) -> None:
    procs.workers(2)
    orch_ok(procs, ["schedule", "add", "skipper", TARGET, "--every", "1s", "--param", "pause=2.5",
                    "--param", "kind=skip"])
    orch_ok(procs, ["schedule", "add", "queuer", TARGET, "--every", "1s", "--param", "pause=2.5",
                    "--param", "kind=queue", "--overlap", "queue"])
    coordinator(procs)
    time.sleep(9)
    orch_ok(procs, ["schedule", "pause", "skipper"])
    orch_ok(procs, ["schedule", "pause", "queuer"])
    found = marks(procs.directory)
    for kind in ("skip", "queue"):
        mine = _spans([m for m in found if m["params"]["kind"] == kind], 2.5)
        assert len(mine) >= 2, (kind, mine)
        overlaps = [(a, b) for a, b in zip(mine, mine[1:]) if b[0] < a[1] - 0.05]
        assert not overlaps, f"{kind}: runs overlapped: {overlaps}"
    skipped = [t for t in show(procs, "skipper")["ticks"] if t["outcome"] == "skipped" and "paused" not in t["reason"]]
    assert skipped and all("still running (overlap 'skip')" in t["reason"] for t in skipped), skipped
    queued = show(procs, "queuer")["ticks"]
    assert any(t["outcome"] == "queued" for t in queued)
    assert any(t["outcome"] == "skipped" and "already waits" in t["reason"] for t in queued)
    started = sorted(m["at"] for m in found if m["params"]["kind"] == "queue")
    gaps = [b - a for a, b in zip(started, started[1:])]
    assert all(g < 2.5 + 2.0 for g in gaps), f"a queued tick waited long after the previous run ended: {gaps}"


def test_downtime_catch_up_all_latest_and_none(procs: Processes) -> None:
    procs.workers(2)
    for policy in ("all", "latest", "none"):
        orch_ok(procs, ["schedule", "add", f"down-{policy}", TARGET, "--every", "1s", "--catchup", policy,
                        "--grace", "1s", "--overlap", "allow", "--param", f"kind={policy}"])
    added = time.time()
    time.sleep(10.5)  # no coordinator for 10 ticks
    started = time.time()
    coordinator(procs)
    wait_for(lambda: len([m for m in marks(procs.directory) if m["params"]["kind"] == "all"]) >= 10, 20,
             "the ten missed ticks of 'all' run")
    time.sleep(1.5)
    found = marks(procs.directory)
    late = lambda m: stamp(m["scheduled_at"]) < started - 1.0  # noqa: E731  (ticks of the downtime)
    all_late = sorted(stamp(m["scheduled_at"]) for m in found if m["params"]["kind"] == "all" and late(m))
    assert len(all_late) == len(set(all_late)) >= 9 and all_late[0] - added < 1.5
    for policy in ("latest", "none"):
        missed = [t for t in show(procs, f"down-{policy}")["ticks"] if t["outcome"] == "missed"]
        assert len(missed) == 1 and f"catch-up '{policy}'" in missed[0]["reason"], missed
        until = stamp(missed[0]["until"])
        mine = sorted(stamp(m["scheduled_at"]) for m in found if m["params"]["kind"] == policy)
        assert not [t for t in mine if t <= until], (policy, mine, until)
        assert missed[0]["count"] + (1 if policy == "latest" else 0) >= 9
        if policy == "latest":  # it fired the most recent late tick: the one after the missed ones
            assert mine and mine[0] - until == 1.0


def test_pause_resume_trigger_backfill_and_remove(procs: Processes) -> None:
    procs.workers(2)
    orch_ok(procs, ["schedule", "add", "ops", TARGET, "--every", "1s", "--param", "kind=ops"])
    orch_ok(procs, ["schedule", "pause", "ops"])
    coordinator(procs)
    time.sleep(3)
    assert not marks(procs.directory)
    assert any(t["outcome"] == "skipped" and t["reason"] == "the schedule is paused"
               for t in show(procs, "ops")["ticks"])
    orch_ok(procs, ["schedule", "resume", "ops"])
    wait_for(lambda: marks(procs.directory), 5, "a run after resume")
    orch_ok(procs, ["schedule", "pause", "ops"])
    manual = orch_ok(procs, ["schedule", "trigger", "ops", "--param", "who=me"]).strip()
    wait_for(lambda: [m for m in marks(procs.directory) if m["run_id"] == manual], 10, "the manual run")
    record = [m for m in marks(procs.directory) if m["run_id"] == manual][0]
    assert record["params"]["who"] == "me" and record["params"]["kind"] == "ops"
    orch_ok(procs, ["schedule", "add", "hourly", TARGET, "--cron", "0 * * * *", "--tz", "Europe/Paris",
                    "--param", "kind=backfill"])
    backfilled = orch_ok(procs, ["schedule", "backfill", "hourly", "--from", "2026-11-01T00:00",
                                 "--to", "2026-11-01T03:00"]).split()
    assert len(backfilled) == 4
    wait_for(lambda: len([m for m in marks(procs.directory) if m["params"]["kind"] == "backfill"]) == 4, 20,
             "four backfill runs")
    stamps = sorted(m["scheduled_at"] for m in marks(procs.directory) if m["params"]["kind"] == "backfill")
    assert stamps == [f"2026-11-01T0{h}:00:00+01:00" for h in range(4)]
    runs = schedule_runs(procs, "ops")
    assert manual in {r["run_id"] for r in runs} and {"manual", "fired"} <= {r["trigger"] for r in runs}
    orch_ok(procs, ["schedule", "resume", "ops"])
    orch_ok(procs, ["schedule", "remove", "ops"])
    removed_at = time.time()
    gone = procs.orch(["schedule", "show", "ops"])
    assert gone.returncode == 2 and "no schedule named 'ops'" in gone.stderr
    assert {r["run_id"] for r in runs} <= {r["run_id"] for r in schedule_runs(procs, "ops")}
    time.sleep(2.5)
    late = [m for m in marks(procs.directory) if m["params"]["kind"] == "ops" and m["at"] > removed_at + 1.0]
    assert not late, f"runs after remove: {late}"
    listed = json.loads(orch_ok(procs, ["schedule", "list", "--json"]))
    assert [s["name"] for s in listed] == ["hourly"]


def test_a_target_that_stops_importing_records_a_failed_tick_and_the_schedule_goes_on(
        procs: Processes, tmp_path: Path) -> None:
    procs.workers(1)
    flow = tmp_path / "changing_flow.py"
    flow.write_text("from schedule_tasks import marking\n")
    orch_ok(procs, ["schedule", "add", "fragile", f"{flow}:marking", "--every", "1s", "--param", "kind=fragile",
                    "--no-check"])
    coordinator(procs)
    wait_for(lambda: marks(procs.directory), 10, "a first run")
    flow.write_text("from schedule_tasks import marking\ndef broken(:\n")
    failed = wait_for(lambda: [t for t in show(procs, "fragile")["ticks"] if t["outcome"] == "failed"], 10,
                      "a failed tick")
    assert "changing_flow.py" in failed[0]["reason"] and "SyntaxError" in failed[0]["reason"]
    flow.write_text("from schedule_tasks import marking\n")
    before = len(marks(procs.directory))
    wait_for(lambda: len(marks(procs.directory)) > before + 1, 10, "runs again once the file is fixed")


def test_overlap_cancel_stops_the_running_run_and_status_says_by_whom(procs: Processes) -> None:
    procs.workers(2)
    orch_ok(procs, ["schedule", "add", "canceller", TARGET, "--every", "2s", "--overlap", "cancel",
                    "--param", "pause=30", "--param", "kind=cancel"])
    coordinator(procs)
    wait_for(lambda: len(schedule_runs(procs, "canceller")) >= 3, 15, "three ticks fired")
    orch_ok(procs, ["schedule", "pause", "canceller"])
    runs = sorted(schedule_runs(procs, "canceller"), key=lambda r: r["tick"])
    first, second = runs[0], runs[1]
    # the first run's task started (its marker), then the second tick cancelled it: it ended long before 30 s
    wait_for(lambda: any(m["run_id"] == first["run_id"] for m in marks(procs.directory)), 10, "the first run ran")
    status = json.loads(orch_ok(procs, ["status", first["run_id"], "--json"]))
    assert status["state"] == "cancelled", status
    assert status["cancelled_by"] == "schedule canceller (overlap 'cancel')"
    assert status["tasks"][0]["state"] == "cancelled" and status["tasks"][0]["duration"] < 10
    assert status["finished_at"] - second["created_at"] < 5.0
    text = orch_ok(procs, ["status", first["run_id"]])
    assert "cancelled by schedule canceller (overlap 'cancel')" in text
    others = [t for t in show(procs, "canceller")["ticks"] if t["reason"] != "the schedule is paused"]
    assert not others, others  # every tick before the pause fired: none skipped, queued, missed or failed


def test_runs_of_an_unknown_schedule_is_an_error_but_a_removed_ones_are_listed(procs: Processes) -> None:
    unknown = procs.orch(["runs", "--schedule", "no-such-schedule"])
    assert unknown.returncode == 2 and "no schedule named 'no-such-schedule'" in unknown.stderr, unknown
    orch_ok(procs, ["schedule", "add", "gone", TARGET, "--every", "1h"])
    assert schedule_runs(procs, "gone") == []  # known, no run yet: an empty list
    run_id = orch_ok(procs, ["schedule", "trigger", "gone"]).strip()
    orch_ok(procs, ["schedule", "remove", "gone"])
    assert [r["run_id"] for r in schedule_runs(procs, "gone")] == [run_id]


@pytest.fixture
def aof_procs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AofRedis, Processes]]:
    """Processes on a redis-server of this test's own, with append-only persistence, to restart."""
    server = AofRedis(tmp_path / "aof-redis")
    server.start()
    try:
        with fast_processes(server.url, tmp_path, monkeypatch,
                            before_stop=lambda: server.process or server.start()) as started:
            yield server, started
    finally:
        server.stop()


def test_the_coordinator_keeps_firing_through_a_redis_restart(aof_procs: tuple[AofRedis, Processes]) -> None:
    server, procs = aof_procs
    procs.workers(1)
    orch_ok(procs, ["schedule", "add", "through", TARGET, "--every", "1s", "--overlap", "allow"])
    fired = coordinator(procs)
    wait_for(lambda: len(marks(procs.directory)) >= 3, 15, "three ticks before the restart")
    server.stop()  # a clean shutdown: the append-only file is complete
    time.sleep(3)
    server.start()
    restarted = time.time()
    wait_for(lambda: len([m for m in marks(procs.directory) if stamp(m["scheduled_at"]) > restarted + 1]) >= 3, 20,
             "three ticks after the restart")
    assert fired.alive(), fired.describe()
    ran = Counter(m["scheduled_at"] for m in marks(procs.directory))
    assert not [tick for tick, n in ran.items() if n > 1], ran


def test_a_six_field_cron_with_jitter_fires_each_tick_within_its_jitter(procs: Processes) -> None:
    procs.workers(1)
    out = orch_ok(procs, ["schedule", "add", "jittery", TARGET, "--cron", "*/2 * * * * *", "--jitter", "1.5s",
                          "--tz", "Europe/Paris", "--overlap", "allow"])
    assert "cron '*/2 * * * * *' in Europe/Paris; first tick 20" in out and ("+01:00" in out or "+02:00" in out)
    coordinator(procs)
    wait_for(lambda: len(schedule_runs(procs, "jittery")) >= 4, 20, "four ticks")
    runs = schedule_runs(procs, "jittery")
    offsets = sorted(r["created_at"] - r["tick"] for r in runs)
    assert all(r["tick"] % 2 == 0 for r in runs)
    assert offsets[0] >= 0 and offsets[-1] < 1.5 + 0.5, offsets  # within [0, jitter) and a loaded machine's margin
    assert offsets[-1] > 0.1, offsets  # spread, not all at the tick


def test_show_names_the_tick_waiting_behind_a_slow_run(procs: Processes) -> None:
    procs.workers(1)
    orch_ok(procs, ["schedule", "add", "waiter", TARGET, "--every", "1s", "--overlap", "queue", "--param", "pause=3"])
    coordinator(procs)

    def shown() -> str:
        out = orch_ok(procs, ["schedule", "show", "waiter"])
        return out if "waiting: tick" in out else ""

    text = wait_for(shown, 15, "a waiting tick shown")
    assert "starts when 20" in text and "ends (overlap 'queue')" in text, text


def test_a_year_of_downtime_on_one_second_ticks_is_handled_at_once(procs: Processes) -> None:
    procs.workers(2)
    client = redis.Redis.from_url(procs.redis_url)
    for name, timing in (("yearly-interval", ["--every", "1s"]), ("yearly-cron", ["--cron", "* * * * * *"])):
        orch_ok(procs, ["schedule", "add", name, TARGET, *timing, "--catchup", "all", "--max-catchup", "5",
                        "--grace", "1s", "--overlap", "allow", "--param", f"kind={name}",
                        "--start", datetime.fromtimestamp(time.time() - 400 * 86400).strftime("%Y-%m-%d")])
        client.hset(keys.schedule(name), "last_tick", repr(time.time() - 365 * 86400.0))  # as if down a year
    began = time.time()
    coordinator(procs)
    for name in ("yearly-interval", "yearly-cron"):
        missed = wait_for(lambda: [t for t in show(procs, name)["ticks"] if t["outcome"] == "missed"], 15,
                          f"{name}: the year recorded as missed")
        assert len(missed) == 1 and missed[0]["count"] >= 10_000, missed
        assert missed[0].get("at_least") is (True if name == "yearly-cron" else None), missed
    assert time.time() - began < 15
    for name in ("yearly-interval", "yearly-cron"):  # the five newest late ticks ran, then the schedule went on
        wait_for(lambda: len({m["scheduled_at"] for m in marks(procs.directory) if m["params"]["kind"] == name}) >= 7,
                 15, f"{name}: catch-up runs and on-time runs")
