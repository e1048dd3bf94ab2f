"""Several machines, one of them cut off mid-run: orch over a real (virtual) network.

Each test builds its own network of Linux network namespaces (:mod:`netns`): a switch
(a Linux bridge) and four hosts, ``redis`` (redis-server bound to its address), ``coord``
(the coordinator), ``w1`` and ``w2`` (``orch worker`` processes), on a private /24 that
exists only inside these namespaces. The coordinator runs a 200-task fan-out
(``root -> 198 items -> join``, tasks of 50-100 ms that record each execution in Redis);
mid-run, while ``w1`` is running tasks, its cable is pulled (its switch port goes down).

The run must still succeed: ``w1``'s heartbeat lapses (``ORCH_HEARTBEAT_TTL=2``), the
coordinator fails ``w1``'s attempts as ``WorkerLost`` and ``w2`` runs them again; every
result is right and committed exactly once, from the current attempt.

Skipped, with the reason, where network namespaces cannot be created. Run with ``-s`` to
see the measured figures (detection time, tasks retried, run time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import cluster_tasks
import netns
from cluster_tasks import check_run, host_of_worker, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HEARTBEAT_TTL = 2.0
ITEMS = 198
CUT_AFTER_SUCCESSES = 80
REDIS_PORT = 6379  # inside the redis namespace: nothing else listens there


def orch_command() -> list[str]:
    script = Path(sys.executable).with_name("orch")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.argv[0] = 'orch'; main()"]


@pytest.fixture
def network():
    net = netns.Network(("redis", "coord", "w1", "w2"))
    try:
        net.create()
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        yield net
    finally:
        net.destroy()
        left = [name for name in netns.list_namespaces() if name.startswith(net.prefix)]
        assert not left, f"namespaces left behind: {left}"


def start_redis(net: netns.Network, tmp_path: Path) -> str:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH")
    ip = net.ip["redis"]
    data = tmp_path / "redis"
    data.mkdir()
    net.popen("redis", [binary, "--bind", ip, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
                        "--protected-mode", "no", "--dir", str(data), "--daemonize", "no"], tmp_path / "redis.log")
    deadline = time.monotonic() + 15
    while True:
        # asked from the coordinator's host: this also checks the path through the switch
        probe = net.run("coord", ["redis-cli", "-h", ip, "-p", str(REDIS_PORT), "ping"], timeout=10)
        if probe.stdout.strip() == "PONG":
            return f"redis://{ip}:{REDIS_PORT}/0"
        if time.monotonic() > deadline:
            pytest.fail(f"redis-server in {net.ns['redis']} did not answer: {probe.stdout} {probe.stderr} "
                        f"{(tmp_path / 'redis.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def start_workers(net: netns.Network, url: str, mode: str, tmp_path: Path) -> dict[str, list[str]]:
    """Two slots per worker host: RQ mode, two named ``orch worker`` processes (``w1-0``, ``w1-1``);
    lean mode, one ``orch worker --mode lean --concurrency 2`` named after its host."""
    names: dict[str, list[str]] = {}
    for host in ("w1", "w2"):
        env = {"ORCH_HEARTBEAT_TTL": str(HEARTBEAT_TTL), cluster_tasks.HOST_ENV: host}
        base = [*orch_command(), "worker", "--redis-url", url, "--path", str(netns.TESTS_DIR), "--queues", "default",
                "--mode", mode]
        if mode == "rq":
            names[host] = [f"{host}-0", f"{host}-1"]
            for name in names[host]:
                net.popen(host, [*base, "--name", name, "--concurrency", "1"], tmp_path / f"worker-{name}.log", env)
        else:
            names[host] = [host]
            net.popen(host, [*base, "--name", host, "--concurrency", "2"], tmp_path / f"worker-{host}.log", env)
    return names


def logs(tmp_path: Path, chars: int = 2500) -> str:
    out = []
    for path in sorted(tmp_path.glob("*.log")):
        out.append(f"----- {path.name} -----\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(out)


@pytest.mark.parametrize("mode", ["rq", "lean"])
def test_a_worker_cut_off_mid_run_is_detected_and_its_tasks_rerun_elsewhere(network, tmp_path, mode) -> None:
    net = network
    url = start_redis(net, tmp_path)
    workers = start_workers(net, url, mode, tmp_path)
    tag = uuid.uuid4().hex[:12]
    progress, out = tmp_path / "progress.jsonl", tmp_path / "out.json"
    driver = net.popen("coord", [sys.executable, str(netns.TESTS_DIR / "netns.py"), "drive", "--redis-url", url,
                                 "--worker-mode", mode, "--tag", tag, "--items", str(ITEMS),
                                 "--expect-workers", ",".join(workers["w1"] + workers["w2"]),
                                 "--progress", str(progress), "--out", str(out), "--stall", "15"],
                       tmp_path / "coordinator.log", {"ORCH_HEARTBEAT_TTL": str(HEARTBEAT_TTL)})

    # Cut w1 once the run is well under way and w1 holds running attempts.
    deadline = time.monotonic() + 90
    while True:
        if driver.poll() is not None:
            pytest.fail(f"the coordinator ended (exit {driver.returncode}) before the cut:\n{logs(tmp_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not get under way within 90s:\n{logs(tmp_path)}")
        moves = [r for r in read_jsonl(str(progress)) if "task" in r]
        last = {}
        for move in moves:
            last[move["task"]] = move
        done = sum(1 for m in last.values() if m["finish"] == "success")
        on_w1 = [t for t, m in last.items() if m["finish"] == "running" and host_of_worker(m["worker"]) == "w1"]
        if done >= CUT_AFTER_SUCCESSES and on_w1:
            break
        time.sleep(0.02)
    net.cut("w1")
    cut_at = time.time()

    try:
        driver.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the coordinator did not finish within 150s of the cut:\n{logs(tmp_path)}")
    report = json.loads(out.read_text()) if out.exists() else {}
    if report.get("stalled"):
        diagnosis = report["diagnosis"]
        pytest.fail(f"the run stalled: {json.dumps(diagnosis, indent=1)}\n{logs(tmp_path)}")
    assert driver.returncode == 0, f"coordinator exit {driver.returncode}: {report.get('state')}\n{logs(tmp_path)}"

    moves = [r for r in read_jsonl(str(progress)) if "task" in r]
    snap = report["snapshot"]
    figures = check_run(snap, cluster_tasks.fanout_expected(ITEMS), moves)

    # --- what w1 was doing when it was cut off, and what became of it
    before = {}
    for move in moves:
        if move["at"] < cut_at:
            before[move["task"]] = move
    running_on_w1 = sorted(t for t, m in before.items()
                           if m["finish"] == "running" and host_of_worker(m["worker"]) == "w1")
    lost = [m for m in moves if m["kind"] == "lost"]
    lost_tasks = sorted({m["task"] for m in lost})
    records, results = snap["records"], snap["results"]
    assert lost, "no attempt was failed as WorkerLost after w1 was cut off"
    # A loss between w1's dequeue and the job's start names no worker (RQ does not record who took it).
    assert all(netns_host(m) == "w1" or "died before starting it" in m["error"] for m in lost), [
        m["error"] for m in lost]
    assert all(m["at"] >= cut_at for m in lost), "an attempt was declared lost before the cut"
    assert figures.retried_tasks == lost_tasks, (figures.retried_tasks, lost_tasks)
    for task in lost_tasks:
        assert records[task]["attempt"] >= 2, (task, records[task])
        assert host_of_worker(records[task]["worker"]) == "w2", (task, records[task])
        assert results[task]["host"] == "w2" and results[task]["attempt"] == records[task]["attempt"], task
    # Every attempt w1 was running at the cut was re-run on w2, unless its outcome was already on its way.
    finished_in_flight = []
    for task in running_on_w1:
        if task in lost_tasks:
            continue
        success = [m for m in moves if m["task"] == task and m["finish"] == "success"]
        assert records[task]["attempt"] == 1 and host_of_worker(records[task]["worker"]) == "w1", (task, records[task])
        assert success and success[0]["at"] < cut_at + 2.0, (
            f"{task} was running on w1 at the cut, was not declared lost, and succeeded late: {success}")
        finished_in_flight.append(task)
    # Nothing started on w1 after the cut (beyond reports already on the wire).
    late_w1 = [m for m in moves if m["finish"] == "running" and host_of_worker(m["worker"]) == "w1"
               and m["at"] > cut_at + 1.0]
    assert not late_w1, late_w1
    w2_after_cut = sum(1 for m in moves if m["finish"] == "success" and m["at"] > cut_at
                       and host_of_worker(m["worker"]) == "w2")
    assert w2_after_cut > 0

    detection = min(m["at"] for m in lost) - cut_at
    assert 0 < detection < HEARTBEAT_TTL + 4.0, f"WorkerLost {detection:.2f}s after the cut"
    run_time = report["finished"] - report["started"]
    by_host: dict[str, int] = {}
    for record in records.values():
        by_host[host_of_worker(record["worker"])] = by_host.get(host_of_worker(record["worker"]), 0) + 1

    # The CLI sees the same finished run from the coordinator's host.
    status = net.run("coord", [*orch_command(), "status", report["run_id"], "--redis-url", url], timeout=60)
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]

    print(f"\n[netns {mode}] {figures.tasks} tasks, workers {workers}; w1 cut after "
          f"{sum(1 for m in before.values() if m['finish'] == 'success')} successes with "
          f"{len(running_on_w1)} attempt(s) running on it ({len(finished_in_flight)} of which reported success "
          f"already in flight)\n"
          f"[netns {mode}] detection (cut -> first WorkerLost): {detection:.2f}s "
          f"(heartbeat TTL {HEARTBEAT_TTL:g}s); WorkerLost attempts: {len(lost)}; tasks retried on w2: "
          f"{len(lost_tasks)} {lost_tasks}; bodies run twice: {len(figures.executed_twice_or_more)}; "
          f"e.g. {lost[0]['task']}: {lost[0]['error']!r}\n"
          f"[netns {mode}] run time {run_time:.2f}s (cut at +{cut_at - report['started']:.2f}s, "
          f"end {report['finished'] - cut_at:.2f}s after the cut); final results by host: {by_host}")


def netns_host(move: dict) -> str:
    return host_of_worker(cluster_tasks.lost_worker(move["error"]))
