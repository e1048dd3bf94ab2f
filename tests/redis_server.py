"""A ``redis-server`` child process for the tests, which fault tests stop and start again."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from bench.procs import free_port, send_signal

START_TIMEOUT = 10.0


class RedisServer:
    """A ``redis-server`` child process on a fixed port; ``stop()`` / ``start()`` for fault tests."""

    def __init__(self, binary: str, directory: Path, port: Optional[int] = None,
                 extra_args: tuple[str, ...] = ("--save", "", "--appendonly", "no")) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = directory / "redis-server.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--daemonize", "no", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
                client.ping()
                client.close()
                return
            except redis.RedisError:  # refused, or still loading its append-only file
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on port {self.port}: {self.log_tail()}")
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); ``sig=SIGKILL`` for a crash."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        send_signal(process.pid, sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            send_signal(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs):
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
