"""Task functions of the benchmark workloads, imported by every system's workers as ``bench.tasks``.

Workers are started with the project root on their import path (``orch worker
--path``, ``rq worker --path``, Celery and Dask workers inherit ``PYTHONPATH``).
"""
from __future__ import annotations

import time
from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    """The no-op task: takes anything (Dask passes upstream results as arguments), returns None."""
    return None


def items(n: int) -> list[int]:
    """The list a mapped task maps over (the map workload)."""
    return list(range(n))


def sleep_for(seconds: float, *args: Any) -> None:
    time.sleep(seconds)
    return None
