"""docker-compose.yml and the Dockerfile, run for real: the cluster the README promises.

The images are built (the project's from its own Dockerfile), the cluster comes up with
``--scale worker=3``, and the README's commands are run against it; see
tests/compose_cluster.py for how (podman behind a private socket, stand-in base images).
Where the machine cannot do it, the tests skip saying why; in CI (``CI`` set) they fail.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from typing import Callable, Iterator, Optional, TypeVar

import pytest

from tests.compose_cluster import (CONTAINERS_CONF, PROJECT_IMAGE, Cluster, HealthDriver, PodmanService,
                                   build_project_image, ensure_standin_images, missing_prerequisites, run,
                                   services_with_healthchecks)
from tests.conftest import _skip_or_fail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first run on a machine also builds the images

RESULTS_ROW = re.compile(r"task4\s*│\s*success")
SLOW_FLOW = "/app/compose_slow_flow.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """redis, 3 workers and the coordinator, up; everything stopped and removed afterwards."""
    reason = missing_prerequisites()
    if reason:
        _skip_or_fail(f"cannot run the compose cluster: {reason}")
    workdir = tmp_path_factory.mktemp("compose")
    env = dict(os.environ)
    (workdir / "containers.conf").write_text(CONTAINERS_CONF)
    env["CONTAINERS_CONF"] = str(workdir / "containers.conf")
    ensure_standin_images(workdir, env)
    build_project_image(env)

    service = PodmanService(workdir, env)
    project = f"orchtest{uuid.uuid4().hex[:8]}"
    cluster = Cluster(workdir, project, {**env, "DOCKER_HOST": service.url, "ORCH_IMAGE": PROJECT_IMAGE,
                                         "COMPOSE_HTTP_TIMEOUT": "180"})
    health = HealthDriver(project, services_with_healthchecks(), env)
    try:
        service.start()
        health.start()
        cluster.compose("up", "-d", "--no-build", "--scale", "worker=3", timeout=240)
        yield cluster
    finally:
        try:
            cluster.compose("down", "-v", "--remove-orphans", timeout=180, check=False)
            if cluster.leftovers():
                cluster.force_remove()
        finally:
            health.stop()
            service.stop()


def _run_id(done: subprocess.CompletedProcess[str]) -> str:
    """The run id a submit printed (``--detach``: on stdout; waiting: ``run id: ...`` on stderr)."""
    found = re.search(r"\b(\d{8}T\d{6}-[0-9a-f]+)\b", done.stdout + done.stderr)
    assert found, f"no run id in:\n{done.stdout}\n{done.stderr}"
    return found.group(1)


T = TypeVar("T")


def _wait_for(what: str, check: Callable[[], Optional[T]], timeout: float, cluster: Cluster) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s; cluster logs:\n{cluster.logs()}")


def test_cluster_is_up_with_three_workers(cluster: Cluster) -> None:
    running = {service: len(cluster.containers(service)) for service in ("redis", "worker", "coordinator")}
    assert running == {"redis": 1, "worker": 3, "coordinator": 1}, cluster.logs()


def test_submit_waits_and_prints_the_results_table(cluster: Cluster) -> None:
    done = cluster.tool("submit", check=False, timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    assert RESULTS_ROW.search(done.stdout), done.stdout
    assert "4 tasks: 4 success" in done.stdout, done.stdout


def test_detached_run_is_driven_by_the_coordinator_service(cluster: Cluster) -> None:
    cluster.compose("stop", "coordinator")
    try:
        run_id = _run_id(cluster.tool("submit", "orch", "submit", "/app/example.py", "--detach"))
        time.sleep(3)
        assert cluster.status_json(run_id)["state"] not in ("success", "failure"), (
            "the run moved on with no coordinator service running")
    finally:
        cluster.compose("start", "coordinator")
    done = cluster.tool("status", "orch", "status", run_id, "--wait", check=False, timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    assert "success" in done.stdout
    assert run_id in cluster.tool("status").stdout  # `docker compose run --rm status`: orch runs


def test_cancel_through_the_status_service(cluster: Cluster) -> None:
    run_id = _run_id(cluster.tool("submit", "orch", "submit", SLOW_FLOW, "--detach"))
    cluster.tool("status", "orch", "cancel", run_id)
    done = cluster.tool("status", "orch", "status", run_id, "--wait", check=False, timeout=120)
    assert done.returncode == 1, f"exit {done.returncode} (1: not a success)\n{done.stdout}\n{done.stderr}"
    view = cluster.status_json(run_id)
    assert view["state"] == "cancelled", view


def _host_of(worker_id: str) -> str:
    """A worker's name starts with its host name, which is the container's short id."""
    return worker_id.split(".", 1)[0]


def test_run_completes_when_a_worker_container_is_killed(cluster: Cluster) -> None:
    run_id = _run_id(cluster.tool("submit", "orch", "submit", SLOW_FLOW, "--detach"))

    def a_running_task() -> Optional[tuple[str, str]]:
        for task in cluster.status_json(run_id)["tasks"]:
            if task["state"] == "running" and task.get("worker"):
                return task["name"], task["worker"]
        return None

    task_name, worker_id = _wait_for("a task running on a worker", a_running_task, 60, cluster)
    victims = [c for c in cluster.containers("worker") if c["Id"].startswith(_host_of(worker_id))]
    assert len(victims) == 1, f"no single worker container runs {worker_id}: {cluster.containers('worker')}"
    run(["podman", "kill", victims[0]["Id"]], cluster.env, 60)

    done = cluster.tool("status", "orch", "status", run_id, "--wait", check=False, timeout=180)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    view = cluster.status_json(run_id)
    assert view["state"] == "success"
    killed = next(task for task in view["tasks"] if task["name"] == task_name)
    assert killed["worker"] != worker_id, f"{task_name} finished on the killed worker {worker_id}"
    assert any(h["worker"] == worker_id and h["state"] == "failure" for h in killed["history"]), killed


def test_redis_restart_keeps_finished_runs(cluster: Cluster) -> None:
    run_id = _run_id(cluster.tool("submit"))
    time.sleep(2)  # appendfsync everysec
    cluster.compose("restart", "redis")
    listing = _wait_for("orch runs after the redis restart",
                        lambda: cluster.tool("status", check=False).stdout, 60, cluster)
    assert re.search(rf"{run_id}\s+\S+\s+success", listing), listing
    again = cluster.tool("submit", check=False, timeout=180)
    assert again.returncode == 0 and RESULTS_ROW.search(again.stdout), f"{again.stdout}\n{again.stderr}"


def test_down_keeps_the_data_volume(cluster: Cluster) -> None:
    """README: `docker compose down` keeps the redis-data volume, so runs outlive the cluster."""
    run_id = _run_id(cluster.tool("submit"))
    time.sleep(2)  # appendfsync everysec
    cluster.compose("down", timeout=180)
    assert cluster.leftovers() == {"volumes": [f"{cluster.project}_redis-data"],
                                   "by name": [f"{cluster.project}_redis-data"]}, cluster.leftovers()
    cluster.compose("up", "-d", "--no-build", "--scale", "worker=3", timeout=240)
    listing = _wait_for("orch runs after down and up",
                        lambda: cluster.tool("status", check=False).stdout, 60, cluster)
    assert re.search(rf"{run_id}\s+\S+\s+success", listing), listing


def test_down_v_leaves_nothing_behind(cluster: Cluster) -> None:
    cluster.compose("down", "-v", timeout=180)
    assert cluster.leftovers() == {}
