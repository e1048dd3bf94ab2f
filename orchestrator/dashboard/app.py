"""The dashboard's web application (Starlette): pages, their JSON and event streams, and actions.

:func:`create_app` builds it from a Redis connection and the users who may log in. Pages
render from :mod:`orchestrator.dashboard.views`; live updates come from
:mod:`orchestrator.dashboard.live` as server-sent events; each action (POST, CSRF-checked)
calls the very function its CLI command calls (:mod:`orchestrator.dashboard.actions`).
"""
from __future__ import annotations

import asyncio
import base64
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import redis
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from orchestrator.dashboard import actions, views
from orchestrator.dashboard.live import POLL, LogFollow, RunWatch
from orchestrator.dashboard.security import Users, csrf_ok, new_csrf_token, same_origin
from shared.errors import RunNotFoundError, UnknownTaskError, WorkflowError
from shared.states import RunState, TaskState

HERE = Path(__file__).resolve().parent
WORKERS_REFRESH = 2.0
"""Seconds between two readings of the workers page's data (a handful of commands each)."""
Handler = Callable[[Request], Awaitable[Response]]


def _when(value: Optional[float]) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "-"


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


class Dashboard:
    """The application's state: the Redis connection, the users, and what this Redis user may do."""

    def __init__(self, connection: redis.Redis, users: Users, secret: Optional[str] = None) -> None:
        self.connection = connection
        self.users = users
        self.secret = secret or secrets.token_urlsafe(32)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["when"] = _when
        self.templates.env.filters["seconds"] = _seconds
        self.access = actions.Access(connection)

    # ------------------------------------------------------------------ plumbing
    def user_of(self, request: Request) -> Optional[str]:
        """The logged-in user (``"-"`` when no login is configured), else ``None``."""
        if not self.users.required:
            return "-"
        user = request.session.get("user")
        if user in self.users.hashes:
            return str(user)
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if self.users.verify(name, password):
                return name
        return None

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return str(token)

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        flash = request.session.pop("flash", None)
        base = {"request": request, "user": self.user_of(request), "csrf": self.csrf(request), "flash": flash,
                "login": self.users.required, "states": [s.value for s in TaskState],
                "run_states": [s.value for s in RunState], "writable": self.access.writable(),
                "read_only_reason": actions.READ_ONLY_REASON}
        return self.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)

    def page(self, handler: Handler) -> Handler:
        """Wrap a page or API handler: a login when one is required, and errors shown as pages."""
        async def wrapped(request: Request) -> Response:
            if self.user_of(request) is None:
                if request.url.path.startswith("/api/") or request.url.path == "/metrics":
                    return JSONResponse({"error": "log in first"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Basic realm="orch"'})
                return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            try:
                return await handler(request)
            except (RunNotFoundError, UnknownTaskError) as exc:
                return self.render(request, "error.html", 404, message=str(exc).strip('"'))
            except redis.exceptions.NoPermissionError as exc:
                return self.render(request, "error.html", 403, message=f"Redis refused a command: {exc}")
            except WorkflowError as exc:
                return self.render(request, "error.html", 400, message=str(exc))
        return wrapped

    def action(self, handler: Callable[[Request, dict[str, str], str], str]) -> Handler:
        """Wrap a POST action: CSRF token and Origin checked, done in a thread, its outcome flashed."""
        async def wrapped(request: Request) -> Response:
            form = {k: str(v) for k, v in (await request.form()).items()}
            if not csrf_ok(request.session.get("csrf"), form.get("csrf")) or not same_origin(
                    request.headers.get("origin"), request.headers.get("host")):
                return self.render(request, "error.html", 403, message="this form is stale or came from another "
                                                                      "site (CSRF check failed): reload the page")
            back = form.get("back") or "/"
            if not back.startswith("/") or back.startswith("//"):
                back = "/"
            try:
                message = await run_in_threadpool(handler, request, form, self.user_of(request) or "-")
                request.session["flash"] = {"ok": True, "text": message}
            except actions.ActionRefused as exc:
                request.session["flash"] = {"ok": False, "text": str(exc)}
            except WorkflowError as exc:
                request.session["flash"] = {"ok": False, "text": str(exc).strip('"')}
            except redis.exceptions.NoPermissionError as exc:
                request.session["flash"] = {"ok": False, "text": f"Redis refused: {exc}"}
            return RedirectResponse(back, status_code=303)
        return self.page(wrapped)


def _int(value: Optional[str], default: Optional[int] = None) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


async def _stream(look: Callable[[], list[tuple[str, Any]]], every: float, request: Request,
                  done: Callable[[], bool] = lambda: False) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events: ``look()`` (in a thread) every ``every`` seconds, each event it returns sent
    as JSON, until the client goes or ``done()``."""
    import json

    while not await request.is_disconnected():
        for event, data in await run_in_threadpool(look):
            yield {"event": event, "data": json.dumps(data)}
        if done():
            return
        await asyncio.sleep(every)


def create_app(connection: redis.Redis, users: Users, secret: Optional[str] = None) -> Starlette:
    """The dashboard as an ASGI application reading (and acting on) the Redis of ``connection``."""
    app_state = Dashboard(connection, users, secret)
    page, action, render = app_state.page, app_state.action, app_state.render

    async def runs(request: Request) -> Response:
        state = request.query_params.get("state") or None
        workflow = request.query_params.get("workflow") or None
        schedule = request.query_params.get("schedule") or None
        number = max(0, _int(request.query_params.get("page"), 0) or 0)
        data = await run_in_threadpool(views.runs_page, connection, state=state, workflow=workflow,
                                       schedule=schedule, page=number)
        filters = {"state": state or "", "workflow": workflow or "", "schedule": schedule or ""}
        return render(request, "runs.html", filters=filters, **data)

    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        header = await run_in_threadpool(views.run_header, connection, run_id)
        return render(request, "run.html", run_id=run_id, header=header)

    async def run_data(request: Request) -> Response:
        data = await run_in_threadpool(views.run_document, connection, request.path_params["run_id"])
        return JSONResponse(data)

    async def run_events(request: Request) -> Response:
        watch = RunWatch(connection, request.path_params["run_id"])
        await run_in_threadpool(watch.start, request.query_params.get("since"))
        return EventSourceResponse(_stream(watch.look, POLL, request), ping=15)

    async def task(request: Request) -> Response:
        run_id, name = request.path_params["run_id"], request.path_params["task"]
        data = await run_in_threadpool(views.task_document, connection, run_id, name)
        return render(request, "task.html", run_id=run_id, task=data, header=data["header"])

    async def log(request: Request) -> Response:
        query = request.query_params
        data = await run_in_threadpool(views.log_document, connection, request.path_params["run_id"],
                                       query.get("task", ""), _int(query.get("attempt"), 1) or 1,
                                       before=_int(query.get("before")))
        return JSONResponse(data)

    async def log_events(request: Request) -> Response:
        query = request.query_params
        follow = LogFollow(connection, request.path_params["run_id"], query.get("task", ""),
                           _int(query.get("attempt"), 1) or 1, _int(query.get("after")))
        return EventSourceResponse(_stream(follow.look, POLL, request, lambda: follow.done), ping=15)

    async def workers(request: Request) -> Response:
        data = await run_in_threadpool(views.workers_document, connection)
        return render(request, "workers.html", data=data, refreshed=time.time())

    async def workers_events(request: Request) -> Response:
        def look() -> list[tuple[str, Any]]:
            return [("workers", views.workers_document(connection))]
        return EventSourceResponse(_stream(look, WORKERS_REFRESH, request), ping=15)

    async def schedules(request: Request) -> Response:
        data = await run_in_threadpool(actions.schedules_document, connection)
        return render(request, "schedules.html", data=data)

    async def metrics(request: Request) -> Response:
        body, content_type = await run_in_threadpool(actions.metrics, connection)
        return Response(body, media_type=content_type)

    async def login(request: Request) -> Response:
        if not users.required:
            return RedirectResponse("/", status_code=303)
        error = None
        if request.method == "POST":
            form = await request.form()
            if not csrf_ok(request.session.get("csrf"), str(form.get("csrf", ""))):
                error = "this form is stale: try again"
            elif await run_in_threadpool(users.verify, str(form.get("user", "")), str(form.get("password", ""))):
                request.session.clear()
                request.session["user"] = str(form.get("user"))
                request.session["csrf"] = new_csrf_token()
                target = str(request.query_params.get("next") or "/")
                return RedirectResponse(target if target.startswith("/") and not target.startswith("//") else "/",
                                        status_code=303)
            else:
                error = "wrong user name or password"
        return render(request, "login.html", 401 if error else 200, error=error)

    async def logout(request: Request) -> Response:
        form = await request.form()
        if csrf_ok(request.session.get("csrf"), str(form.get("csrf", ""))):
            request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", page(runs)),
        Route("/runs/{run_id}", page(run)),
        Route("/runs/{run_id}/tasks/{task:path}", page(task)),
        Route("/runs/{run_id}/cancel", action(actions.cancel), methods=["POST"]),
        Route("/runs/{run_id}/retry", action(actions.retry), methods=["POST"]),
        Route("/runs/{run_id}/rerun", action(actions.rerun), methods=["POST"]),
        Route("/workers", page(workers)),
        Route("/schedules", page(schedules)),
        Route("/schedules/{name}/{verb}", action(actions.schedule_action), methods=["POST"]),
        Route("/metrics", page(metrics)),
        Route("/api/runs/{run_id}", page(run_data)),
        Route("/api/runs/{run_id}/events", page(run_events)),
        Route("/api/runs/{run_id}/log", page(log)),
        Route("/api/runs/{run_id}/log/events", page(log_events)),
        Route("/api/workers/events", page(workers_events)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/favicon.ico", favicon),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=app_state.secret, session_cookie="orch_dashboard",
                             same_site="strict", max_age=12 * 3600)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.dashboard = app_state
    return app
