"""The workflow the schedule benchmark (bench/schedules.py) puts on its schedules: one no-op task."""
from __future__ import annotations

from typing import Any

from bench.tasks import noop
from orchestrator import Task, Workflow


def flow(params: dict[str, Any]) -> Workflow:
    workflow = Workflow("scheduled-noop")
    workflow.add_task(Task("noop", noop))
    return workflow
