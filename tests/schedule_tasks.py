"""Workflows the schedule tests put on schedules (tests/test_schedules_real.py).

``orch coordinator`` loads ``tests/schedule_tasks.py:marking`` at each tick (with the
schedule's parameters and ``scheduled_at``); ``orch worker --path tests`` runs ``mark``,
which leaves one marker file per execution, so a test counts how often each tick ran.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from workflow import Task, Workflow, current_task


def mark(directory: str, pause: float = 0.0) -> str:
    """Leave a marker of this execution: the run, and the tick it was for."""
    info = current_task()
    stamp = info.params.get("scheduled_at", "")
    Path(directory).mkdir(parents=True, exist_ok=True)
    record = {"run_id": info.run_id, "scheduled_at": stamp, "params": info.params, "at": time.time()}
    (Path(directory) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record, default=str))
    time.sleep(pause)
    return stamp


def marking(params: dict[str, Any]) -> Workflow:
    """One task that marks; ``pause`` (seconds) makes it slower than a short interval. With
    ``SCHEDULE_LOAD_PAUSE`` set, loading this target takes that long (a coordinator holding a
    tick's claim, to be killed)."""
    time.sleep(float(os.environ.get("SCHEDULE_LOAD_PAUSE") or 0))
    directory = os.path.join(os.environ.get("FAULT_DIR", "."), "marks")
    workflow = Workflow("marking")
    workflow.add_task(Task("mark", mark, args=(directory, float(params.get("pause", 0)))))
    return workflow


def marks(directory: Path) -> list[dict[str, Any]]:
    """Every marker left so far."""
    found = []
    for path in sorted((directory / "marks").glob("*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:
            continue  # being written
    return found
