"""Trigger rules, Skip, Fail and retry_on end to end: embedded, and on real workers of both kinds.

The exception classes travel as names with each failed attempt's outcome, so the
coordinator decides without importing anything; marker files count the runs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import authoring_tasks as at
from orchestrator.cli import main
from shared.states import TaskState

EXPECTED_STATES = {
    "lookup": TaskState.SUCCESS, "wrong_type": TaskState.FAILURE, "refuse": TaskState.FAILURE,
    "maybe_skip": TaskState.SKIPPED, "after_skip": TaskState.SKIPPED, "cleanup": TaskState.SUCCESS,
    "alert_on_wrong": TaskState.SUCCESS, "alert_on_found": TaskState.SKIPPED,
}


def runs(marker_dir: Path, name: str) -> int:
    path = marker_dir / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def check(workflow, results: dict, marker_dir: Path) -> None:
    assert {name: task.state for name, task in workflow.tasks.items()} == EXPECTED_STATES
    assert results["lookup"] == "found" and runs(marker_dir, "lookup") == 2  # KeyError retried once
    assert runs(marker_dir, "wrong_type") == 1  # ValueError is not in retry_on
    assert workflow.get_task("wrong_type").error == "ValueError: bad row 7 (not retried: ValueError is not in retry_on)"
    assert runs(marker_dir, "refuse") == 1
    assert workflow.get_task("refuse").error == "Fail: input is corrupt (not retried: the task raised Fail)"
    assert workflow.get_task("maybe_skip").error == "skipped: no new files"
    assert workflow.get_task("after_skip").attempts == 0 and runs(marker_dir, "maybe_skip") == 1
    assert results["cleanup"] == ["found", None, None] and runs(marker_dir, "cleanup") == 1
    assert runs(marker_dir, "alert") == 1 and results["alert_on_wrong"] == "alerted"


def test_policies_embedded(tmp_path) -> None:
    results = at.policies.run(marker_dir=str(tmp_path))
    check(at.policies.last_workflow, results, tmp_path)


def test_a_run_with_a_failure_exits_1_even_after_its_cleanup_ran(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ORCH_REDIS_URL", raising=False)
    result = CliRunner().invoke(main, ["submit", "tests/authoring_tasks.py:policies", "--param",
                                       f"marker_dir={tmp_path}"])
    assert result.exit_code == 1, result.output
    assert "skipped" in result.output and "not retried" in result.output


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_policies_on_workers(redis_server, orch_workers, mode, tmp_path) -> None:
    orch_workers(2, mode=mode)
    results = at.policies.run(marker_dir=str(tmp_path), redis_url=redis_server.url)
    check(at.policies.last_workflow, results, tmp_path)
