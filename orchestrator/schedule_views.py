"""What ``orch schedule list`` and ``orch schedule show`` say (their ``--json`` documents): the
read-only views of :mod:`orchestrator.schedules`, which re-exports them as its Python API."""
from __future__ import annotations

import json
import time
from typing import Any, Mapping, Optional

import redis

from orchestrator.run_store import read_run
from orchestrator.run_views import schedule_run_ids
from orchestrator.schedule_logic import Outcome, fire_at, iso
from orchestrator.schedules import HISTORY, Schedule, as_number, as_text, load_schedule, run_state
from shared import keys
from shared.errors import RunNotFoundError, ScheduleError, ScheduleNotFoundError


def list_schedules(connection: redis.Redis, now: Optional[float] = None) -> list[dict[str, Any]]:
    """``orch schedule list --json``: every schedule, by name."""
    now = time.time() if now is None else now
    out = []
    for name in sorted(as_text(raw) for raw in connection.smembers(keys.SCHEDULES)):
        try:
            schedule, record = load_schedule(connection, name)
        except (ScheduleNotFoundError, ScheduleError):
            continue
        out.append(_summary(connection, schedule, record, now))
    return out


def _summary(connection: redis.Redis, schedule: Schedule, record: Mapping[str, Any], now: float) -> dict[str, Any]:
    upcoming = schedule.timing.next_tick(max(now, as_number(record.get("last_tick")) or 0.0))
    last_run = record.get("last_run") or None
    return {"name": schedule.name, "target": schedule.target, "timing": schedule.describe_timing(),
            "cron": schedule.timing.cron, "every": schedule.timing.every, "tz": schedule.timing.tz,
            "paused": record.get("paused") == "1", "ended": upcoming is None,
            "next": None if upcoming is None else iso(upcoming, schedule.timing.tz),
            "last_run": last_run, "last_run_state": run_state(connection, last_run),
            "overlap": schedule.policies.overlap.value, "catchup": schedule.policies.catchup.value}


def describe_schedule(connection: redis.Redis, name: str, now: Optional[float] = None,
                      runs: int = 10, ticks: int = 20) -> dict[str, Any]:
    """``orch schedule show --json``: the definition, the next 5 fire times, the last runs with
    their states, and the ticks skipped, missed, queued or failed, with why."""
    schedule, record = load_schedule(connection, name)
    now = time.time() if now is None else now
    document = _summary(connection, schedule, record, now)
    tz = schedule.timing.tz
    after = max(now, as_number(record.get("last_tick")) or 0.0)
    upcoming = []
    for tick in schedule.timing.ticks(after):  # when each fires: its tick plus its jitter offset
        upcoming.append(iso(fire_at(name, tick, schedule.timing.jitter), tz))
        if len(upcoming) == 5:
            break
    last_runs = []
    for run_id in schedule_run_ids(connection, name, runs):
        try:
            snapshot = read_run(connection, run_id)
        except RunNotFoundError:
            continue
        last_runs.append({"run_id": run_id, "state": snapshot.state, "created_at": snapshot.created_at,
                          "trigger": snapshot.trigger,
                          "tick": None if snapshot.tick is None else iso(snapshot.tick, tz)})
    history = []
    for raw in connection.lrange(keys.schedule_ticks(name), 0, HISTORY - 1):
        try:
            entry = json.loads(raw)
            entry["tick"] = iso(float(entry["tick"]), tz)
            if entry.get("until") is not None:
                entry["until"] = iso(float(entry["until"]), tz)
        except (ValueError, TypeError, KeyError):
            continue
        if entry.get("outcome") not in (Outcome.FIRED.value, Outcome.MANUAL.value, Outcome.BACKFILL.value):
            history.append(entry)
        if len(history) >= ticks:
            break
    document.update({"params": schedule.params, "start": schedule.timing.start or None, "end": schedule.timing.end,
                     "jitter": schedule.timing.jitter, "max_catchup": schedule.policies.max_catchup,
                     "grace": schedule.policies.grace, "next_fires": upcoming, "runs": last_runs,
                     "ticks": history, "waiting": as_number(record.get("waiting"))})
    return document
