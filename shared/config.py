"""Settings shared by coordinator and workers, with their defaults and environment variables."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@dataclass(frozen=True)
class Settings:
    """``retention``: seconds a finished run's keys stay in Redis (``ORCH_RETENTION``, 7 days).
    ``max_result_bytes``: largest encoded result a task may return (``ORCH_MAX_RESULT_BYTES``, 16 MiB).
    ``kill_grace``: seconds past an attempt's timeout after which the worker's parent
    process kills a task that ignored the timeout (``ORCH_KILL_GRACE``, 2 s).
    """

    retention: int = field(default_factory=lambda: _env_int("ORCH_RETENTION", 7 * 24 * 3600))
    max_result_bytes: int = field(default_factory=lambda: _env_int("ORCH_MAX_RESULT_BYTES", 16 * 1024 * 1024))
    kill_grace: float = field(default_factory=lambda: _env_float("ORCH_KILL_GRACE", 2.0))


NO_TIMEOUT = 365 * 24 * 3600
"""The RQ job timeout used for tasks without a timeout (RQ has no "none")."""
