"""ruff and mypy, as configured in pyproject.toml, report nothing.

They run as part of the test suite so that the README's test command and .ci/run
check them too. A failure lists what each tool reported; fix the code (or, for a
deliberate exception, add an ignore with its reason next to it: ``# noqa: CODE``
or ``# type: ignore[code]  # why``).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _skip_or_fail

ROOT = Path(__file__).resolve().parents[1]


def _run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        _skip_or_fail(f"{module} is not installed: `python -m pip install -e \".[test]\"` installs it")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_ruff_reports_nothing() -> None:
    done = _run_tool("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, (
        "ruff (rules in pyproject.toml [tool.ruff]) reports problems; `python -m ruff check --fix .` fixes "
        f"some of them:\n{done.stdout}{done.stderr}")


@pytest.mark.timeout(300)
def test_mypy_reports_nothing() -> None:
    done = _run_tool("mypy")  # files and strictness: pyproject.toml [tool.mypy]
    assert done.returncode == 0, (
        "mypy (pyproject.toml [tool.mypy]: disallow_untyped_defs on shared/, orchestrator/, worker/) reports "
        f"errors:\n{done.stdout}{done.stderr}")
