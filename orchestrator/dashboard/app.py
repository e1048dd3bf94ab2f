"""The dashboard's web application (Starlette): pages, their JSON and event streams, and actions.

:func:`create_app` builds it from a Redis connection and the users who may log in. Pages
render from :mod:`orchestrator.dashboard.views`; live updates come from
:mod:`orchestrator.dashboard.live` as server-sent events; each action (POST, CSRF-checked)
calls the very function its CLI command calls (:mod:`orchestrator.dashboard.actions`).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlencode

import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from orchestrator.dashboard import actions, routes
from orchestrator.dashboard.routes import client_address
from orchestrator.dashboard.guard import NONCE_KEY, BodyTooLarge, Guard
from orchestrator.dashboard.security import (CredentialCache, LoginThrottle, Users, csrf_ok, local_path,
                                             new_csrf_token, same_origin)
from shared.errors import RunNotFoundError, UnknownTaskError, WorkflowError
from shared.states import RunState, TaskState

HERE = Path(__file__).resolve().parent
Handler = Callable[[Request], Awaitable[Response]]
MAX_STREAMS = 100
"""Live event streams (open run, task and workers pages) served at once; more are refused (503)."""
MAX_VERIFYING = 2
"""Password checks (scrypt: tens of ms of CPU and 16 MiB each) run at once; more wait their turn, so a
flood of logins from many addresses cannot take every thread or all memory of the dashboard."""
log = logging.getLogger("orch.dashboard")


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

    def __init__(self, connection: redis.Redis, users: Users, secret: Optional[str] = None,
                 max_streams: int = MAX_STREAMS) -> None:
        self.connection = connection
        self.users = users
        self.throttle = LoginThrottle()
        self.credentials = CredentialCache()
        self.max_streams = max_streams
        self.open_streams = 0
        self._verifying: Optional[asyncio.Semaphore] = None
        self.secret = secret or secrets.token_urlsafe(32)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["when"] = _when
        self.templates.env.filters["seconds"] = _seconds
        self.access = actions.Access(connection)

    # ------------------------------------------------------------------ plumbing
    def user_of(self, request: Request) -> Optional[str]:
        """The logged-in user (``"-"`` when no login is configured), else ``None``; HTTP basic
        credentials count once :meth:`identify` has checked them for this request."""
        if not self.users.required:
            return "-"
        user = request.session.get("user")
        if user in self.users.hashes:
            return str(user)
        return getattr(request.state, "basic_user", None)

    async def verify(self, user: str, password: str) -> bool:
        """:meth:`Users.verify` in a thread, at most :data:`MAX_VERIFYING` at once."""
        if self._verifying is None:
            self._verifying = asyncio.Semaphore(MAX_VERIFYING)
        async with self._verifying:
            return bool(await run_in_threadpool(self.users.verify, user, password))

    async def identify(self, request: Request) -> Optional[str]:
        """:meth:`user_of`, after checking HTTP basic credentials if the request has some: known
        ones from :attr:`credentials` (no scrypt), others in a thread, each failure counted by
        :attr:`throttle` (a throttled address's credentials are not even checked)."""
        user = self.user_of(request)
        header = request.headers.get("authorization", "")
        if user is not None or not header.lower().startswith("basic "):
            return user
        known = self.credentials.get(header)
        if known is not None and known in self.users.hashes:
            request.state.basic_user = known
            return known
        address = client_address(request)
        if self.throttle.wait(address) > 0:
            return None
        try:
            name, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            name, password = "", ""
        verified = bool(name) and await self.verify(name, password)
        if verified:
            self.throttle.succeeded(address)
            self.credentials.put(header, name)
            request.state.basic_user = name
            return name
        self.throttle.failed(address)
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
                "read_only_reason": actions.READ_ONLY_REASON, "nonce": request.scope.get("state", {}).get(NONCE_KEY)}
        return self.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)

    def error(self, request: Request, status: int, message: str, headers: Optional[dict[str, str]] = None
              ) -> Response:
        """One clear error: JSON for the API and ``/metrics``, else the error page."""
        if _is_api(request):
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        response = self.render(request, "error.html", status, message=message)
        response.headers.update(headers or {})
        return response

    def page(self, handler: Handler) -> Handler:
        """Wrap a page or API handler: a login when one is required, and errors shown as one line
        (an unexpected one is logged in one line, and the browser is told no more than that)."""
        async def wrapped(request: Request) -> Response:
            if await self.identify(request) is None:
                wait = self.throttle.wait(client_address(request))
                if _is_api(request):
                    if wait > 0:
                        return self.error(request, 429, f"too many failed logins: try again in {wait:.0f} s",
                                          {"Retry-After": str(int(wait) + 1)})
                    return self.error(request, 401, "log in first", {"WWW-Authenticate": 'Basic realm="orch"'})
                return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", status_code=303)
            try:
                return await handler(request)
            except (RunNotFoundError, UnknownTaskError) as exc:
                return self.error(request, 404, str(exc).strip('"'))
            except redis.exceptions.NoPermissionError as exc:
                return self.error(request, 403, f"Redis refused a command: {exc}")
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                return self.error(request, 503, f"lost Redis ({exc}): retry in a moment")
            except WorkflowError as exc:
                return self.error(request, 400, str(exc))
            except (HTTPException, BodyTooLarge):
                raise
            except Exception as exc:  # noqa: BLE001 - the browser gets one line, the log one line too
                log.error("orch dashboard: %s %s failed: %s: %s", request.method, request.url.path,
                          type(exc).__name__, exc)
                return self.error(request, 500, "the dashboard could not answer this request (its log says why)")
        return wrapped

    def action(self, handler: Callable[[Request, dict[str, str], str], str]) -> Handler:
        """Wrap a POST action: CSRF token and Origin checked, done in a thread, its outcome flashed."""
        async def wrapped(request: Request) -> Response:
            form = {k: str(v) for k, v in (await request.form()).items()}
            if not csrf_ok(request.session.get("csrf"), form.get("csrf")) or not same_origin(
                    request.headers.get("origin"), request.headers.get("host")):
                return self.render(request, "error.html", 403, message="this form is stale or came from another "
                                                                      "site (CSRF check failed): reload the page")
            back = local_path(form.get("back"))
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


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/metrics"


def create_app(connection: redis.Redis, users: Users, secret: Optional[str] = None, *,
               allowed_hosts: Optional[frozenset[str]] = None, max_streams: int = MAX_STREAMS) -> Starlette:
    """The dashboard as an ASGI application reading (and acting on) the Redis of ``connection``.
    ``allowed_hosts``: the ``Host`` names it answers to (``None``: any; see
    :func:`orchestrator.dashboard.security.allowed_hosts`)."""
    app_state = Dashboard(connection, users, secret, max_streams)
    page, action = app_state.page, app_state.action

    table = [
        Route("/", page(routes.runs)),
        Route("/runs/{run_id}", page(routes.run)),
        Route("/runs/{run_id}/tasks/{task:path}", page(routes.task)),
        Route("/runs/{run_id}/cancel", action(actions.cancel), methods=["POST"]),
        Route("/runs/{run_id}/retry", action(actions.retry), methods=["POST"]),
        Route("/runs/{run_id}/rerun", action(actions.rerun), methods=["POST"]),
        Route("/workers", page(routes.workers)),
        Route("/schedules", page(routes.schedules)),
        Route("/schedules/{name}/{verb}", action(actions.schedule_action), methods=["POST"]),
        Route("/metrics", page(routes.metrics)),
        Route("/api/runs/{run_id}", page(routes.run_data)),
        Route("/api/runs/{run_id}/events", page(routes.run_events)),
        Route("/api/runs/{run_id}/log", page(routes.log)),
        Route("/api/runs/{run_id}/log/events", page(routes.log_events)),
        Route("/api/workers/events", page(routes.workers_events)),
        Route("/login", routes.login, methods=["GET", "POST"]),
        Route("/logout", routes.logout, methods=["POST"]),
        Route("/favicon.ico", routes.favicon),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [Middleware(Guard, allowed_hosts=allowed_hosts),
                  Middleware(SessionMiddleware, secret_key=app_state.secret, session_cookie="orch_dashboard",
                             same_site="strict", max_age=12 * 3600)]
    app = Starlette(routes=table, middleware=middleware)
    app.state.dashboard = app_state
    return app
