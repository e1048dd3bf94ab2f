"""The README's ACL lines, as written there, end to end.

A real ``redis-server`` gets the three users of README "Security model" (their
lines read from the README itself, passwords filled in); the example runs
through them: ``orch worker`` of both kinds as the worker user, ``orch submit``
as the coordinator user, ``orch status`` / ``orch runs`` as the read-only user.
A missing right is one ``error:`` line and exit 2; none of the users may run
the commands that could wipe or reconfigure Redis.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from bench.procs import free_port, send_signal
from shared.connection import connect
from tests.test_redis_access import EXAMPLE, Server, assert_one_error_line, orch, start_worker, started  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
README = Path(__file__).parent.parent / "README.md"
PASSWORDS = {"WORKER-PASSWORD": "w-pass-1", "COORDINATOR-PASSWORD": "c-pass-2", "READER-PASSWORD": "r-pass-3"}
ADMIN = "admin-pass-0"


def readme_acl_lines() -> list[str]:
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("user orch-")]
    assert [line.split()[1] for line in lines] == ["orch-worker", "orch-coordinator", "orch-reader"], lines
    return lines


@pytest.fixture
def acl_server(tmp_path: Path, started: list) -> str:
    """A redis-server with the README's users (and an admin ``default`` user for the test); returns
    its ``host:port``."""
    text = "\n".join(readme_acl_lines())
    for placeholder, password in PASSWORDS.items():
        text = text.replace(placeholder, password)
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default on >{ADMIN} ~* &* +@all\n{text}\n")
    port = free_port()
    server = Server(tmp_path / "redis", ["--port", str(port), "--aclfile", str(acl), "--enable-debug-command", "yes",
                                         "--enable-module-command", "yes"],
                    f"redis://default:{ADMIN}@127.0.0.1:{port}/0")
    started.append(server)
    return f"127.0.0.1:{port}"


def url(user: str, where: str) -> str:
    password = PASSWORDS[f"{user.upper()}-PASSWORD"]
    return f"redis://orch-{user}:{password}@{where}/0"


def test_no_user_may_wipe_or_reconfigure_redis(acl_server: str) -> None:
    for user in ("worker", "coordinator", "reader"):
        client = connect(url(user, acl_server))
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("DEBUG", "SLEEP", "0"),
                        ("MODULE", "LIST"), ("SHUTDOWN",), ("SET", "other:key", "1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        client.close()
    with pytest.raises(redis.exceptions.NoPermissionError):
        connect(url("reader", acl_server)).set("orch:run:x", "1")


@pytest.mark.parametrize("mode", ["lean", "rq"])
def test_the_example_runs_through_the_three_users(acl_server: str, tmp_path: Path, started: list, mode: str) -> None:
    log = start_worker(url("worker", acl_server), tmp_path, started, mode=mode, name=f"acl-{mode}")
    submitted = orch("submit", EXAMPLE, "--quiet", "--redis-url", url("coordinator", acl_server), cwd=tmp_path)
    assert submitted.returncode == 0, (submitted.stderr, log.read_text()[-3000:])
    run_id = next(line.split()[-1] for line in submitted.stderr.splitlines() if line.startswith("run id: "))
    status = orch("status", run_id, "--json", "--redis-url", url("reader", acl_server), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["state"] == "success" and [t["state"] for t in document["tasks"]] == ["success", "success"]
    admin = connect(f"redis://default:{ADMIN}@{acl_server}/0")
    admin.zadd("orch:runs", {"expired-run": 1})  # a run whose keys expired: `orch runs` would forget it
    admin.sadd("orch:workers", "gone-worker")     # a worker whose heartbeat lapsed
    runs = orch("runs", "--redis-url", url("reader", acl_server), cwd=tmp_path)
    assert runs.returncode == 0, runs.stderr
    assert run_id in runs.stdout
    assert "Traceback" not in log.read_text()
    send_signal(started[-1].pid, signal.SIGTERM, group=True)


def test_a_missing_right_is_one_error_line(acl_server: str, tmp_path: Path) -> None:
    refused = orch("submit", EXAMPLE, "--redis-url", url("reader", acl_server), cwd=tmp_path)
    assert_one_error_line(refused, "Redis refused a command", "ACL")
    for mode in ("lean", "rq"):
        worker = orch("worker", "--burst", "--mode", mode, "--redis-url", url("reader", acl_server), cwd=tmp_path)
        assert worker.returncode == 2, (worker.returncode, worker.stderr)
        errors = [line for line in worker.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Redis refused a command" in errors[0], worker.stderr  # after its banner
        assert worker.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in worker.stderr
