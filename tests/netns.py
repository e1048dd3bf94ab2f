"""A small network of Linux network namespaces for the multi-machine tests, and the scripts run in it.

:class:`Network` builds, for one test, a "switch" namespace holding a Linux bridge and one
namespace per host, each joined to the bridge by a veth pair (created inside the
namespaces, never in the root one), with addresses from a private /24
(``10.231.X.0/24``) that exists only inside these namespaces: nothing is added to the root
namespace, and no process started here can reach anything but these addresses and its
own loopback. Names carry the creating pid and a random suffix, so parallel runs do
not clash; namespaces left by a run whose process is gone are removed by the next one.

Run as a script inside a host namespace (``ip netns exec NS python tests/netns.py ...``):

- ``drive``: wait for the named workers, submit a workflow of :mod:`cluster_tasks` and
  coordinate it to the end (``run_distributed``), writing every transition the coordinator
  applies as JSON lines to ``--progress``, and the final state of the run, read back from
  Redis, as JSON to ``--out``. Exit 0 if the run succeeded, 1 if not, 3 if it stalled (no
  transition for ``--stall`` seconds; ``--out`` then holds a diagnosis of the stuck tasks).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

TESTS_DIR = Path(__file__).resolve().parent
NAME_PREFIX = "orcht"
_NAME_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)-([0-9a-f]+)-")


class NetnsUnavailable(Exception):
    """Network namespaces cannot be created here (no permission, no kernel support, no ``ip``)."""


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def list_namespaces() -> list[str]:
    try:
        out = _ip("netns", "list", check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    try:
        out = _ip("netns", "pids", name, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def delete_namespace(name: str) -> None:
    """SIGKILL every process inside ``name``, then delete it."""
    deadline = time.monotonic() + 10
    while True:
        pids = namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _ip("netns", "del", name, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces of this module left by test processes that no longer exist."""
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


class Network:
    """A bridge in a "switch" namespace and one namespace per host, all on one private /24."""

    def __init__(self, hosts: Sequence[str] = ("redis", "coord", "w1", "w2")) -> None:
        self.id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.prefix = f"{NAME_PREFIX}-{self.id}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = list(hosts)
        self.ns = {host: f"{self.prefix}-{host}" for host in self.hosts}
        octet = 1 + secrets.randbelow(254)
        self.subnet = f"10.231.{octet}.0/24"
        self.ip = {host: f"10.231.{octet}.{10 + i}" for i, host in enumerate(self.hosts)}
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    def port_of(self, host: str) -> str:
        """The switch-side interface of ``host``'s link (inside the switch namespace)."""
        return f"p-{host}"[:15]

    # ------------------------------------------------------------------ build / tear down
    def create(self) -> None:
        """Build the network; raise :class:`NetnsUnavailable` if namespaces cannot be made."""
        remove_stale_namespaces()
        try:
            result = _ip("netns", "add", self.switch, check=False)
        except FileNotFoundError:
            raise NetnsUnavailable("the 'ip' command (iproute2) is not installed") from None
        if result.returncode != 0:
            raise NetnsUnavailable(f"'ip netns add' failed: {result.stderr.strip() or result.returncode}")
        self._created.append(self.switch)
        try:
            sw = self.switch
            _ip("-n", sw, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            for host in self.hosts:
                ns = self.ns[host]
                _ip("netns", "add", ns)
                self._created.append(ns)
                port = self.port_of(host)
                # Both ends are created inside namespaces: the root namespace never sees them.
                _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", sw, "link", "set", port, "master", "br0")
                _ip("-n", sw, "link", "set", port, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except subprocess.CalledProcessError as exc:
            self.destroy()
            raise NetnsUnavailable(f"building the test network failed: {' '.join(exc.cmd)}: "
                                   f"{(exc.stderr or '').strip()}") from None

    def destroy(self) -> None:
        """Kill every process started in the network (and anything left inside it), delete it."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for name in reversed(self._created):
            delete_namespace(name)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._created.clear()

    # ---------------------------------------------------------------------------- processes
    def exec_args(self, host: str, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *command]

    def popen(self, host: str, command: Sequence[str], log_path: Path, env: Optional[dict] = None,
              ) -> subprocess.Popen:
        """Start ``command`` in ``host``'s namespace, in a session of its own, output to ``log_path``."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.exec_args(host, command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
                cwd=str(TESTS_DIR),
            )
        self.processes.append(process)
        return process

    def run(self, host: str, command: Sequence[str], timeout: float = 30, env: Optional[dict] = None,
            ) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_args(host, command), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=str(TESTS_DIR))

    # ----------------------------------------------------------------------------- faults
    def cut(self, host: str) -> None:
        """Unplug ``host``'s cable: its port on the switch goes down (nothing is sent or received)."""
        _ip("-n", self.switch, "link", "set", self.port_of(host), "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port_of(host), "up")


# ====================================================================== scripts run in a namespace
def _wait_for_workers(conn, names: list[str], transport: str, timeout: float) -> None:
    from rq import Worker

    from shared import keys

    deadline = time.monotonic() + timeout
    while True:
        if transport == "lean":
            present = {keys.slot_worker(m.decode()) for m in conn.smembers(keys.LEAN_WORKERS)}
            present = {n for n in present if conn.exists(keys.alive(n))}
        else:
            present = {w.name for w in Worker.all(connection=conn)}
        missing = sorted(set(names) - present)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"workers did not register within {timeout:g}s: {missing}")
        time.sleep(0.1)


def drive(args: argparse.Namespace) -> int:
    import cluster_tasks
    from orchestrator.distributed import run_distributed
    from shared.connection import connect

    conn = connect(args.redis_url)
    _wait_for_workers(conn, [n for n in args.expect_workers.split(",") if n], args.worker_mode, 60)
    wf = cluster_tasks.make_fanout(args.redis_url, args.tag, n_items=args.items)
    log = cluster_tasks.ProgressLog(wf.tasks, args.progress)
    started = time.time()
    log.note(event="ready", at=started)
    run_id: dict[str, str] = {}

    def submitted(rid: str) -> None:
        run_id["id"] = rid
        log.note(event="submitted", run_id=rid, at=time.time())

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if "id" in run_id and time.time() - log.last_at > args.stall:
                diagnosis = cluster_tasks.diagnose_stall(conn, run_id["id"], args.worker_mode)
                Path(args.out).write_text(json.dumps({"stalled": True, "diagnosis": diagnosis}))
                log.note(event="stalled", at=time.time())
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    _, state = run_distributed(wf, args.redis_url, on_progress=log, on_submitted=submitted,
                               connection=conn)
    finished = time.time()
    log.note(event="finished", state=state.value, at=finished)
    snap = cluster_tasks.snapshot(conn, run_id["id"], args.tag)
    Path(args.out).write_text(json.dumps({"stalled": False, "run_id": run_id["id"], "state": state.value,
                                          "started": started, "finished": finished, "snapshot": snap}))
    return 0 if state.value == "success" else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="netns.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("drive", help="submit the fan-out workflow and coordinate it")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--worker-mode", choices=["rq", "lean"], default="lean")
    p.add_argument("--tag", required=True)
    p.add_argument("--items", type=int, default=198)
    p.add_argument("--expect-workers", default="")
    p.add_argument("--progress", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stall", type=float, default=20.0)
    args = parser.parse_args(argv)
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
