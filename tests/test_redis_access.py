"""Redis with a password and with TLS, end to end; bad credentials and untrusted certificates
give one clear line; a password never shows in any output or in Redis.

Each test starts its own ``redis-server`` (requirepass, or TLS with certificates the test
makes with ``openssl``), an ``orch worker`` and ``orch submit`` of the example.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from bench.procs import free_port, orch_command, send_signal
from shared.connection import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TESTS = Path(__file__).parent
EXAMPLE = str(TESTS / "dist_tasks.py:make_example")
PASSWORD = "s3cret-Pa55-0rch"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path, name: str = "ca") -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN=orch test {name}", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{name}.crt", "-CAkey", f"{name}.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=directory)
    return {"ca": directory / f"{name}.crt", "cert": directory / "server.crt", "key": directory / "server.key"}


class Server:
    """A redis-server with extra arguments, ready once ``connect(url)`` can PING it."""

    def __init__(self, directory: Path, args: list[str], url: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH", pytrace=False)
        self.url = url
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                         "--dir", str(directory), *args], stdout=open(directory / "redis.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                connect(url).ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            send_signal(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list]:
    """Collects servers and worker processes, and stops them all after the test."""
    things: list = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Server):
            thing.stop()
        elif thing.poll() is None:
            send_signal(thing.pid, signal.SIGKILL, group=True)
            thing.wait(10)


def start_worker(url: str, tmp_path: Path, started: list, env: dict | None = None, mode: str = "lean",
                 name: str = "access-worker") -> Path:
    log = tmp_path / f"{name}.log"
    process = subprocess.Popen([*orch_command(), "worker", "--redis-url", url, "--path", str(TESTS), "--name",
                                name, "--mode", mode], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, start_new_session=True, cwd=str(tmp_path))
    started.append(process)
    client = connect(url, environ={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    while not client.exists(f"orch:alive:{name}"):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the worker did not register"
        time.sleep(0.05)
    return log


def orch(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*orch_command(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}, cwd=cwd)


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def every_string_in(client: redis.Redis) -> str:
    """Every key and every value in the database, as one text (types: string, hash, list, set, zset, stream)."""
    out = []
    for key in client.scan_iter(count=1000):
        out.append(key.decode(errors="replace"))
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key).decode(errors="replace"))
        elif kind == "hash":
            out += [f"{k!r}{v!r}" for k, v in client.hgetall(key).items()]
        elif kind == "list":
            out += [repr(v) for v in client.lrange(key, 0, -1)]
        elif kind == "set":
            out += [repr(v) for v in client.smembers(key)]
        elif kind == "zset":
            out += [repr(v) for v in client.zrange(key, 0, -1)]
        elif kind == "stream":
            out += [repr(fields) for _, fields in client.xrange(key)]
    return "\n".join(out)


def test_password_url_end_to_end_and_the_password_shows_nowhere(tmp_path: Path, started: list) -> None:
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    server = Server(tmp_path / "redis", ["--port", str(port), "--requirepass", PASSWORD], url)
    started.append(server)
    worker_log = start_worker(url, tmp_path, started)

    submitted = orch("submit", EXAMPLE, "--redis-url", url, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    run_id = next(line.split()[-1] for line in submitted.stderr.splitlines() if line.startswith("run id: "))
    status = orch("status", run_id, "--redis-url", url)
    runs = orch("runs", "--json", env={"ORCH_REDIS_URL": url})
    assert status.returncode == 0 and runs.returncode == 0 and run_id in runs.stdout

    wrong = orch("submit", EXAMPLE, "--redis-url", f"redis://:wrong-{PASSWORD[:4]}@127.0.0.1:{port}/0")
    line = assert_one_error_line(wrong, f"redis://:***@127.0.0.1:{port}/0", "refused this client")
    none = orch("status", run_id, "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert_one_error_line(none, "refused this client")

    send_signal(started[-1].pid, signal.SIGTERM, group=True)  # the worker's last words count too
    started[-1].wait(20)
    everything = "\n".join([submitted.stdout, submitted.stderr, status.stdout, status.stderr, runs.stdout,
                            runs.stderr, wrong.stderr, line, worker_log.read_text(errors="replace"),
                            every_string_in(connect(url))])
    assert PASSWORD not in everything
    assert PASSWORD[:8] not in everything


def test_tls_end_to_end_and_an_untrusted_certificate_is_one_error_line(tmp_path: Path, started: list) -> None:
    files = make_certificates(tmp_path / "pki")
    other = make_certificates(tmp_path / "other-pki", name="other")
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ca={files['ca']}"
    server = Server(tmp_path / "redis", ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(files["cert"]),
                                         "--tls-key-file", str(files["key"]), "--tls-ca-cert-file", str(files["ca"]),
                                         "--tls-auth-clients", "no"], url)
    started.append(server)
    plain = f"rediss://127.0.0.1:{port}/0"
    start_worker(plain, tmp_path, started, env={"ORCH_REDIS_CA": str(files["ca"])})  # the CA as a setting

    submitted = orch("submit", EXAMPLE, "--redis-url", url, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    assert "transform" in submitted.stdout and "success" in submitted.stdout

    untrusted = orch("submit", EXAMPLE, "--redis-url", f"rediss://127.0.0.1:{port}/0?ca={other['ca']}")
    assert_one_error_line(untrusted, "cannot reach Redis", "certificate verify failed")
    missing = orch("runs", "--redis-url", f"rediss://127.0.0.1:{port}/0?ca={tmp_path / 'nope.crt'}")
    assert_one_error_line(missing, "'ca='", "not a readable file")
    not_tls = orch("runs", "--redis-url", f"redis://127.0.0.1:{port}/0?ca={files['ca']}")
    assert_one_error_line(not_tls, "use a rediss:// URL")


def test_a_new_connection_costs_one_handshake_round_trip(redis_server) -> None:
    """orch's connections send ``HELLO`` and nothing else before their first command: no ``CLIENT
    SETINFO`` nor ``CLIENT MAINT_NOTIFICATIONS`` (redis-py 8's defaults, one more round trip each time
    a connection opens, and an RQ work horse opens one per job). ``MONITOR`` hides ``CLIENT``
    commands, so Redis's own counters say what arrived: a server that knows them counts them under
    ``cmdstat_client|...``, one that does not (7.0) answers each with an error."""
    watcher = redis.Redis.from_url(redis_server.url)

    def counters() -> tuple[int, int, int]:
        info = watcher.info("all")
        client_calls = sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_client"))
        return info["total_error_replies"], client_calls, info.get("cmdstat_hello", {}).get("calls", 0)

    before = counters()
    client = connect(redis_server.url, check=False)
    client.set("handshake:probe", "1")
    client.close()
    errors, client_calls, hellos = (after - first for after, first in zip(counters(), before))
    watcher.close()
    assert (errors, client_calls, hellos) == (0, 0, 1)
