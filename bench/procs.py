"""Processes the suite starts: its own redis-server, worker processes, driver processes.

Everything is started in a session of its own (``start_new_session=True``) so
that its process group can be signalled, and every descendant is recorded
before it is signalled: RQ work horses and lean work processes put themselves
in process groups of their own, so a signal to the worker's group alone would
miss them. ``Proc.stop()`` sends SIGTERM to the group, waits, then SIGKILLs
the group and every descendant still alive.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
"""The project root."""

ROOT = REPO
"""Where children run and import from (``cwd``, ``PYTHONPATH``, workers' ``--path``): the project
root, or the snapshot of its source the suite takes at start (:func:`snapshot_source`)."""

_LIVE: list["Proc"] = []
"""Every process started and not yet stopped (stopped at exit by :func:`stop_all`)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc), children first.

    Used by the benchmark and by the tests alike, to stop whole process trees.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(children.get(child, ()))
    return out


def _stat(pid: int | str) -> Optional[list[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None if gone.

    The command name may hold spaces and parentheses, so the split starts after its last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def send_signal(pid: int, sig: int, group: bool = False) -> None:
    """Signal ``pid`` (or its process group); a process that is gone already is no error."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


class Proc:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Optional[dict[str, str]] = None,
                 stdout: Optional[Path] = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        log = open(self.log_path, "ab")
        out = open(stdout, "wb") if stdout is not None else log
        self.process = subprocess.Popen(
            self.argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL, cwd=str(ROOT),
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})},
            start_new_session=True,
        )
        log.close()
        if out is not log:
            out.close()
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group; after ``grace`` s, SIGKILL to it and to every descendant left."""
        family = set(descendants(self.pid))
        if self.running():
            send_signal(self.pid, signal.SIGTERM, group=True)
            deadline = time.monotonic() + grace
            while self.running() and time.monotonic() < deadline:
                family |= set(descendants(self.pid))
                time.sleep(0.05)
        if self.running():
            family |= set(descendants(self.pid))
        send_signal(self.pid, signal.SIGKILL, group=True)
        for pid in family:
            if alive(pid):
                send_signal(pid, signal.SIGKILL)
        if self.running():
            send_signal(self.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self in _LIVE:
            _LIVE.remove(self)


def snapshot_source(into: Path) -> Path:
    """Copy orch's source and the suite into ``into`` and run every child from there.

    Then the whole run measures one version of orch even while the working tree
    changes under it (children import from their ``cwd`` / ``PYTHONPATH`` before
    the editable install's finder).
    """
    global ROOT
    into.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for name in ("orchestrator", "worker", "shared", "bench"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, into / name, ignore=ignore, dirs_exist_ok=True)
    for name in ("workflow.py",):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, into / name)
    ROOT = into
    return into


def stop_all() -> None:
    for proc in list(reversed(_LIVE)):
        proc.stop(grace=2.0)


def wait_until(check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()) -> None:
    """Poll ``check`` until true; raise naming ``what`` (with the logs of ``procs``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited with {proc.process.returncode} while waiting for {what}:\n"
                                   f"{proc.log()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log(1500)}" for p in procs)
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
        time.sleep(0.05)


class RedisServer:
    """A private redis-server on a free port (no persistence), stopped with :meth:`stop`."""

    def __init__(self, log_dir: Path, binary: Optional[str] = None) -> None:
        self.binary = binary or shutil.which("redis-server")
        if not self.binary:
            raise RuntimeError("no redis-server on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="orch-bench-redis-"))
        self.proc = Proc("redis-server", [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                                          "--daemonize", "no", "--maxclients", "10000"], log_dir)
        import redis

        def ping() -> bool:
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
                client.ping()
                client.close()
                return True
            except redis.RedisError:
                return False

        wait_until(ping, 10, "redis-server to answer PING", [self.proc])

    def client(self):  # -> redis.Redis
        import redis

        return redis.Redis.from_url(self.url)

    def version(self) -> str:
        client = self.client()
        try:
            return str(client.info("server").get("redis_version"))
        finally:
            client.close()

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def orch_command() -> list[str]:
    """How to run ``orch``: the console script installed beside this interpreter, else its entry point.

    (Not ``python -m orchestrator.cli``: run as ``__main__``, that module's group is a second copy,
    on which the commands registered by ``orchestrator.cli_cluster`` are missing.)
    """
    script = Path(sys.executable).with_name("orch")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return list(ORCH_CLI)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


ORCH_CLI = [sys.executable, "-c", "import sys; sys.argv[0] = 'orch'; from orchestrator.cli import main; main()"]
"""``orch`` as a command. (``python -m orchestrator.cli worker`` does not work: run as ``__main__``, the
module's ``main`` group is not the one :mod:`orchestrator.cli_cluster` registers ``worker`` on.)"""


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids``, their reaped children and their live descendants.

    A process's reaped children are in its ``cutime``/``cstime`` (RQ's work horses, once waited
    for); live descendants (lean work processes, Celery's pool, Dask's workers) are read one by one.
    """
    seen: set[int] = set()
    total = 0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            if p in seen:
                continue
            seen.add(p)
            fields = _stat(p)
            if fields is not None:
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _TICK
