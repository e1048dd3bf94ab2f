"""Task functions and workflows for the rerun and parameter tests (imported by workers as ``rerun_tasks``).

Every task appends a line to a marker file named after it in a directory the
test gives, so a test can tell which tasks ran (again) by counting lines, on
any backend and any worker kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator import Task, Workflow, current_task


def mark(directory: str, name: str) -> str:
    """Record one run of ``name``; return it."""
    with open(Path(directory) / name, "a") as marker:
        marker.write(f"{current_task().attempt}\n")
    return name


def runs(directory: Path, name: str) -> list[int]:
    """The attempt numbers of the runs of ``name`` recorded in ``directory``, in order."""
    path = directory / name
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def step(directory: str, name: str) -> str:
    return mark(directory, name)


def read_input(directory: str, name: str) -> str:
    """Fail while the input file ``directory/input`` says ``bad``."""
    mark(directory, name)
    text = (Path(directory) / "input").read_text().strip()
    print(f"read input: {text}")
    if text == "bad":
        raise ValueError(f"bad input in {directory}/input")
    return text


def make_branches(directory: str) -> Workflow:
    """root -> left -> left2 and root -> right (reads the input file) -> right2; end needs both."""
    wf = Workflow("branches")
    wf.add_task(Task("root", step, args=(directory, "root")))
    wf.add_task(Task("left", step, ["root"], args=(directory, "left")))
    wf.add_task(Task("left2", step, ["left"], args=(directory, "left2")))
    wf.add_task(Task("right", read_input, ["root"], max_retries=1, args=(directory, "right")))
    wf.add_task(Task("right2", step, ["right"], args=(directory, "right2")))
    wf.add_task(Task("end", step, ["left2", "right2"], args=(directory, "end")))
    return wf


def branches(params: dict) -> Workflow:
    """A factory target (``rerun_tasks.py:branches --param dir=...``)."""
    return make_branches(params["dir"])


# ------------------------------------------------------------------ parameters
def report_params(name: str) -> dict:
    """Write what this task sees as the run's parameters to ``params['out']/name.json``; return them."""
    params = current_task().params
    params["scratch"] = name  # a task's copy is its own: the next read (and other tasks) never see this
    fresh = current_task().params
    Path(fresh["out"], f"{name}.json").write_text(json.dumps(fresh, default=str))
    return fresh


def with_params(params: dict) -> Workflow:
    """A factory that takes the parameters: one task per name in ``params['names']``."""
    wf = Workflow("with-params")
    for name in params.get("names", ["only"]):
        wf.add_task(Task(name, report_params, args=(name,)))
    return wf


def without_params() -> Workflow:
    """A zero-argument factory: still works with --param, and its tasks still read them."""
    wf = Workflow("without-params")
    wf.add_task(Task("plain", report_params, args=("plain",)))
    return wf


def echo(value: Any) -> Any:
    return value
