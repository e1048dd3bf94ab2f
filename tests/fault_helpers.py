"""Process and Redis plumbing for the fault-injection tests (tests/test_faults.py).

Everything here starts *real* processes: ``orch worker`` (RQ or lean mode),
``orch submit`` / ``orch coordinator`` / ``orch resume`` / ``orch cancel`` and
``redis-server``, each in a session of its own so that a test can signal the
whole process group (and the work horses / work processes, which put
themselves in groups of their own) and so that nothing outlives the test:
:class:`Processes` kills every process it started, continuing stopped ones
first.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pytest
import redis
from bench.procs import alive as pid_alive, descendants, free_port, orch_command, send_signal  # noqa: F401
from redis_server import RedisServer
from shared import keys

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

FAST_ENV = {"ORCH_HEARTBEAT_TTL": "2", "ORCH_LEASE_TTL": "2", "PYTHONUNBUFFERED": "1"}
"""Environment of every orch process the fault tests start: losses are noticed within ~2 s."""




def closed_port() -> int:
    """A port nothing listens on (bound and released, so very likely still free)."""
    return free_port()


# ------------------------------------------------------------------ processes



class Proc:
    """One subprocess in its own session; stdout and stderr go to files."""

    def __init__(self, name: str, cmd: list[str], directory: Path, env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None) -> None:
        self.name = name
        self.cmd = cmd
        self.out_path = directory / f"{name}.out"
        self.err_path = directory / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            cwd=str(cwd or REPO_DIR), env=env, start_new_session=True)
        self.started = time.monotonic()
        self._family: set[int] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def family(self) -> list[int]:
        """This process and every live descendant (remembered, so teardown finds them later)."""
        pids = [self.pid] + descendants(self.pid)
        self._family.update(pids)
        return pids

    def signal_all(self, sig: int) -> list[int]:
        """Send ``sig`` to the process group and to every descendant (work horses and lean work
        processes run in process groups of their own); return the pids signalled."""
        pids = self.family()
        send_signal(self.pid, sig, group=True)
        for pid in pids:
            send_signal(pid, sig)
        return pids

    def kill_all(self) -> None:
        """SIGCONT then SIGKILL everything this process is or started, and reap it."""
        pids = set(self.family()) | self._family
        for pid in pids:
            if pid_alive(pid):
                send_signal(pid, signal.SIGCONT)
        send_signal(self.pid, signal.SIGCONT, group=True)
        send_signal(self.pid, signal.SIGKILL, group=True)
        for pid in pids:
            if pid_alive(pid):
                send_signal(pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group (warm stop), then kill everything left."""
        if self.alive():
            self.family()
            send_signal(self.pid, signal.SIGCONT, group=True)
            send_signal(self.pid, signal.SIGTERM, group=True)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()

    def describe(self, chars: int = 3000) -> str:
        return (f"----- {self.name} (pid {self.pid}, exit {self.returncode}): {' '.join(self.cmd[-6:])}\n"
                f"stdout: {self.stdout()[-chars:]}\nstderr: {self.stderr()[-chars:]}")


class Processes:
    """Starts orch processes for one test and stops every one of them at the end."""

    def __init__(self, directory: Path, redis_url: str) -> None:
        self.directory = directory
        self.redis_url = redis_url
        self.started: list[Proc] = []
        self._numbers: dict[str, int] = {}

    def _name(self, prefix: str) -> str:
        self._numbers[prefix] = self._numbers.get(prefix, 0) + 1
        return f"{prefix}{self._numbers[prefix]}"

    def env(self, extra: Optional[dict[str, str]] = None, fast: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env.update(PYTHONUNBUFFERED="1", FAULT_REDIS_URL=self.redis_url, FAULT_DIR=str(self.directory))
        if fast:
            env.update(FAST_ENV)
        env.update(extra or {})
        return env

    def start(self, prefix: str, args: list[str], env: Optional[dict[str, str]] = None, fast: bool = True) -> Proc:
        proc = Proc(self._name(prefix), orch_command() + args, self.directory, self.env(env, fast))
        self.started.append(proc)
        return proc

    def orch(self, args: list[str], env: Optional[dict[str, str]] = None, timeout: float = 60.0,
             with_url: bool = True) -> subprocess.CompletedProcess:
        """Run an ``orch`` command to its end; returns its CompletedProcess (text output)."""
        cmd = orch_command() + args + (["--redis-url", self.redis_url] if with_url else [])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_DIR),
                              env=self.env(env), stdin=subprocess.DEVNULL, start_new_session=True)

    def workers(self, n: int, *, mode: str = "lean", env: Optional[dict[str, str]] = None, fast: bool = True,
                queues: str = "default", concurrency: int = 1) -> list[Proc]:
        """Start ``n`` ``orch worker`` processes and wait until each serves its queues."""
        batch = []
        for _ in range(n):
            name = self._name(f"{mode}-worker-")
            args = ["worker", "--redis-url", self.redis_url, "--path", str(TESTS_DIR), "--queues", queues,
                    "--mode", mode, "--name", name, "--concurrency", str(concurrency)]
            proc = Proc(name, orch_command() + args, self.directory, self.env(env, fast))
            proc.worker_name = name  # type: ignore[attr-defined]
            self.started.append(proc)
            batch.append(proc)
        client = redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + 30
            for proc in batch:
                while not worker_ready(client, proc.worker_name, mode):  # type: ignore[attr-defined]
                    if not proc.alive():
                        raise RuntimeError(f"worker exited before it was ready:\n{proc.describe()}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"worker not ready within 30 s:\n{proc.describe()}")
                    time.sleep(0.05)
        finally:
            client.close()
        return batch

    def stop_all(self) -> None:
        for proc in self.started:
            try:
                proc.kill_all() if not proc.alive() else proc.stop(grace=2.0)
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc.name}: {exc}")

    def report(self) -> str:
        return "\n".join(proc.describe() for proc in self.started)


def worker_ready(client: redis.Redis, name: str, mode: str) -> bool:
    if mode == "lean":
        slots = {keys.slot_worker(m.decode()) for m in client.smembers(keys.LEAN_WORKERS)}
        return name in slots and bool(client.exists(keys.alive(name)))
    # registered with RQ, and in orch's registry (which submissions route by)
    return bool(client.exists(f"rq:worker:{name}")) and bool(client.exists(f"orch:alive:{name}"))


# ----------------------------------------------------------------- redis
class AofRedis(RedisServer):
    """A ``redis-server`` of this test's own, with ``--appendonly yes --appendfsync always``,
    that can be stopped (SIGTERM: a clean shutdown) and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server on PATH")
        super().__init__(binary, directory, extra_args=("--save", "", "--appendonly", "yes", "--appendfsync", "always"))


# --------------------------------------------------------------- run state
def text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def task_records(client: redis.Redis, run_id: str) -> dict[str, dict]:
    """The records of ``orch:run:{id}:tasks`` by task name (a task without one is still pending)."""
    return {text(k): json.loads(v) for k, v in client.hgetall(f"orch:run:{run_id}:tasks").items()}


def run_meta(client: redis.Redis, run_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in client.hgetall(f"orch:run:{run_id}").items()}


def results_hash(client: redis.Redis, run_id: str) -> dict[str, Any]:
    from shared import codec

    return {text(k): codec.decode(v) for k, v in client.hgetall(f"orch:run:{run_id}:results").items()}


def counters(client: redis.Redis) -> dict[str, int]:
    from fault_tasks import COUNTER_PREFIX

    found = client.keys(COUNTER_PREFIX + "*")
    return {text(k)[len(COUNTER_PREFIX):]: int(v) for k, v in zip(found, client.mget(found) if found else [])}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def run_id_from(proc: Proc, timeout: float = 30.0) -> str:
    """The run id an ``orch submit`` prints on stderr (``run id: X``), or on stdout with --detach."""
    def find() -> Optional[str]:
        for line in proc.stderr().splitlines():
            if line.startswith("run id: "):
                return line[len("run id: "):].strip()
        if not proc.alive():
            raise AssertionError(f"orch submit ended before printing a run id:\n{proc.describe()}")
        return None

    return wait_for(find, timeout, "the run id")


# ------------------------------------------------- an in-process coordinator
class Progress:
    """An ``on_progress`` callback that keeps every transition with the monotonic time it was seen."""

    def __init__(self) -> None:
        self.moves: list[tuple[float, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, scheduler: Any, transitions: Iterable[Any]) -> None:
        now = time.monotonic()
        with self.lock:
            self.moves.extend((now, move) for move in transitions)

    def of(self, task: str) -> list[tuple[float, Any]]:
        with self.lock:
            return [(at, move) for at, move in self.moves if move.task == task]

    def first(self, task: str, finish: str, attempt: Optional[int] = None) -> Optional[tuple[float, Any]]:
        for at, move in self.of(task):
            if move.finish.value == finish and (attempt is None or move.attempt == attempt):
                return at, move
        return None


class Background:
    """``workflow.run(redis_url=...)`` in a thread, so the test can inject faults meanwhile."""

    def __init__(self, workflow: Any, redis_url: str, **options: Any) -> None:
        self.workflow = workflow
        self.progress = Progress()
        self.results: Optional[dict] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(redis_url, options), daemon=True)
        self.thread.start()

    def _run(self, redis_url: str, options: dict) -> None:
        try:
            self.results = self.workflow.run(redis_url=redis_url, on_progress=self.progress, **options)
        except BaseException as exc:  # reported by join()
            self.error = exc

    @property
    def run_id(self) -> Optional[str]:
        return getattr(self.workflow, "last_run_id", None)

    def wait_run_id(self, timeout: float = 10.0) -> str:
        return wait_for(lambda: self.run_id, timeout, "the run to be submitted")

    def join(self, timeout: float) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the run did not finish within {timeout:g}s")
        if self.error is not None:
            raise self.error
        assert self.results is not None
        return self.results


# ------------------------------------------------------------------ the fixture
@contextlib.contextmanager
def fast_processes(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   before_stop: Callable[[], Any] = lambda: None) -> Iterator["Processes"]:
    """orch processes on the Redis at ``url``, all stopped at the end; short TTLs everywhere
    (:data:`FAST_ENV`, also for an in-process coordinator of the test). ``before_stop`` runs first
    at the end (e.g. to bring back a Redis the test stopped)."""
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("ORCH_REDIS_URL", "ORCH_KILL_GRACE", "ORCH_MAX_RESULT_BYTES"):
        monkeypatch.delenv(name, raising=False)
    started = Processes(tmp_path, url)
    try:
        yield started
    finally:
        before_stop()
        stop_background_runs(url)
        started.stop_all()
        print(started.report())


@pytest.fixture
def procs(redis_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator["Processes"]:
    """:func:`fast_processes` on the shared redis-server. Import it into a test module
    (``from fault_helpers import procs``) to use it."""
    with fast_processes(redis_server.url, tmp_path, monkeypatch) as started:
        yield started


def stop_background_runs(url: str) -> None:
    """Cancel whatever run an in-process coordinator thread may still drive (after a failed test)."""
    client = redis.Redis.from_url(url)
    try:
        for run_id in client.smembers(keys.ACTIVE):
            client.xadd(keys.events(run_id.decode()), {"status": "cancel", "by": "test teardown"})
    except redis.RedisError:
        pass
    finally:
        client.close()
