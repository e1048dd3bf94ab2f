"""Settings shared by coordinator and workers, with their defaults and environment variables."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from shared.errors import SettingError


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def max_result_bytes() -> int:
    """``ORCH_MAX_RESULT_BYTES`` alone (a worker reads it for every attempt: cheaper than a
    whole :class:`Settings`, which reads every variable)."""
    return _env_int("ORCH_MAX_RESULT_BYTES", 16 * 1024 * 1024)


def heartbeat_socket_timeout(heartbeat_ttl: float) -> float:
    """How long a heartbeat waits for Redis's reply before it gives up and the next one reconnects: a
    quarter of the TTL (1 s at the least), so that a reply lost on the network (a connection that went
    silent) costs a beat or two, never the worker's life."""
    return max(1.0, heartbeat_ttl / 4)


def max_map_length() -> int:
    """``ORCH_MAX_MAP_LENGTH``: the most children a mapped task may expand into (10,000)."""
    return _env_int("ORCH_MAX_MAP_LENGTH", 10_000)


def retention() -> int:
    """``ORCH_RETENTION`` alone: seconds a finished run's keys stay in Redis (7 days)."""
    return _env_int("ORCH_RETENTION", 7 * 24 * 3600)


MIN_LOG_BYTES = 4096


def max_log_bytes() -> int:
    """``ORCH_MAX_LOG_BYTES``: the most an attempt's stored log may hold (1 MiB; 4 KiB at the least);
    past it the log keeps its first and last parts. Each line counts its UTF-8 bytes and newline
    plus ``shared.log_records.LINE_OVERHEAD``. A bad value raises :class:`SettingError`."""
    try:
        return max(MIN_LOG_BYTES, _env_int("ORCH_MAX_LOG_BYTES", 1024 * 1024))
    except ValueError:
        raise SettingError("ORCH_MAX_LOG_BYTES", os.environ["ORCH_MAX_LOG_BYTES"], "a whole number of bytes") from None


def task_log_level() -> int:
    """``ORCH_TASK_LOG_LEVEL``: the least severe ``logging`` record an attempt's log keeps (a level
    name or number; INFO by default). A bad value raises :class:`SettingError`."""
    value = (os.environ.get("ORCH_TASK_LOG_LEVEL") or "INFO").strip()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise SettingError("ORCH_TASK_LOG_LEVEL", value, "a logging level (DEBUG, INFO, WARNING, ERROR)")
    return level


def check_log_settings() -> None:
    """Raise :class:`SettingError` now for a bad ``ORCH_TASK_LOG_LEVEL`` or ``ORCH_MAX_LOG_BYTES``
    (what runs attempts checks at start; the capture itself falls back to the defaults)."""
    task_log_level()
    max_log_bytes()


def max_payload_bytes() -> int:
    """``ORCH_MAX_PAYLOAD_BYTES``: the largest encoded arguments of one task (1 MiB), refused at submit."""
    return _env_int("ORCH_MAX_PAYLOAD_BYTES", 1024 * 1024)


def max_tasks() -> int:
    """``ORCH_MAX_TASKS``: the most tasks one run may have (1,000,000), refused at submit."""
    return _env_int("ORCH_MAX_TASKS", 1_000_000)


JOB_ENTRY_OVERHEAD = 64 * 1024
"""Room in a job entry for what is not the payload (run id, task name, function, signature)."""


def max_job_entry_bytes() -> int:
    """The longest job entry a worker reads: twice ``ORCH_MAX_PAYLOAD_BYTES`` (embedding the payload
    in the entry escapes its quotes and backslashes, at most doubling it) plus
    :data:`JOB_ENTRY_OVERHEAD`. A longer one no honest coordinator wrote: refused unread."""
    return 2 * max_payload_bytes() + JOB_ENTRY_OVERHEAD


@dataclass(frozen=True)
class Settings:
    """Tunables, each read from its environment variable when not given.

    ``retention``: seconds a finished run's keys stay in Redis (``ORCH_RETENTION``, 7 days).
    ``max_result_bytes``: largest encoded result a task may return (``ORCH_MAX_RESULT_BYTES``, 16 MiB).
    ``kill_grace``: seconds past an attempt's timeout after which the worker's parent
    process kills a task that ignored the timeout (``ORCH_KILL_GRACE``, 2 s).
    ``heartbeat_ttl``: a worker busy with an attempt renews its heartbeat key every
    second with this TTL; once it lapses the coordinator fails the attempt as
    "worker lost" and retries it (``ORCH_HEARTBEAT_TTL``, 8 s; 2 s at the least). The
    coordinator looks once a second, so a dead worker is noticed within TTL + 2 s:
    10 s by default.
    ``lease_ttl``: a coordinator renews its lease on a run every second; another
    coordinator may adopt the run once it lapses (``ORCH_LEASE_TTL``, 5 s).
    ``outage``: how long the coordinator keeps retrying an unreachable Redis
    before giving up (``ORCH_REDIS_OUTAGE``, 120 s).
    """

    retention: int = field(default_factory=retention)
    max_result_bytes: int = field(default_factory=max_result_bytes)
    kill_grace: float = field(default_factory=lambda: _env_float("ORCH_KILL_GRACE", 2.0))
    heartbeat_ttl: float = field(default_factory=lambda: max(2.0, _env_float("ORCH_HEARTBEAT_TTL", 8.0)))
    lease_ttl: float = field(default_factory=lambda: max(1.0, _env_float("ORCH_LEASE_TTL", 5.0)))
    outage: float = field(default_factory=lambda: _env_float("ORCH_REDIS_OUTAGE", 120.0))


NO_TIMEOUT = 365 * 24 * 3600
"""The RQ job timeout used for tasks without a timeout (RQ has no "none")."""
