"""The benchmark suite (bench/) still works: its quickest form, end to end.

Benchmarks are not tests: this runs ``python -m bench --smoke`` (one repeat,
tiny workloads, orch lean and raw RQ only, its own redis-server and workers)
and checks only that it finishes and reports a positive number for every
workload and system. It never asserts a timing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SYSTEMS = ("orch-lean", "rq")
WORKLOADS = ("fanout", "chain", "sleep", "dag10k")


def test_bench_smoke_runs_every_workload_for_every_system(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("no redis-server on PATH (CI is set, so this is a failure, not a skip)", pytrace=False)
        pytest.skip("no redis-server on PATH")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--systems", ",".join(SYSTEMS), "--json", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=540,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, f"python -m bench --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    document = json.loads(out.read_text())
    assert document["errors"] == []
    for workload in WORKLOADS:
        for system in SYSTEMS:
            entry = document["results"].get(workload, {}).get(system)
            assert entry is not None, f"no result for {workload} / {system}"
            assert entry["median"] > 0 and all(v > 0 for v in entry["values"]), (workload, system, entry)
            assert entry["tasks"] > 0
            assert entry["redis_commands_per_task"] > 0
    assert [s["tasks"] for s in document["scale"]] == [50, 100]
    for size in document["scale"]:
        assert size["wall_s"] > 0 and size["first_dispatch_s"] > 0 and size["cpu_ms_per_task"] > 0
    assert "| system |" in document["markdown"]
    assert "| system |" in result.stdout
    # nothing it started is left running: no process names its redis-server's port any more
    port = document["meta"]["redis_port"]
    assert _processes_naming(f":{port}") == []


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found
