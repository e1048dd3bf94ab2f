"""The dashboard's parts without a browser: logins and the bind check, the collapsed graph, the log
pages, and the live change detection (on fakeredis)."""
from __future__ import annotations

import json
from pathlib import Path

import fakeredis
import pytest
from click.testing import CliRunner

from orchestrator import Task
from orchestrator.cli import main
from orchestrator.dashboard.graph_view import MAX_BANDS, MAX_NODES, build_graph
from orchestrator.dashboard.live import RunWatch
from orchestrator.dashboard.security import (Users, check_bind, check_password, csrf_ok, hash_password, load_users,
                                             parse_auth_file, same_origin)
from orchestrator.logs import log_page
from shared import keys
from shared.errors import DashboardSettingError


def noop() -> None:
    return None


# ------------------------------------------------------------------ security
def test_password_hashes_check_the_right_password_only() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert check_password("correct horse", stored)
    assert not check_password("correct hors", stored)
    assert not check_password("correct horse", "scrypt$garbage")
    assert hash_password("x") != hash_password("x")  # salted


def test_auth_file_lines_and_their_errors(tmp_path: Path) -> None:
    users = parse_auth_file(f"# who may log in\n\nada:{hash_password('pw')}\n", "users.txt")
    assert users.required and users.verify("ada", "pw") and not users.verify("ada", "nope")
    assert not users.verify("bob", "pw")
    with pytest.raises(DashboardSettingError, match="users.txt line 2: expected USER:scrypt"):
        parse_auth_file(f"ada:{hash_password('pw')}\nbob:plaintext\n", "users.txt")
    with pytest.raises(DashboardSettingError, match="names no user"):
        parse_auth_file("# nobody\n", "users.txt")
    with pytest.raises(DashboardSettingError, match="cannot read it"):
        load_users(tmp_path / "missing.txt")


def test_login_from_the_environment_needs_both_variables() -> None:
    assert not load_users(None, {}).required
    users = load_users(None, {"ORCH_DASHBOARD_USER": "ada", "ORCH_DASHBOARD_PASSWORD": "pw"})
    assert users.verify("ada", "pw")
    with pytest.raises(DashboardSettingError, match="set both ORCH_DASHBOARD_USER and ORCH_DASHBOARD_PASSWORD"):
        load_users(None, {"ORCH_DASHBOARD_USER": "ada"})


def test_binding_beyond_this_machine_needs_a_login() -> None:
    check_bind("127.0.0.1", Users(), False)
    check_bind("::1", Users(), False)
    check_bind("localhost", Users(), False)
    with pytest.raises(DashboardSettingError, match="refusing to bind 0.0.0.0 without a login"):
        check_bind("0.0.0.0", Users(), False)
    check_bind("0.0.0.0", Users(), True)
    check_bind("0.0.0.0", Users({"ada": hash_password("pw")}), False)


def test_csrf_and_origin_checks() -> None:
    assert csrf_ok("abc", "abc")
    assert not csrf_ok("abc", "abd") and not csrf_ok(None, None) and not csrf_ok("abc", "")
    assert same_origin(None, "127.0.0.1:8080")
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not same_origin("http://evil.example", "127.0.0.1:8080")


def test_cli_refuses_a_public_bind_without_login_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("ORCH_DASHBOARD_PASSWORD", raising=False)
    result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to bind 0.0.0.0 without a login"), lines


def test_cli_says_in_one_line_that_its_port_is_taken() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["dashboard", "--port", str(port), "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: cannot serve the dashboard on 127.0.0.1:{port}: Address already in use; "
                                     f"pick a free --port (or a --host of this machine)")


def test_cli_prints_an_auth_file_line() -> None:
    result = CliRunner().invoke(main, ["dashboard", "--hash-password", "ada"], input="s3cret\n")
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert parse_auth_file(line, "-").verify("ada", "s3cret")


# ------------------------------------------------------------------ graph
def _tasks(*specs: tuple[str, list[str]]) -> dict[str, Task]:
    return {name: Task(name, noop, deps) for name, deps in specs}


def test_a_small_graph_draws_every_task() -> None:
    tasks = _tasks(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))
    view = build_graph(list(tasks), tasks)
    assert not view.collapsed
    assert [node.task for node in view.nodes] == ["a", "b", "c", "d"]
    assert sorted(view.edges) == [(0, 1), (0, 2), (1, 3), (2, 3)]


def test_a_mapped_task_is_one_node_for_all_its_children() -> None:
    tasks = _tasks(("items", []))
    tasks["double"] = Task("double", noop, ["items"], map_over="items")
    for k in range(500):
        tasks[f"double[{k}]"] = tasks["double"].child(f"double[{k}]", (k,), {})
    view = build_graph(list(tasks), tasks)
    assert [(node.task, node.kind) for node in view.nodes] == [("items", "task"), ("double", "map")]
    assert {view.node_of[f"double[{k}]"] for k in range(500)} == {1}


@pytest.mark.parametrize("shape", ["wide", "chain"])
def test_a_10000_task_graph_collapses_to_what_a_browser_can_draw(shape: str) -> None:
    n = 10_000
    specs = [("root", [])]
    for i in range(n):
        before = "root" if (shape == "wide" and i < 1000) or i == 0 else f"t{i - (1000 if shape == 'wide' else 1)}"
        specs.append((f"t{i}", [before]))
    tasks = _tasks(*specs)
    view = build_graph(list(tasks), tasks)
    assert view.collapsed
    assert len(view.nodes) <= MAX_NODES and len(view.nodes) <= MAX_BANDS + 1
    assert set(view.node_of) == set(tasks)
    assert sum(node.members for node in view.nodes) == len(tasks)
    assert all(a != b for a, b in view.edges)


# ------------------------------------------------------------------ logs and live changes
def _write_log(client: fakeredis.FakeRedis, lines: dict[int, str]) -> None:
    key = keys.task_log("r1", "t", 1)
    offset = 0
    for seq, text in sorted(lines.items()):
        client.xadd(key, {"t": str(1000.0 + seq), "o": str(offset), "l": text}, id=f"0-{seq}")
        offset += len(text) + 1


def test_a_long_log_opens_at_its_end_and_pages_back_to_its_start() -> None:
    client = fakeredis.FakeRedis()
    _write_log(client, {seq: f"line {seq}" for seq in range(1, 2501)})
    end = log_page(client, "r1", "t", 1, count=1000)
    assert end.lines[0][0] == 1501 and end.lines[-1][1].line == "line 2500"
    assert end.more_before and end.first == 1501
    middle = log_page(client, "r1", "t", 1, before=end.first, count=1000)
    assert middle.first == 501 and middle.more_before
    start = log_page(client, "r1", "t", 1, before=middle.first, count=1000)
    assert start.first == 1 and not start.more_before and start.lines[0][1].line == "line 1"
    after = log_page(client, "r1", "t", 1, after=2498)
    assert [line.line for _, line in after.lines] == ["line 2499", "line 2500"]


def test_a_log_page_says_where_lines_were_dropped() -> None:
    client = fakeredis.FakeRedis()
    _write_log(client, {1: "first", 2: "second", 10: "tenth"})
    page = log_page(client, "r1", "t", 1)
    texts = [line.line for _, line in page.lines]
    assert texts[:2] == ["first", "second"] and texts[-1] == "tenth"
    assert "7 lines" in texts[2] and "dropped" in texts[2]


def test_run_watch_reads_only_what_can_have_changed_and_sends_only_changes() -> None:
    from orchestrator import Workflow
    from orchestrator.distributed import run_distributed

    client = fakeredis.FakeRedis()
    wf = Workflow("w")
    for name, deps in (("a", []), ("b", ["a"]), ("c", ["b"])):
        wf.add_task(Task(name, noop, deps))
    run_id, _ = run_distributed(wf, "redis://unused", connection=client, detach=True)
    watch = RunWatch(client, run_id)
    watch.start()
    assert watch.look() == []
    assert watch._may_have_moved() == ["a"]  # b and c wait on unfinished tasks: not read
    client.hset(keys.tasks(run_id), "a", json.dumps({"state": "running", "attempt": 1, "worker": "w1"}))
    assert watch.look() == []  # the run's marker did not move: nothing is read
    client.hset(keys.run(run_id), "counts", json.dumps({"pending": 2, "running": 1}))
    events = dict(watch.look())
    assert events["tasks"] == [["a", "running", 1, "w1", None, None, None]]
    assert events["header"]["counts"] == {"pending": 2, "running": 1}
    # a cascade the candidates cannot see (c changed while b was not final): the counts catch it
    client.hset(keys.tasks(run_id), mapping={"a": json.dumps({"state": "failure", "attempt": 1}),
                                             "c": json.dumps({"state": "failure", "attempt": 0})})
    client.hset(keys.run(run_id), "counts", json.dumps({"pending": 1, "failure": 2}))
    rows = dict(watch.look())["tasks"]
    assert sorted(row[:2] for row in rows) == [["a", "failure"], ["c", "failure"]]
    client.hset(keys.tasks(run_id), "a[0]", json.dumps({"state": "pending", "attempt": 0}))
    client.hset(keys.run(run_id), "counts", json.dumps({"pending": 2, "failure": 2}))
    assert watch.look() == [("reload", None)]  # new tasks (a map expanded): the page reads the run again
    client.delete(keys.run(run_id))
    assert watch.look() == [("gone", None)]


def test_a_page_drawn_before_the_run_moved_gets_every_task_first() -> None:
    from orchestrator import Workflow
    from orchestrator.dashboard.views import MARKER_FIELDS, marker_token
    from orchestrator.distributed import run_distributed
    from orchestrator.run_store import read_meta

    client = fakeredis.FakeRedis()
    wf = Workflow("w")
    wf.add_task(Task("a", noop))
    run_id, _ = run_distributed(wf, "redis://unused", connection=client, detach=True)
    drawn_at = marker_token(read_meta(client, run_id, MARKER_FIELDS))
    same = RunWatch(client, run_id)
    same.start(drawn_at)
    assert same.look() == []
    client.hset(keys.tasks(run_id), "a", json.dumps({"state": "running", "attempt": 1}))
    client.hset(keys.run(run_id), "counts", json.dumps({"running": 1}))
    moved = RunWatch(client, run_id)
    moved.start(drawn_at)  # the run moved between the page's data and its event stream
    events = dict(moved.look())
    assert events["tasks"] == [["a", "running", 1, None, None, None, None]]
    assert moved.look() == []


def test_workers_document_shows_what_each_worker_runs_and_unserved_queues() -> None:
    from orchestrator.dashboard.views import workers_document
    from shared.workers import LEAN, RQ, WorkerInfo, beat

    from shared.config import Settings

    client = fakeredis.FakeRedis()
    ttl = Settings().heartbeat_ttl
    beat(client, WorkerInfo("lean-1", LEAN, ("default",), concurrency=2), ttl)
    beat(client, WorkerInfo("rq-1", RQ, ("io",)), ttl)
    client.sadd(keys.LEAN_WORKERS, keys.lean_slot("lean-1", 0), keys.lean_slot("lean-1", 1))
    client.rpush(keys.inflight(keys.lean_slot("lean-1", 1)), json.dumps(["20260101T000000-ab", "load", 2, "m:f", "p"]))
    client.hset("rq:worker:rq-1", "current_job", "orch-20260101T000000-ab-7-1")
    client.sadd(keys.QUEUES, "default", "orphans")
    client.rpush(keys.lean_queue("orphans"), "job-a", "job-b")
    document = workers_document(client)
    running = {row["name"]: row["running"] for row in document["workers"]}
    assert running == {"lean-1": ["20260101T000000-ab / load #2"], "rq-1": ["20260101T000000-ab / task number 7 #1"]}
    assert all(0 <= row["heartbeat_age"] < 1 for row in document["workers"])
    queues = {queue["name"]: queue for queue in document["queues"]}
    assert queues["orphans"]["lean"] == 2 and queues["orphans"]["served_by"] == []
    assert queues["io"]["served_by"] == ["rq"]
    assert document["warning"] == "2 tasks waiting on queue 'orphans': no live worker serves it"
