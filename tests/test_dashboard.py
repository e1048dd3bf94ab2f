"""``orch dashboard`` in a real browser: headless Chromium (the Debian package, driven by Playwright),
a real redis-server, a real ``orch worker`` and a real ``orch dashboard`` process.

One stack for the module (Redis, a worker, a dashboard, a browser) keeps the file within
about two minutes. Screenshots of each page go to the test's output folder
(``tmp_path``); ``docs/dashboard-run.png`` in the README is one of them.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from bench.procs import free_port, orch_command
from conftest import TESTS_DIR, WorkerProcess, worker_command
from redis_server import RedisServer
from shared import keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
STATE_COLOURS = {"success": "rgb(34, 197, 94)", "failure": "rgb(239, 68, 68)", "pending": "rgb(209, 213, 219)",
                 "queued": "rgb(147, 197, 253)", "running": "rgb(250, 204, 21)", "cancelled": "rgb(107, 114, 128)",
                 "skipped": "rgb(249, 168, 212)", "retrying": "rgb(251, 146, 60)"}
"""The fill of a graph node in each state (dashboard.css)."""


class Dashboard:
    """One ``orch dashboard`` process on a free port."""

    def __init__(self, redis_url: str, log_dir: Path, env: Optional[dict[str, str]] = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"dashboard-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*orch_command(), "dashboard", "--redis-url", redis_url, "--port", str(self.port), *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/login", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"orch dashboard did not start:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(_redis_server_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis (emptied), one ``orch worker`` (2 slots, queue ``default``), a dashboard without login."""
    server = _redis_server_session
    server.start()
    client = server.client()
    client.flushall()
    out = tmp_path_factory.mktemp("dashboard")
    log_path = out / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(worker_command(server.url, concurrency=2, name="dash-w1"), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "ORCH_MAX_LOG_BYTES": str(4 << 20)},
                                   cwd=str(out))
    worker = WorkerProcess(process, "dash-w1", log_path, 2)
    dashboard = None
    try:
        _wait(lambda: client.exists(keys.alive("dash-w1")) == 1, 30, "the worker's heartbeat")
        dashboard = Dashboard(server.url, out, extra=("--path", str(TESTS_DIR)))
        yield {"server": server, "client": client, "url": server.url, "dashboard": dashboard, "out": out}
    finally:
        if dashboard is not None:
            dashboard.stop()
        worker.stop()
        client.close()


@pytest.fixture(scope="module")
def browser(stack: dict[str, Any]) -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH (.ci/run installs the Debian packages chromium and chromium-driver)")
        pytest.skip("no chromium on PATH: apt-get install chromium chromium-driver")
    profile = stack["out"] / "chromium-profile"
    with playwright_api.sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(str(profile), executable_path=chromium,
                                                            args=CHROMIUM_ARGS, headless=True,
                                                            viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    # what the Content-Security-Policy blocked (an inline script or style without the nonce): an error too
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "Content Security Policy"
           in msg.text else None)
    tab.shots = tmp_path  # screenshots of this test's pages
    try:
        yield tab
    finally:
        tab.close()
    assert not errors, f"JavaScript errors or blocked content on the page: {errors}"


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _orch_json(url: str, *args: str) -> Any:
    done = subprocess.run([*orch_command(), *args, "--redis-url", url, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _run(url: str, workflow: Any, detach: bool = False) -> tuple[str, Optional[threading.Thread]]:
    """Submit ``workflow``; coordinate it in a thread of this process unless ``detach``. Returns the run id."""
    from orchestrator.distributed import run_distributed

    if detach:
        return run_distributed(workflow, url, detach=True)[0], None
    ids: list[str] = []
    thread = threading.Thread(target=run_distributed, args=(workflow, url), kwargs={"on_submitted": ids.append},
                              daemon=True)
    thread.start()
    _wait(lambda: bool(ids), 30, "the run's submission")
    return ids[0], thread


@pytest.fixture(scope="module")
def finished_run(stack: dict[str, Any]) -> str:
    """The small workflow (4 tasks succeed, one fails), run to its end."""
    import dashboard_tasks

    run_id, thread = _run(stack["url"], dashboard_tasks.small_workflow())
    assert thread is not None
    thread.join(60)
    return run_id


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(page.shots / f"{name}.png"), full_page=True)


def _graph_nodes(page: Any) -> dict[str, tuple[str, str, str]]:
    """task -> (data-state, class, fill colour) of every task node of the graph."""
    found = page.eval_on_selector_all(
        "#graph [data-task]",
        "els => els.map(e => [e.dataset.task, e.dataset.state, e.getAttribute('class'),"
        " getComputedStyle(e.querySelector('rect')).fill])")
    return {task: (state, cls, fill) for task, state, cls, fill in found}


def test_runs_page_and_a_finished_run_show_every_task_in_its_state(stack: dict[str, Any], finished_run: str,
                                                                   page: Any) -> None:
    page.goto(stack["dashboard"].base + "/")
    row = page.locator(f'#runs tr[data-run="{finished_run}"]')
    assert row.get_attribute("data-state") == "failure"
    assert "dash-small" in row.inner_text()
    _shot(page, "runs")
    missing = page.goto(stack["dashboard"].base + "/runs/20990101T000000-000000000000")
    assert missing.status == 404 and "no run '20990101T000000-000000000000'" in page.inner_text("#error")
    page.goto(stack["dashboard"].base + "/")
    page.click(f'#runs a[href="/runs/{finished_run}"]')
    page.wait_for_selector('#graph [data-task="load"]')
    status = _orch_json(stack["url"], "status", finished_run)
    expected = {task["name"]: task["state"] for task in status["tasks"]}
    assert expected == {"extract": "success", "clean": "success", "enrich": "success", "load": "success",
                        "broken": "failure"}
    nodes = _graph_nodes(page)
    assert {name: node[0] for name, node in nodes.items()} == expected
    for name, (state, cls, fill) in nodes.items():
        assert f"state-{state}" in cls.split(), (name, cls)
        assert fill == STATE_COLOURS[state], (name, fill)
    rows = page.eval_on_selector_all("#grid [data-task]", "els => els.map(e => [e.dataset.task, e.dataset.state])")
    assert dict(rows) == expected
    assert page.get_attribute("#run-header", "data-state") == "failure"
    assert page.locator("#legend .state-success").count() == 1
    _shot(page, "run")
    docs = Path(__file__).resolve().parent.parent / "docs"
    if docs.is_dir() and os.environ.get("ORCH_UPDATE_SCREENSHOT"):
        shutil.copy(page.shots / "run.png", docs / "dashboard-run.png")


def test_failed_task_shows_its_traceback_and_log(stack: dict[str, Any], finished_run: str, page: Any) -> None:
    page.goto(f"{stack['dashboard'].base}/runs/{finished_run}")
    page.click('#graph [data-task="broken"]')
    page.wait_for_selector("#log:has-text('log line 2 before the failure')")
    assert page.url.endswith(f"/runs/{finished_run}/tasks/broken")
    assert "ValueError: the dashboard test failure" in page.inner_text("#traceback")
    log = page.inner_text("#log")
    assert log.index("log line 0 before the failure") < log.index("ValueError: the dashboard test failure")
    assert page.get_attribute("#task", "data-state") == "failure"
    attempt = page.locator('#attempts tr[data-attempt="1"]')
    assert attempt.get_attribute("data-state") == "failure"
    assert "dash-w1" in attempt.inner_text()
    _shot(page, "task")


def test_a_1_mib_log_opens_at_its_end_and_its_start_loads(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks

    run_id, thread = _run(stack["url"], dashboard_tasks.chatty_workflow())
    assert thread is not None
    thread.join(60)
    assert stack["client"].xlen(keys.task_log(run_id, "chatty", 1)) == 16384  # 1 MiB, all kept
    started = time.monotonic()
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}/tasks/chatty")
    page.wait_for_selector("#log:has-text('line 016383')")
    opened = time.monotonic() - started
    print(f"a 1 MiB log showed its end in {opened:.2f}s")
    assert opened < 1.5, f"a 1 MiB log took {opened:.2f}s to show"  # 1 s asked; margin for a loaded machine
    assert "line 000000" not in page.inner_text("#log")  # its end first
    pages = 0
    while page.is_visible("#log-earlier"):
        shown = page.evaluate("document.getElementById('log').textContent.length")
        page.click("#log-earlier")
        page.wait_for_function("shown => document.getElementById('log').textContent.length > shown", arg=shown)
        page.wait_for_selector("#log-earlier:not([disabled])", state="attached")
        pages += 1
        assert pages < 20
    text = page.inner_text("#log")
    assert text.index("line 000000") < text.index("line 016383")
    assert text.count("line 008000 ") == 1  # each page once
    assert pages == 16


def test_a_running_task_log_is_followed_live(stack: dict[str, Any], page: Any, tmp_path: Path) -> None:
    import dashboard_tasks

    gate = tmp_path / "gate"
    run_id, thread = _run(stack["url"], dashboard_tasks.gated_workflow(str(gate)))
    _wait(lambda: (json.loads(stack["client"].hget(keys.tasks(run_id), "gated") or b"{}").get("state")
                   == "running"), 15, "the gated task to run")
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}/tasks/gated")
    page.wait_for_selector("#log:has-text('waiting at the gate')")
    assert "gate open" not in page.inner_text("#log")
    gate.write_text("open")
    page.wait_for_selector("#log:has-text('gate open')", timeout=10000)  # followed, then the page shows the end
    page.wait_for_selector('#task[data-state="success"]', timeout=10000)
    assert thread is not None
    thread.join(30)


def test_rerun_a_task_from_its_page_as_orch_retry_does(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks
    from orchestrator.distributed import resume_run
    from shared.connection import connect

    run_id, thread = _run(stack["url"], dashboard_tasks.rerun_workflow())
    assert thread is not None
    thread.join(60)
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}/tasks/broken")
    page.click("#rerun-task")
    assert "task broken and its descendants rerun" in page.inner_text("#flash")
    assert page.url.endswith(f"/runs/{run_id}")
    resume_run(connect(stack["url"]), run_id)  # what an orch coordinator does with the reopened run
    status = _orch_json(stack["url"], "status", run_id)
    assert status["retries"] == 1
    tasks = {task["name"]: task for task in status["tasks"]}
    assert tasks["broken"]["attempts"] == 2 and tasks["broken"]["state"] == "failure"
    assert tasks["extract"]["attempts"] == 1  # upstream of the rerun: not run again
    page.wait_for_selector('#graph [data-task="broken"][data-state="failure"]')
    assert page.inner_text("#run-retries") == "1"
    page.wait_for_selector("#retry-run:not([disabled])")
    page.click("#retry-run")  # the run failed again: retry it from failure, as 'orch retry --detach'
    assert "reopened from where it failed" in page.inner_text("#flash")
    resume_run(connect(stack["url"]), run_id)
    status = _orch_json(stack["url"], "status", run_id)
    assert status["retries"] == 2
    assert {task["name"]: task["attempts"] for task in status["tasks"]} == {"extract": 1, "broken": 3, "after": 0}


def test_a_node_turns_queued_running_success_without_a_reload(stack: dict[str, Any], page: Any,
                                                              tmp_path: Path) -> None:
    import dashboard_tasks

    gate = tmp_path / "gate"
    run_id, thread = _run(stack["url"], dashboard_tasks.gated_workflow(str(gate)))
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#graph [data-task="gated"]')
    page.evaluate("""() => {
        window.__sameDocument = true;
        window.__seen = [];
        const node = document.querySelector('#graph [data-task="gated"]');
        window.__seen.push(node.dataset.state);
        new MutationObserver(() => {
            const state = document.querySelector('#graph [data-task="gated"]').dataset.state;
            if (window.__seen[window.__seen.length - 1] !== state) window.__seen.push(state);
        }).observe(document.getElementById('graph'),
                   {attributes: true, subtree: true, attributeFilter: ['data-state']});
    }""")
    page.wait_for_selector('#graph [data-task="gated"][data-state="running"]', timeout=15000)
    assert page.get_attribute('#grid [data-task="gated"]', "data-state") == "running"
    _shot(page, "run-live")
    gate.write_text("open")
    opened = time.monotonic()
    page.wait_for_selector('#graph [data-task="gated"][data-state="success"]', timeout=15000)
    shown = time.monotonic() - opened  # the task ends within ~0.05 s of the gate, the change shows within 1 s
    print(f"a task's success showed {shown:.2f}s after its gate opened")
    assert shown < 3.0, f"the success took {shown:.2f}s to show"  # margin for a loaded machine
    page.wait_for_selector('#run-header[data-state="success"]', timeout=15000)
    seen = page.evaluate("window.__seen")
    assert seen[-2:] == ["running", "success"], seen
    assert set(seen) <= {"pending", "queued", "running", "success"}, seen
    assert page.evaluate("window.__sameDocument") is True  # no reload
    assert thread is not None
    thread.join(30)


def test_a_task_waiting_on_an_unserved_queue_shows_queued_and_the_warning(stack: dict[str, Any], page: Any) -> None:
    from orchestrator import Task, Workflow

    import dashboard_tasks

    wf = Workflow("dash-unserved")
    wf.add_task(Task("stuck", dashboard_tasks.noop, queue="nobody-serves-this"))
    run_id, thread = _run(stack["url"], wf)
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#graph [data-task="stuck"][data-state="queued"]', timeout=15000)
    page.wait_for_selector("#run-warning:not([hidden])", timeout=15000)
    assert "no live worker serves it" in page.inner_text("#run-warning")
    page.goto(f"{stack['dashboard'].base}/workers")
    assert "dash-w1" in page.inner_text("#workers")
    page.wait_for_selector('#queues tr[data-queue="nobody-serves-this"]')
    assert "no live worker" in page.inner_text('#queues tr[data-queue="nobody-serves-this"]')
    assert "no live worker serves it" in page.inner_text("#queue-warning")
    _shot(page, "workers")
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.click("#cancel-run")
    page.wait_for_selector("#flash")
    page.wait_for_selector('#run-header[data-state="cancelled"]', timeout=15000)
    assert thread is not None
    thread.join(30)


def test_cancel_from_the_page_and_orch_status_agrees(stack: dict[str, Any], page: Any, tmp_path: Path) -> None:
    import dashboard_tasks

    run_id, thread = _run(stack["url"], dashboard_tasks.gated_workflow(str(tmp_path / "never")))
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#graph [data-task="gated"][data-state="running"]', timeout=15000)
    page.click("#cancel-run")
    assert "cancel" in page.inner_text("#flash")
    page.wait_for_selector('#run-header[data-state="cancelled"]', timeout=15000)
    page.wait_for_selector('#graph [data-task="gated"][data-state="cancelled"]', timeout=15000)
    assert "dashboard by" in page.inner_text("#run-cancelled")
    _shot(page, "cancelled")
    status = _orch_json(stack["url"], "status", run_id)
    assert status["state"] == "cancelled"
    assert status["cancelled_by"].startswith("dashboard by")
    assert {task["name"]: task["state"] for task in status["tasks"]}["gated"] == "cancelled"
    assert thread is not None
    thread.join(30)


def test_a_10000_task_run_opens_within_3_seconds(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks

    run_id, _ = _run(stack["url"], dashboard_tasks.wide_workflow(10_000), detach=True)
    started = time.monotonic()
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#grid [data-task="t5"]')
    page.wait_for_selector("#graph svg [data-group]")
    opened = time.monotonic() - started
    print(f"a 10,000-task run opened in {opened:.2f}s")
    assert opened < 3.0, f"the 10,000-task run took {opened:.2f}s to open"
    assert page.inner_text("#grid-count") == "(10002)"
    assert page.locator("#grid [data-task]").count() < 200  # virtualised: only rows near the view
    assert page.locator("#graph [data-group], #graph [data-task]").count() <= 260  # collapsed, not 10,002 nodes
    page.fill("#grid-filter", "t9999")
    page.wait_for_selector('#grid [data-task="t9999"][data-state="pending"]')
    _shot(page, "large-run")


def test_a_mapped_task_is_one_node_counting_its_children_live(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks

    run_id, _ = _run(stack["url"], dashboard_tasks.mapped_workflow(300), detach=True)
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#graph [data-task="double"][data-kind="map"]')
    assert page.get_attribute('#graph [data-task="double"]', "data-state") == "pending"
    from orchestrator.distributed import resume_run
    from shared.connection import connect

    driver = threading.Thread(target=resume_run, args=(connect(stack["url"]), run_id), daemon=True)
    driver.start()  # the page is open before the map expands: its children arrive live
    page.wait_for_selector('#run-header[data-state="success"]', timeout=30000)
    node = page.locator('#graph [data-task="double"]')
    page.wait_for_function("""() => document.querySelector('#graph [data-task="double"] text.counts')
                              .textContent === 'success 300'""", timeout=10000)
    assert node.get_attribute("data-state") == "success"
    assert page.locator("#graph [data-task]").count() == 3  # items, double [map], total
    assert page.inner_text("#grid-count") == "(303)"
    page.fill("#grid-filter", "double[299]")
    page.wait_for_selector('#grid [data-task="double[299]"][data-state="success"]')
    _shot(page, "mapped")
    driver.join(30)


def test_schedules_page_triggers_pauses_and_resumes(stack: dict[str, Any], page: Any) -> None:
    from orchestrator.schedules import add_schedule
    from shared.connection import connect

    add_schedule(connect(stack["url"]), "dash-hourly", "dashboard_tasks:small_workflow", every="1h")
    base = stack["dashboard"].base
    page.goto(base + "/schedules")
    section = page.locator('section[data-schedule="dash-hourly"]')
    assert section.get_attribute("data-paused") == "false"
    assert section.locator(".next-fires li").count() == 5
    assert "No run yet" in section.locator(".schedule-runs").inner_text()
    section.locator('button[data-action="trigger"]').click()
    flash = page.inner_text("#flash")
    assert "schedule dash-hourly triggered: run " in flash
    run_id = flash.rsplit("run ", 1)[1].strip()
    row = page.locator(f'section[data-schedule="dash-hourly"] .schedule-runs tr[data-run="{run_id}"]')
    assert row.count() == 1 and "manual" in row.inner_text()
    listed = _orch_json(stack["url"], "runs", "--schedule", "dash-hourly")
    assert [(run["run_id"], run["schedule"]) for run in listed] == [(run_id, "dash-hourly")]
    page.locator('section[data-schedule="dash-hourly"] button[data-action="pause"]').click()
    assert page.get_attribute('section[data-schedule="dash-hourly"]', "data-paused") == "true"
    shown = _orch_json(stack["url"], "schedule", "show", "dash-hourly")
    assert shown["paused"] is True
    _shot(page, "schedules")
    page.locator('section[data-schedule="dash-hourly"] button[data-action="resume"]').click()
    assert page.get_attribute('section[data-schedule="dash-hourly"]', "data-paused") == "false"
    page.goto(base + "/?schedule=dash-hourly")
    assert page.locator("#runs tr[data-run]").count() == 1
    _cancel_quietly(stack["url"], run_id)


def _cancel_quietly(url: str, run_id: str) -> None:
    """Cancel a run no coordinator drives (so that later tests' workers do not get its tasks)."""
    from orchestrator.distributed import cancel_run
    from shared.connection import connect

    cancel_run(connect(url), run_id, "the dashboard tests")


def test_a_run_with_a_map_of_10000_children_opens_within_3_seconds(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks

    run_id, thread = _run(stack["url"], dashboard_tasks.mapped_unserved_workflow(10_000, "dash-nobody"))
    _wait(lambda: stack["client"].hlen(keys.tasks(run_id)) > 10_000, 60, "the map's 10,000 children")
    started = time.monotonic()
    page.goto(f"{stack['dashboard'].base}/runs/{run_id}")
    page.wait_for_selector('#grid [data-task="double[5]"]')
    page.wait_for_selector('#graph [data-task="double"][data-kind="map"]')
    opened = time.monotonic() - started
    print(f"a run with 10,000 mapped children opened in {opened:.2f}s")
    assert opened < 3.0, f"the run with 10,000 mapped children took {opened:.2f}s to open"
    assert page.inner_text("#grid-count") == "(10002)"
    assert page.locator("#graph [data-task]").count() == 2  # items, and double with its children counted
    page.wait_for_function("""() => document.querySelector('#graph [data-task="double"] text.counts')
                              .textContent === 'queued 10000'""")
    _shot(page, "large-map")
    page.click("#cancel-run")
    page.wait_for_selector('#run-header[data-state="cancelled"]', timeout=30000)
    assert thread is not None
    thread.join(30)


def test_login_with_and_without_the_right_password(stack: dict[str, Any], page: Any, tmp_path: Path) -> None:
    secured = Dashboard(stack["url"], tmp_path, env={"ORCH_DASHBOARD_USER": "ada",
                                                     "ORCH_DASHBOARD_PASSWORD": "correct horse"})
    try:
        page.goto(secured.base + "/workers")
        assert "/login" in page.url
        page.fill("input[name=user]", "ada")
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        assert "wrong user name or password" in page.inner_text("#login-error")
        _shot(page, "login-refused")
        answer = page.request.get(secured.base + "/api/runs/anything")
        assert answer.status == 401 and "log in first" in answer.text()
        metrics = page.request.get(secured.base + "/metrics", headers={
            "Authorization": "Basic " + base64.b64encode(b"ada:correct horse").decode()})
        assert metrics.status == 200 and "orch_runs_finished" in metrics.text()
        page.goto(secured.base + "/login?next=/workers")
        page.fill("input[name=user]", "ada")
        page.fill("input[name=password]", "correct horse")
        page.click("button[type=submit]")
        page.wait_for_selector("#workers")
        assert page.url == secured.base + "/workers"
        # a POST without the session's CSRF token is refused, logged in or not
        answer = page.request.post(f"{secured.base}/runs/x/cancel", form={"csrf": "forged"})
        assert answer.status == 403 and "CSRF" in answer.text()
    finally:
        secured.stop()


def test_a_read_only_redis_user_sees_actions_disabled_and_why(stack: dict[str, Any], finished_run: str, page: Any,
                                                              tmp_path: Path) -> None:
    from test_acl import readme_acl_lines

    reader = next(line for line in readme_acl_lines() if line.split()[1] == "orch-reader")
    words = reader.replace("READER-PASSWORD", "reader-secret-77").split()[2:]
    client = stack["client"]
    client.execute_command("ACL", "SETUSER", "orch-reader", *words)
    port = stack["url"].rsplit(":", 1)[1].split("/")[0]
    reading = Dashboard(f"redis://orch-reader:reader-secret-77@127.0.0.1:{port}/0", tmp_path)
    try:
        page.goto(f"{reading.base}/runs/{finished_run}")
        page.wait_for_selector('#graph [data-task="broken"][data-state="failure"]')
        assert page.is_disabled("#retry-run") and page.is_disabled("#cancel-run")
        assert "may only read" in page.inner_text("#read-only-note")
        answer = page.request.post(f"{reading.base}/runs/{finished_run}/retry",
                                   form={"csrf": page.evaluate("window.ORCH.csrf"), "back": f"/runs/{finished_run}"})
        assert "may only read" in answer.text()
        assert client.hget(keys.run(finished_run), "state") == b"failure"
        for path in ("/", f"/runs/{finished_run}", f"/runs/{finished_run}/tasks/broken", "/workers"):
            page.goto(reading.base + path)
            assert "reader-secret-77" not in page.content()
        _shot(page, "read-only")
    finally:
        reading.stop()
        client.execute_command("ACL", "DELUSER", "orch-reader")


def test_metrics_parse_and_count_the_runs_done(stack: dict[str, Any], finished_run: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"{stack['dashboard'].base}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    failed = _orch_json(stack["url"], "runs", "--workflow", "dash-small", "--state", "failure")
    assert [run["run_id"] for run in failed] == [finished_run]
    assert samples[("orch_runs_finished_total", (("state", "failure"), ("workflow", "dash-small")))] == 1
    assert samples[("orch_task_attempts_total", (("outcome", "error"), ("task", "broken"),
                                                 ("workflow", "dash-small")))] == 1
    assert samples[("orch_task_attempts_total", (("outcome", "success"), ("task", "load"),
                                                 ("workflow", "dash-small")))] == 1
    assert samples[("orch_workers_alive", (("kind", "lean"),))] == 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reads(client: Any) -> int:
    """Calls of the commands the dashboard's run pages send (HMGET, HGETALL; neither the stand-in
    coordinators nor the idle worker sends them)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_hmget", "cmdstat_hgetall"))


def test_twenty_open_pages_of_busy_1000_task_runs_cost_little(stack: dict[str, Any]) -> None:
    """20 event streams (what 20 open run pages hold), each on a 1,000-task run whose tasks change
    4 times a second: under 100 Redis commands a second in all, and under 20% of one core (CPU time
    of the dashboard process, which does not depend on how loaded the machine is)."""
    import http.client

    import dashboard_tasks

    client = stack["client"]
    runs = [_run(stack["url"], dashboard_tasks.wide_workflow(1000), detach=True)[0] for _ in range(20)]
    for run_id in runs:  # the root done, as a coordinator writes it
        client.hset(keys.tasks(run_id), "root", json.dumps({"state": "success", "attempt": 1}))
        client.hset(keys.run(run_id), "counts", json.dumps({"success": 1, "pending": 1001}))
    received = [0] * len(runs)
    stop = threading.Event()

    def listen(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", stack["dashboard"].port, timeout=30)
        connection.request("GET", f"/api/runs/{runs[k]}/events")
        response = connection.getresponse()
        while not stop.is_set():
            line = response.readline()
            if not line:
                return
            if line.startswith(b"event: tasks"):
                received[k] += 1
        connection.close()

    def coordinate() -> None:
        """What 20 busy coordinators write, 4 times a second each: 20 tasks of each run succeed and the
        next 20 start (layer after layer), with the run's counts, in one transaction per run."""
        tick = 0
        while not stop.is_set() and tick < 49:
            tick += 1
            done = [f"t{i}" for i in range((tick - 2) * 20, (tick - 1) * 20) if i >= 0]
            started = [f"t{i}" for i in range((tick - 1) * 20, tick * 20)]
            records = {**{name: json.dumps({"state": "success", "attempt": 1}) for name in done},
                       **{name: json.dumps({"state": "running", "attempt": 1, "worker": "w"}) for name in started}}
            counts = {"success": 1 + (tick - 1) * 20, "running": 20, "pending": 1002 - 1 - tick * 20}
            for run_id in runs:
                pipe = client.pipeline(transaction=True)
                pipe.hset(keys.tasks(run_id), mapping=records)
                pipe.hset(keys.run(run_id), mapping={"counts": json.dumps(counts), "last_event": f"{tick}-0"})
                pipe.execute()
            stop.wait(0.25)

    listeners = [threading.Thread(target=listen, args=(k,), daemon=True) for k in range(len(runs))]
    for thread in listeners:
        thread.start()
    writer = threading.Thread(target=coordinate, daemon=True)
    writer.start()
    time.sleep(1.5)  # every stream open and past its first snapshot
    pid = stack["dashboard"].process.pid
    commands_before = _reads(client)
    cpu_before, started = _cpu_seconds(pid), time.monotonic()
    time.sleep(4.0)
    commands_after = _reads(client)
    cpu_after, elapsed = _cpu_seconds(pid), time.monotonic() - started
    stop.set()
    writer.join(5)
    assert all(received), received  # every page got changes
    per_second = (commands_after - commands_before) / elapsed
    cpu_share = (cpu_after - cpu_before) / elapsed
    print(f"dashboard: {per_second:.0f} Redis commands/s and {cpu_share:.1%} of a core for 20 busy pages")
    assert per_second < 100, per_second
    assert cpu_share < 0.20, cpu_share


INJECTED = "img, script:not([src]):not([nonce]), iframe, [onerror], [onload]"
"""Elements a hostile name would add to a page that inserted it as HTML (the pages' own inline
scripts carry a nonce; the dashboard shows no image)."""


def _no_injection(page: Any, where: str) -> None:
    assert page.evaluate("window.__xss") is None, where
    assert page.locator(INJECTED).count() == 0, (where, page.content()[:2000])


def test_markup_from_redis_is_shown_as_text_on_every_page(stack: dict[str, Any], page: Any) -> None:
    import dashboard_tasks
    from shared.params import PARAMS_FIELD, encode_params
    from shared.workers import LEAN, WorkerInfo, beat

    hostile = dashboard_tasks.HOSTILE
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    run_id, thread = _run(stack["url"], dashboard_tasks.hostile_workflow())
    assert thread is not None
    thread.join(60)
    client, base = stack["client"], stack["dashboard"].base
    client.hset(keys.run(run_id), PARAMS_FIELD, encode_params({hostile: hostile}) or b"")
    beat(client, WorkerInfo(f"w {hostile}", LEAN, (f"q {hostile}",), host=f"h {hostile}"), 30)
    try:
        page.goto(f"{base}/?workflow={urllib.parse.quote('dash ' + hostile)}")
        assert f"dash {hostile}" in page.inner_text("#runs")
        _no_injection(page, "runs")
        page.goto(f"{base}/runs/{run_id}")
        page.wait_for_selector("#graph [data-task='plain']")
        nodes = page.eval_on_selector_all("#graph [data-task]", "els => els.map(e => e.dataset.task)")
        assert sorted(nodes) == sorted(["plain", f"t {hostile}"])
        assert page.inner_text("#run-workflow") == f"dash {hostile}"
        assert hostile in page.inner_text("#run-params")
        assert hostile in page.inner_text("#grid")
        _no_injection(page, "run")
        _shot(page, "hostile-run")
        page.locator("#graph [data-kind='task']").nth(1).click()
        page.wait_for_selector("#traceback")
        page.wait_for_selector(f"#log:has-text('{hostile[:20]}')")
        assert f"ValueError: {hostile}" in page.inner_text("#traceback")
        assert hostile in page.inner_text("#attempts")
        _no_injection(page, "task")
        page.goto(f"{base}/workers")
        page.wait_for_timeout(2500)  # one refresh from the event stream, drawn by workers.js
        assert f"w {hostile}" in page.inner_text("#workers") and f"h {hostile}" in page.inner_text("#workers")
        _no_injection(page, "workers")
    finally:
        client.delete(keys.alive(f"w {hostile}"))
        client.srem(keys.WORKERS, f"w {hostile}")
    assert dialogs == []


def test_orch_dashboard_without_login_answers_only_its_own_host_names(stack: dict[str, Any], tmp_path: Path) -> None:
    import http.client

    def status(base: str, host: str) -> int:
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=10)
        try:
            conn.request("GET", "/workers", headers={"Host": host})
            answer = conn.getresponse()
            answer.read()
            return answer.status
        finally:
            conn.close()
    dashboard = stack["dashboard"]
    assert status(dashboard.base, f"localhost:{dashboard.port}") == 200
    assert status(dashboard.base, f"rebound.example:{dashboard.port}") == 421  # DNS rebinding
    named = Dashboard(stack["url"], tmp_path, extra=("--allowed-host", "dash.internal"))
    try:
        assert status(named.base, "dash.internal") == 200
        assert status(named.base, "other.internal") == 421
    finally:
        named.stop()
