"""The dashboard under attack, over real HTTP: the application served by uvicorn in a thread of this
process, on fakeredis, asked with ``http.client`` (raw paths, any headers). XSS in a real browser
is in ``tests/test_dashboard.py``; the pure parts (throttle, host names) are checked directly here too."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import select
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote, urlencode

import fakeredis
import pytest
import redis

pytest.importorskip("starlette")
import uvicorn  # noqa: E402

from bench.procs import free_port  # noqa: E402
from orchestrator import Task, Workflow  # noqa: E402
from orchestrator.dashboard import security  # noqa: E402
from orchestrator.dashboard.app import create_app  # noqa: E402
from orchestrator.dashboard.security import (CredentialCache, LoginThrottle, Users, allowed_hosts,  # noqa: E402
                                             hash_password, host_allowed, local_path)
from orchestrator.distributed import run_distributed  # noqa: E402
from shared.params import PARAMS_FIELD, encode_params  # noqa: E402

pytestmark = pytest.mark.timeout(120)
HOSTILE = '<img src=x onerror=alert(1)>"><script>alert(2)</script>'
PASSWORD = "correct horse"


def noop() -> None:
    return None


class Served:
    """One dashboard application served on a free port until :meth:`stop`."""

    def __init__(self, connection: Any, users: Users, **options: Any) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(connection, users, "test-secret", **options),
                                                    host="127.0.0.1", port=self.port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.02)

    def ask(self, method: str, path: str, headers: Optional[dict[str, str]] = None, body: Any = None,
            cookie: Optional[str] = None) -> tuple[int, dict[str, str], str]:
        """One request; returns (status, headers with lower-case names, body text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {"Host": self.host, **(headers or {})}
        if cookie:
            sent["Cookie"] = f"orch_dashboard={cookie}"
        if isinstance(body, dict):
            body = urlencode(body)
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        text = answer.read().decode("utf-8", "replace")
        found = {name.lower(): value for name, value in answer.getheaders()}
        found["set-cookie"] = "\n".join(v for n, v in answer.getheaders() if n.lower() == "set-cookie")
        conn.close()
        return answer.status, found, text

    def session(self, cookie: Optional[str] = None) -> tuple[str, str]:
        """A fresh session cookie (or ``cookie`` again) and its CSRF token, from a page's form."""
        status, headers, text = self.ask("GET", "/login" if cookie is None else "/workers", cookie=cookie)
        match = re.search(r'name="csrf" value="([^"]+)"', text)
        assert match, (status, text[:300])
        return _cookie(headers) or cookie or "", match.group(1)

    def log_in(self, user: str = "ada", password: str = PASSWORD) -> tuple[str, str]:
        cookie, token = self.session()
        status, headers, _ = self.ask("POST", "/login", body={"csrf": token, "user": user, "password": password},
                                      cookie=cookie)
        assert status == 303, status
        return self.session(_cookie(headers))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _cookie(headers: dict[str, str]) -> Optional[str]:
    match = re.search(r"orch_dashboard=([^;]+)", headers.get("set-cookie", ""))
    return match.group(1) if match else None


@pytest.fixture
def client() -> Iterator[fakeredis.FakeRedis]:
    connection = fakeredis.FakeRedis()
    yield connection
    connection.close()


def _hostile_run(client: fakeredis.FakeRedis) -> str:
    wf = Workflow(f"wf {HOSTILE}")
    wf.add_task(Task("a", noop))
    wf.add_task(Task(f"b {HOSTILE}", noop, ["a"]))
    return run_distributed(wf, "redis://unused", connection=client, detach=True)[0]


@pytest.fixture
def users() -> Users:
    return Users({"ada": hash_password(PASSWORD)})


@pytest.fixture
def served(client: fakeredis.FakeRedis, users: Users) -> Iterator[Served]:
    app = Served(client, users)
    yield app
    app.stop()


@pytest.fixture
def open_app(client: fakeredis.FakeRedis) -> Iterator[Served]:
    """No login, on loopback (the default): Host names are checked."""
    app = Served(client, Users(), allowed_hosts=allowed_hosts("127.0.0.1", Users(), ()))
    yield app
    app.stop()


def _count_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(security.hashlib, "scrypt", counting)
    return calls


# ------------------------------------------------------------------ logins
def test_an_unknown_user_costs_one_scrypt_like_a_known_one(monkeypatch: pytest.MonkeyPatch, users: Users) -> None:
    calls = _count_scrypt(monkeypatch)
    assert not users.verify("ada", "wrong")
    known = len(calls)
    assert not users.verify("nobody", "wrong")
    assert not users.verify("nobody-else", "wrong")
    assert known == 1 and len(calls) == 3, calls  # no timing tell that a user name exists


def test_the_login_throttle_doubles_the_wait_and_forgets_on_success() -> None:
    now = [1000.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(LoginThrottle.free - 1):
        throttle.failed("10.0.0.1")
        assert throttle.wait("10.0.0.1") == 0
    waits = []
    for _ in range(9):
        throttle.failed("10.0.0.1")
        waits.append(throttle.wait("10.0.0.1"))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert throttle.wait("10.0.0.2") == 0  # per address
    now[0] += 61
    assert throttle.wait("10.0.0.1") == 0
    throttle.succeeded("10.0.0.1")
    throttle.failed("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 0
    small = LoginThrottle()
    small.remembered = 3
    for k in range(10):
        small.failed(f"a{k}")
    assert len(small._failures) == 3


def test_a_checked_basic_credential_is_remembered_briefly_by_a_keyed_digest() -> None:
    now = [0.0]
    cache = CredentialCache(clock=lambda: now[0])
    cache.put("Basic YWRhOnB3", "ada")
    assert cache.get("Basic YWRhOnB3") == "ada" and cache.get("Basic YWRhOnB4") is None
    assert all("YWRh" not in repr(key) for key in cache._known)
    now[0] += CredentialCache.ttl + 1
    assert cache.get("Basic YWRhOnB3") is None


def test_basic_auth_costs_one_scrypt_not_one_a_request(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_scrypt(monkeypatch)
    header = {"Authorization": "Basic " + base64.b64encode(f"ada:{PASSWORD}".encode()).decode()}
    for _ in range(3):
        status, _, text = served.ask("GET", "/metrics", header)
        assert status == 200 and "orch_runs_active" in text
    status, _, _ = served.ask("GET", "/workers", header)
    assert status == 200
    assert len(calls) == 1, calls


def test_guessing_passwords_is_throttled_on_the_form_and_in_basic_auth(served: Served) -> None:
    cookie, token = served.session()
    for _ in range(LoginThrottle.free):
        status, _, text = served.ask("POST", "/login", body={"csrf": token, "user": "ada", "password": "guess"},
                                     cookie=cookie)
        assert status == 401 and "wrong user name or password" in text
    status, headers, text = served.ask("POST", "/login", body={"csrf": token, "user": "ada", "password": PASSWORD},
                                       cookie=cookie)
    assert status == 429 and "too many failed logins" in text and int(headers["retry-after"]) >= 1
    right = {"Authorization": "Basic " + base64.b64encode(f"ada:{PASSWORD}".encode()).decode()}
    status, headers, text = served.ask("GET", "/api/workers/events", right)
    assert status == 429 and json.loads(text)["error"].startswith("too many failed logins")


# ------------------------------------------------------------------ who may see what
def test_every_page_stream_and_endpoint_needs_the_login(served: Served, client: fakeredis.FakeRedis) -> None:
    run_id = _hostile_run(client)
    secret_text = "wf &lt;img"  # the workflow's name as a page would show it
    paths = ["/", f"/runs/{run_id}", f"/runs/{run_id}/tasks/a", "/workers", "/schedules", "/metrics",
             f"/api/runs/{run_id}", f"/api/runs/{run_id}/events", f"/api/runs/{run_id}/log?task=a",
             f"/api/runs/{run_id}/log/events?task=a", "/api/workers/events",
             f"/runs/{run_id}/", "/%72uns/" + run_id, f"/runs/{run_id}/tasks/..%2f..%2fworkers", "/workers/",
             f"/api/runs/{run_id}/../{run_id}", "/API/workers/events", f"//runs/{run_id}", "/./workers"]
    for method in ("GET", "HEAD"):
        for path in paths:
            status, headers, text = served.ask(method, path)
            assert status in (303, 307, 401, 404), (method, path, status)
            assert secret_text not in text and "wf " not in text and "orch_runs" not in text, (method, path)
            if status in (303, 307):
                assert headers["location"].startswith(("/login", "http://127.0.0.1")), (path, headers["location"])
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fsecurity.py"):
        status, _, text = served.ask("GET", path)
        assert status == 404 and "import" not in text, (path, status)
    status, _, text = served.ask("GET", "/static/dashboard.css")  # the public look of the login page
    assert status == 200


def test_errors_are_one_line_json_for_the_api_and_never_a_traceback(served: Served, client: fakeredis.FakeRedis
                                                                    ) -> None:
    cookie, _ = served.log_in()
    status, headers, text = served.ask("GET", "/api/runs/nope", cookie=cookie)
    assert status == 404 and headers["content-type"].startswith("application/json")
    assert json.loads(text)["error"].startswith("no run 'nope' in this Redis")
    run_id = _hostile_run(client)
    for query in ("attempt=-3&before=-7", "before=99999999999999999999999999", "attempt=abc&before=1e9",
                  "attempt=" + "9" * 5000, "before=-1&task=" + "x" * 5000):
        status, _, text = served.ask("GET", f"/api/runs/{run_id}/log?task=a&{query}", cookie=cookie)
        assert status == 200, (query, status, text[:200])
        assert json.loads(text)["lines"] == []
    for page in ("-5", "10" * 20, "abc", "1" * 5000):
        status, _, text = served.ask("GET", f"/?page={page}", cookie=cookie)
        assert status == 200 and "Traceback" not in text, (page, status)
    client.hset(f"orch:run:{run_id}", "params", "{not json")  # a damaged record: one clear error, no traceback
    status, _, text = served.ask("GET", f"/api/runs/{run_id}", cookie=cookie)
    assert status in (200, 400, 500) and "Traceback" not in text and "File \"" not in text


def test_the_redis_password_reaches_no_page_error_or_stream() -> None:
    lost = redis.Redis.from_url("redis://orch:hunter2-secret@127.0.0.1:1/0", socket_connect_timeout=0.5)
    app = Served(lost, Users({"ada": hash_password(PASSWORD)}))
    try:
        cookie, _ = app.log_in()
        for path in ("/", "/runs/x", "/runs/x/tasks/a", "/workers", "/schedules", "/metrics", "/api/runs/x",
                     "/api/runs/x/log?task=a", "/api/runs/x/events"):
            status, _, text = app.ask("GET", path, cookie=cookie)
            assert status >= 400 and "hunter2" not in text and "Traceback" not in text, (path, status, text[:300])
    finally:
        app.stop()


# ------------------------------------------------------------------ cross-site requests
def test_a_post_needs_the_sessions_token_and_this_origin(served: Served, client: fakeredis.FakeRedis) -> None:
    run_id = _hostile_run(client)
    cookie, token = served.log_in()
    other_cookie, other_token = served.log_in()
    url = f"/runs/{run_id}/cancel"
    own = {"Origin": f"http://{served.host}"}
    refused = [
        ({}, {"back": "/"}),                                                   # no token
        ({}, {"csrf": "", "back": "/"}),                                       # blank token
        ({}, {"csrf": other_token, "back": "/"}),                              # another session's token
        ({"Origin": "http://evil.example"}, {"csrf": token}),                  # cross-site form
        ({"Origin": "null"}, {"csrf": token}),                                 # sandboxed frame, data: page
        ({"Origin": f"http://{served.host}.evil.example"}, {"csrf": token}),
    ]
    for headers, form in refused:
        status, _, text = served.ask("POST", url, {**own, **headers}, form, cookie=cookie)
        assert status == 403 and "CSRF check failed" in text, (headers, form, status)
    status, _, text = served.ask("POST", url, {**own, "Content-Type": "application/json"},
                                 json.dumps({"csrf": token}), cookie=cookie)
    assert status == 403, status
    status, _, _ = served.ask("POST", url, own, {"csrf": token})  # no session at all
    assert status == 303
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        status, _, _ = served.ask(method, url, cookie=cookie)
        assert status == 405, (method, status)
    assert client.hget(f"orch:run:{run_id}", "state") == b"running"
    status, headers, _ = served.ask("POST", url, own, {"csrf": token, "back": "//evil.example/"}, cookie=cookie)
    assert status == 303 and headers["location"] == "/"
    assert client.hget(f"orch:run:{run_id}", "state") == b"cancelled"
    assert other_cookie != cookie


@pytest.mark.parametrize("target", ["//evil.example/", "/\\evil.example", "https://evil.example/", "/\t/evil.example",
                                    "javascript:alert(1)"])
def test_the_login_sends_the_browser_nowhere_but_this_site(served: Served, target: str) -> None:
    cookie, token = served.session()
    status, headers, _ = served.ask("POST", "/login?" + urlencode({"next": target}),
                                    body={"csrf": token, "user": "ada", "password": PASSWORD}, cookie=cookie)
    assert status == 303 and headers["location"] == "/", headers["location"]


def test_only_paths_of_this_site_are_places_to_go_back_to() -> None:
    assert local_path("/runs/x?y=1") == "/runs/x?y=1"
    for target in ("//evil.example", "/\\evil.example", "https://evil.example", "/\t/evil", "", None, "runs"):
        assert local_path(target) == "/", target


def test_logging_in_starts_a_new_session(served: Served) -> None:
    planted, planted_token = served.session()  # a session an attacker made and slipped to the victim
    status, headers, _ = served.ask("POST", "/login", body={"csrf": planted_token, "user": "ada",
                                                            "password": PASSWORD}, cookie=planted)
    fresh = _cookie(headers)
    assert status == 303 and fresh and fresh != planted
    _, token = served.session(fresh)
    assert token != planted_token
    status, _, _ = served.ask("GET", "/workers", cookie=planted)
    assert status == 303  # the planted cookie itself never became a login


# ------------------------------------------------------------------ headers, cookies, hosts
def test_cookie_flags_and_security_headers(served: Served) -> None:
    status, headers, text = served.ask("GET", "/login")
    cookie = headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    policy = headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce and "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert all(f'nonce="{nonce.group(1)}"' in tag for tag in re.findall(r"<script[^>]*>", text) if "src=" not in tag)
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    _, again, _ = served.ask("GET", "/login")
    assert again["content-security-policy"] != policy  # a nonce per response
    _, behind, _ = served.ask("GET", "/login", {"X-Forwarded-Proto": "https"})  # a TLS proxy on this machine
    assert "; secure" in behind["set-cookie"].lower()


def test_without_a_login_only_loopback_host_names_are_answered(open_app: Served, client: fakeredis.FakeRedis
                                                                ) -> None:
    _hostile_run(client)
    for host in (open_app.host, f"localhost:{open_app.port}", f"[::1]:{open_app.port}", "127.0.0.1"):
        status, _, _ = open_app.ask("GET", "/", {"Host": host})
        assert status == 200, host
    for host in (f"evil.example:{open_app.port}", "attacker.test", "127.0.0.1.evil.example", ""):
        status, _, text = open_app.ask("GET", "/", {"Host": host})
        assert status == 421 and "wf " not in text, (host, status)
        status, _, _ = open_app.ask("POST", "/runs/x/cancel", {"Host": host, "Origin": f"http://{host}"}, {})
        assert status == 421


def test_allowed_host_names() -> None:
    login = Users({"ada": hash_password("pw")})
    assert allowed_hosts("0.0.0.0", login, ()) is None and allowed_hosts("127.0.0.1", login, ()) is None
    assert allowed_hosts("0.0.0.0", Users(), ()) is None  # --insecure-no-auth behind a proxy: its choice
    names = allowed_hosts("127.0.0.1", Users(), ["dash.internal"])
    assert names is not None
    assert host_allowed("dash.internal:8080", names) and host_allowed("LOCALHOST:8080", names)
    assert host_allowed("127.0.0.2", names) and not host_allowed("evil.example", names)
    assert not host_allowed(None, names)
    assert host_allowed("10.1.2.3:80", allowed_hosts("10.1.2.3", Users(), ()))


# ------------------------------------------------------------------ resource abuse
def test_a_huge_request_body_is_refused_before_it_is_read(served: Served) -> None:
    status, _, text = served.ask("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded",
                                                    "Content-Length": str(50 << 20)}, b"")
    assert status == 413 and "request body over" in text
    answer, reset = "", False
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        raw.sendall(f"POST /login HTTP/1.1\r\nHost: {served.host}\r\nTransfer-Encoding: chunked\r\n"
                    f"Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode())
        chunk = b"a" * 32768
        try:
            for _ in range(4):
                raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if select.select([raw], [], [], 0)[0]:
                    break  # answered before the body ended: read the answer, send no more
            else:
                raw.sendall(b"0\r\n\r\n")
            answer = raw.recv(4096).decode("latin-1")
        except (ConnectionResetError, BrokenPipeError):
            reset = True  # it stopped reading and closed while the body was still coming: refused unread
    assert answer.startswith("HTTP/1.1 413") or (reset and not answer), answer[:100]
    assert served.ask("GET", "/login")[0] == 200, "the dashboard serves on"


def test_live_streams_are_capped(client: fakeredis.FakeRedis) -> None:
    app = Served(client, Users(), max_streams=2)
    opened: list[http.client.HTTPConnection] = []
    try:
        def open_stream() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
            conn.request("GET", "/api/workers/events", headers={"Host": app.host})
            answer = conn.getresponse()
            if answer.status == 200:
                answer.fp.readline()  # the first event: the stream is counted by now
                opened.append(conn)
            else:
                answer.read()
                conn.close()
            return answer.status
        assert [open_stream(), open_stream()] == [200, 200]
        assert open_stream() == 503
        opened.pop().close()
        _until(lambda: open_stream() == 200, 10)
    finally:
        for conn in opened:
            conn.close()
        app.stop()


def _until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# ------------------------------------------------------------------ what a page shows
def test_names_from_redis_are_shown_as_text_in_every_page(served: Served, client: fakeredis.FakeRedis) -> None:
    run_id = _hostile_run(client)
    client.hset(f"orch:run:{run_id}", PARAMS_FIELD, encode_params({HOSTILE: HOSTILE}) or b"")
    cookie, _ = served.log_in()
    task = quote(f"b {HOSTILE}", safe="")
    for path in ("/", f"/runs/{run_id}", f"/runs/{run_id}/tasks/{task}", f"/?workflow={task}"):
        status, _, text = served.ask("GET", path, cookie=cookie)
        assert status == 200, (path, status)
        assert "<img src=x" not in text and "<script>alert" not in text, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in text or path.startswith("/?"), path


def test_an_unexpected_failure_is_one_line_to_the_browser_and_to_the_log(served: Served, client: fakeredis.FakeRedis,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.dashboard import views

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the dashboard")
    monkeypatch.setattr(views, "run_document", broken)
    monkeypatch.setattr(views, "run_header", broken)
    cookie, _ = served.log_in()
    status, headers, text = served.ask("GET", "/api/runs/r1", cookie=cookie)
    assert status == 500 and json.loads(text) == {"error": "the dashboard could not answer this request "
                                                           "(its log says why)"}
    status, headers, text = served.ask("GET", "/runs/r1", cookie=cookie)
    assert status == 500 and "could not answer" in text and "a bug" not in text and "Traceback" not in text
    logged = [r.getMessage() for r in caplog.records if r.name == "orch.dashboard"]
    assert logged[0] == "orch dashboard: GET /api/runs/r1 failed: RuntimeError: a bug in the dashboard"
    assert all("\n" not in line for line in logged)


def test_an_overlong_request_line_is_refused_and_the_dashboard_goes_on(served: Served) -> None:
    try:  # uvicorn answers 400, or closes the connection while the line is still arriving
        status, _, text = served.ask("GET", "/?workflow=" + "x" * 200_000)
        assert 400 <= status < 500 and "Traceback" not in text
    except ConnectionError:
        pass
    status, _, _ = served.ask("GET", "/login")
    assert status == 200


def test_another_site_cannot_log_the_user_out(served: Served) -> None:
    cookie, token = served.log_in()
    status, headers, _ = served.ask("POST", "/logout", {"Origin": "http://evil.example"}, {"csrf": token},
                                    cookie=cookie)
    assert status == 303 and _cookie(headers) is None  # the session is untouched
    assert served.ask("GET", "/workers", cookie=cookie)[0] == 200
    status, headers, _ = served.ask("POST", "/logout", {"Origin": f"http://{served.host}"}, {"csrf": token},
                                    cookie=cookie)
    assert status == 303 and served.ask("GET", "/workers", cookie=_cookie(headers))[0] == 303


def test_the_last_page_of_runs_has_no_older_link(served: Served, client: fakeredis.FakeRedis,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.dashboard import routes

    monkeypatch.setattr(routes, "MAX_PAGE", 1)
    wf = Workflow("many")
    wf.add_task(Task("a", noop))
    for _ in range(60):
        run_distributed(wf, "redis://unused", connection=client, detach=True)
    cookie, _ = served.log_in()
    assert "older »" in served.ask("GET", "/?page=0", cookie=cookie)[2]
    last = served.ask("GET", "/?page=7", cookie=cookie)[2]
    assert "page 2" in last and "older »" not in last and last.count('data-run="') == 25
    odd = served.ask("GET", "/?page=1&state=x%26page%3D0", cookie=cookie)[2]
    assert "?state=x%26page%3D0&workflow=" in odd  # the filter stays one parameter in the page links


def test_password_checks_run_two_at_a_time_whatever_the_flood(served: Served, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    running, most = [0], [0]
    lock = threading.Lock()
    real = hashlib.scrypt

    def slow(*args: Any, **kwargs: Any) -> bytes:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(security.hashlib, "scrypt", slow)
    statuses: list[int] = []

    def guess(k: int) -> None:
        header = {"Authorization": "Basic " + base64.b64encode(f"user{k}:guess".encode()).decode()}
        statuses.append(served.ask("GET", "/metrics", header)[0])
    threads = [threading.Thread(target=guess, args=(k,)) for k in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(statuses) == 5 and set(statuses) <= {401, 429}  # the 5th failure in a row is throttled
    assert most[0] == 2, most
