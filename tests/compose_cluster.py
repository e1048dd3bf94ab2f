"""The real docker-compose cluster, on podman, for tests/test_compose_cluster.py.

Docker's engine cannot run where this project is tested, but a compatible stack can,
from Debian packages alone (``.ci/run`` installs them): podman with runc, a private
``podman system service`` socket that ``docker-compose`` 1.29 talks to as if it were
Docker, and locally built stand-ins for ``python:3.11-slim`` and ``redis:7`` (no image
registry is reachable). Nothing outside the test's temporary directory is configured:
podman reads a ``containers.conf`` given through ``CONTAINERS_CONF``. Images stay in
podman's store, so later runs on the same machine reuse them.

podman runs healthchecks from systemd timers, which these machines lack, so
:class:`HealthDriver` runs them (what Docker's engine does by itself); without it
``depends_on: condition: service_healthy`` would wait forever.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
STANDIN_DIR = Path(__file__).resolve().parent / "fixtures" / "standin_images"
SLOW_FLOW = Path(__file__).resolve().parent / "fixtures" / "compose_slow_flow.py"

TOOLS = ("podman", "runc", "debootstrap", "docker-compose")
BASE_IMAGE = "localhost/orch-standin-bookworm:latest"
STANDINS = {"python:3.11-slim": "python.Containerfile", "redis:7": "redis.Containerfile"}
PROJECT_IMAGE = "localhost/orch:compose-test"
BUILD_CA_PATH = "/run/orch-build-ca.crt"

CONTAINERS_CONF = """\
# podman's default runtime (crun) cannot set RLIMIT_NOFILE or use hybrid cgroups here.
[containers]
default_ulimits = []
[engine]
runtime = "runc"
"""


class ClusterError(AssertionError):
    """A step of bringing the cluster up or down failed; the message says which and shows its output."""


def missing_prerequisites() -> Optional[str]:
    """Why this machine cannot run the cluster test, or None when it can."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not on PATH: `apt-get install podman runc debootstrap docker-compose` "
                f"(.ci/run installs them)")
    if os.geteuid() != 0:
        return "the compose cluster test runs podman rootful and debootstrap, which need root"
    return None


def run(argv: list[str], env: dict[str, str], timeout: float, check: bool = True,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; with ``check``, a non-zero exit or a timeout raises ClusterError with its output."""
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"`{' '.join(argv)}` did not finish in {timeout:.0f} s; output so far:\n"
                           f"{_text(exc.stdout)}\n{_text(exc.stderr)}") from None
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def _text(output: object) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else str(output or "")


def pip_ca_bundle() -> Optional[str]:
    """The CA bundle pip is told to trust here (``cert``), which a build needs to reach the index."""
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                          capture_output=True, text=True)
    path = done.stdout.strip()
    return path if done.returncode == 0 and path and os.path.isfile(path) else None


def image_exists(name: str, env: dict[str, str]) -> bool:
    return run(["podman", "image", "exists", name], env, 60, check=False).returncode == 0


def ensure_standin_images(workdir: Path, env: dict[str, str]) -> None:
    """Build ``python:3.11-slim`` and ``redis:7`` stand-ins unless an image of that name exists."""
    if all(image_exists(name, env) for name in STANDINS):
        return
    if not image_exists(BASE_IMAGE, env):
        rootfs = workdir / "rootfs"
        run(["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,ca-certificates,redis-server",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"], env, 600)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            done = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env,
                                  capture_output=True, text=True, timeout=300)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        if done.returncode != 0:
            raise ClusterError(f"podman import of the debootstrap rootfs failed:\n{done.stderr}")
    for name, containerfile in STANDINS.items():
        if not image_exists(name, env):
            run(["podman", "build", "-q", "-f", containerfile, "-t", name, "."], env, 300, cwd=STANDIN_DIR)


def build_project_image(env: dict[str, str]) -> None:
    """The project's image, from its own Dockerfile; pip in the build gets this machine's CA bundle."""
    argv = ["podman", "build", "-q", "-f", "Dockerfile", "-t", PROJECT_IMAGE]
    bundle = pip_ca_bundle()
    if bundle:
        argv += ["-v", f"{bundle}:{BUILD_CA_PATH}:ro", "--env", f"PIP_CERT={BUILD_CA_PATH}"]
    run(argv + ["."], env, 600)


class PodmanService:
    """``podman system service`` on a private unix socket: the Docker API docker-compose talks to."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.socket_path = workdir / "podman.sock"
        self.log_path = workdir / "podman-service.log"
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(["podman", "system", "service", "--time=0", self.url], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClusterError(f"podman system service exited {self.process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')}")
            if self._pings():
                return
            time.sleep(0.2)
        raise ClusterError(f"podman system service did not answer on {self.socket_path} in {timeout:.0f} s")

    def _pings(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2)
                conn.connect(str(self.socket_path))
                conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
                return b"OK" in conn.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class HealthDriver(threading.Thread):
    """Runs the healthchecks of the services that define one, every second (podman's systemd timers)."""

    def __init__(self, project: str, services: list[str], env: dict[str, str]) -> None:
        super().__init__(name="compose-health", daemon=True)
        self.project, self.services, self.env = project, services, env
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            for service in self.services:
                names = run(["podman", "ps", "--format", "{{.Names}}",
                             "--filter", f"label=com.docker.compose.project={self.project}",
                             "--filter", f"label=com.docker.compose.service={service}"],
                            self.env, 30, check=False).stdout.split()
                for name in names:
                    run(["podman", "healthcheck", "run", name], self.env, 30, check=False)

    def stop(self) -> None:
        self.stopping.set()
        self.join(40)


def services_with_healthchecks() -> list[str]:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return [name for name, spec in services.items() if spec.get("healthcheck")]


class Cluster:
    """The compose project ``project`` on the podman socket; every call passes the same files and env.

    Besides the project's docker-compose.yml, an override file mounts the test's slow workflow
    on /app in the orch services (as the README suggests for one's own workflows).
    """

    def __init__(self, workdir: Path, project: str, env: dict[str, str]) -> None:
        self.project, self.env = project, env
        self.override = workdir / "docker-compose.test.yml"
        mount = {"volumes": [f"{SLOW_FLOW}:/app/{SLOW_FLOW.name}:ro"]}
        self.override.write_text(yaml.safe_dump({"services": {
            name: dict(mount) for name in ("worker", "coordinator", "submit", "status")}}))

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(self.override), *args]
        return run(argv, self.env, timeout, check=check)

    def tool(self, service: str, *command: str, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker-compose --profile tools run --rm -T SERVICE [COMMAND...]``."""
        return self.compose("--profile", "tools", "run", "--rm", "-T", service, *command,
                            timeout=timeout, check=check)

    def status_json(self, run_id: str) -> dict:
        return json.loads(self.tool("status", "orch", "status", run_id, "--json").stdout)

    def containers(self, service: Optional[str] = None, all_states: bool = False) -> list[dict]:
        argv = ["podman", "ps", "--format", "json", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            argv.append("--all")
        return json.loads(run(argv, self.env, 60).stdout or "[]")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {
            "containers": [c["Names"][0] for c in self.containers(all_states=True)],
            "networks": run(["podman", "network", "ls", "--format", "{{.Name}}", "--filter", label],
                            self.env, 60).stdout.split(),
            "volumes": run(["podman", "volume", "ls", "--format", "{{.Name}}", "--filter", label],
                           self.env, 60).stdout.split(),
        }
        # by name too, in case a label went missing
        names = [*run(["podman", "network", "ls", "--format", "{{.Name}}"], self.env, 60).stdout.split(),
                 *run(["podman", "volume", "ls", "--format", "{{.Name}}"], self.env, 60).stdout.split()]
        found["by name"] = [name for name in names if name.startswith(f"{self.project}_")]
        return {kind: items for kind, items in found.items() if items}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout

    def force_remove(self) -> None:
        """Last resort after a failed ``down``: remove whatever of the project is left."""
        for container in self.containers(all_states=True):
            run(["podman", "rm", "-f", "-t", "2", container["Id"]], self.env, 60, check=False)
        label = f"label=com.docker.compose.project={self.project}"
        run(["podman", "network", "prune", "-f", "--filter", label], self.env, 60, check=False)
        run(["podman", "volume", "prune", "-f", "--filter", label], self.env, 60, check=False)
