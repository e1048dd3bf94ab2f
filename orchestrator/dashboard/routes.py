"""The dashboard's request handlers: each reads through :mod:`orchestrator.dashboard.views` (in a
thread: the Redis client is synchronous) and renders a template, answers JSON, or opens a
server-sent event stream fed by :mod:`orchestrator.dashboard.live`. :mod:`orchestrator.dashboard.app`
routes to them (wrapped in its login check)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from orchestrator.dashboard import actions, views
from orchestrator.dashboard.live import POLL, LogFollow, RunWatch
from orchestrator.dashboard.security import csrf_ok, local_path, new_csrf_token, same_origin

WORKERS_REFRESH = 2.0
"""Seconds between two readings of the workers page's data (a handful of commands each)."""


def _dash(request: Request) -> Any:
    """The application's :class:`~orchestrator.dashboard.app.Dashboard`."""
    return request.app.state.dashboard


MAX_PAGE = 399
"""The last page of runs shown (pages count from 0): 10,000 runs; a larger number shows this one."""
MAX_NUMBER = 2 ** 53
"""Largest attempt or log line number taken from a query; more is clamped (Redis stream ids are 64-bit)."""


def client_address(request: Request) -> str:
    """The requesting address (a proxy's own on this machine passes the real one in
    ``X-Forwarded-For``, which uvicorn applies)."""
    return request.client.host if request.client else "-"


def _int(value: Optional[str], default: Optional[int] = None, low: int = 0, high: int = MAX_NUMBER
         ) -> Optional[int]:
    """A query parameter as an integer within ``low``..``high`` (clamped); ``default`` when absent or
    not a number (``int()`` itself refuses strings of over 4,300 digits)."""
    try:
        number = int(value) if value not in (None, "") and len(str(value)) <= 20 else None
    except ValueError:
        number = None
    return default if number is None else min(high, max(low, number))


async def _stream(look: Callable[[], list[tuple[str, Any]]], every: float, request: Request,
                  done: Callable[[], bool] = lambda: False) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events: ``look()`` (in a thread) every ``every`` seconds, each event it returns sent
    as JSON, until the client goes or ``done()``. Counted in the dashboard's open streams."""
    dashboard = _dash(request)
    dashboard.open_streams += 1
    try:
        while not await request.is_disconnected():
            for event, data in await run_in_threadpool(look):
                yield {"event": event, "data": json.dumps(data)}
            if done():
                return
            await asyncio.sleep(every)
    finally:
        dashboard.open_streams -= 1


def _no_room(request: Request) -> Optional[Response]:
    """503 when the dashboard already serves its most live streams (each costs a Redis look every 0.5 s)."""
    dashboard = _dash(request)
    if dashboard.open_streams < dashboard.max_streams:
        return None
    return JSONResponse({"error": f"the dashboard already serves {dashboard.max_streams} live pages: "
                                  f"close some, or reload later"}, status_code=503, headers={"Retry-After": "5"})


async def runs(request: Request) -> Response:
    """``/``: one page of runs, filtered like ``orch runs``."""
    state = request.query_params.get("state") or None
    workflow = request.query_params.get("workflow") or None
    schedule = request.query_params.get("schedule") or None
    number = _int(request.query_params.get("page"), 0, high=MAX_PAGE) or 0
    data = await run_in_threadpool(views.runs_page, _dash(request).connection, state=state, workflow=workflow,
                                   schedule=schedule, page=number)
    data["has_next"] = data["has_next"] and number < MAX_PAGE
    filters = {"state": state or "", "workflow": workflow or "", "schedule": schedule or ""}
    return _dash(request).render(request, "runs.html", filters=filters, **data)


async def run(request: Request) -> Response:
    """``/runs/{run_id}``: the header; the graph and grid come from :func:`run_data`."""
    run_id = request.path_params["run_id"]
    header = await run_in_threadpool(views.run_header, _dash(request).connection, run_id)
    return _dash(request).render(request, "run.html", run_id=run_id, header=header)


async def run_data(request: Request) -> Response:
    """``/api/runs/{run_id}``: header, grid rows and graph as JSON."""
    data = await run_in_threadpool(views.run_document, _dash(request).connection, request.path_params["run_id"])
    return JSONResponse(data)


async def run_events(request: Request) -> Response:
    """``/api/runs/{run_id}/events``: the run's changes, from the marker the page's data was read at."""
    refused = _no_room(request)
    if refused is not None:
        return refused
    watch = RunWatch(_dash(request).connection, request.path_params["run_id"])
    await run_in_threadpool(watch.start, request.query_params.get("since"))
    return EventSourceResponse(_stream(watch.look, POLL, request), ping=15)


async def task(request: Request) -> Response:
    """``/runs/{run_id}/tasks/{task}``: attempts, traceback; the log comes from :func:`log`."""
    run_id, name = request.path_params["run_id"], request.path_params["task"]
    data = await run_in_threadpool(views.task_document, _dash(request).connection, run_id, name)
    return _dash(request).render(request, "task.html", run_id=run_id, task=data, header=data["header"])


async def log(request: Request) -> Response:
    """``/api/runs/{run_id}/log?task=&attempt=&before=``: a page of one attempt's log."""
    query = request.query_params
    data = await run_in_threadpool(views.log_document, _dash(request).connection, request.path_params["run_id"],
                                   query.get("task", ""), _int(query.get("attempt"), 1, low=1) or 1,
                                   before=_int(query.get("before")))
    return JSONResponse(data)


async def log_events(request: Request) -> Response:
    """``/api/runs/{run_id}/log/events?task=&attempt=&after=``: the followed attempt's new lines."""
    query = request.query_params
    refused = _no_room(request)
    if refused is not None:
        return refused
    follow = LogFollow(_dash(request).connection, request.path_params["run_id"], query.get("task", ""),
                       _int(query.get("attempt"), 1, low=1) or 1, _int(query.get("after")))
    return EventSourceResponse(_stream(follow.look, POLL, request, lambda: follow.done), ping=15)


async def workers(request: Request) -> Response:
    """``/workers``: live workers and queues."""
    data = await run_in_threadpool(views.workers_document, _dash(request).connection)
    return _dash(request).render(request, "workers.html", data=data, refreshed=time.time())


async def workers_events(request: Request) -> Response:
    """``/api/workers/events``: the workers page's data again every :data:`WORKERS_REFRESH` s."""
    refused = _no_room(request)
    if refused is not None:
        return refused

    def look() -> list[tuple[str, Any]]:
        return [("workers", views.workers_document(_dash(request).connection))]
    return EventSourceResponse(_stream(look, WORKERS_REFRESH, request), ping=15)


async def schedules(request: Request) -> Response:
    """``/schedules``: each schedule as ``orch schedule show`` describes it."""
    data = await run_in_threadpool(actions.schedules_document, _dash(request).connection)
    return _dash(request).render(request, "schedules.html", data=data)


async def metrics(request: Request) -> Response:
    """``/metrics``: the Prometheus text."""
    body, content_type = await run_in_threadpool(actions.metrics, _dash(request).connection)
    return Response(body, media_type=content_type)


async def login(request: Request) -> Response:
    """``/login``: the form, and the check of its user and password (a fresh session on success)."""
    dashboard = _dash(request)
    users = dashboard.users
    if not users.required:
        return RedirectResponse("/", status_code=303)
    error, status = None, 200
    if request.method == "POST":
        form = await request.form()
        address = client_address(request)
        wait = dashboard.throttle.wait(address)
        if wait > 0:
            error, status = f"too many failed logins from your address: try again in {wait:.0f} s", 429
        elif not csrf_ok(request.session.get("csrf"), str(form.get("csrf", ""))):
            error, status = "this form is stale: try again", 403
        elif await dashboard.verify(str(form.get("user", "")), str(form.get("password", ""))):
            dashboard.throttle.succeeded(address)
            request.session.clear()  # a new session: nothing from before the login is kept
            request.session["user"] = str(form.get("user"))
            request.session["csrf"] = new_csrf_token()
            return RedirectResponse(local_path(request.query_params.get("next")), status_code=303)
        else:
            dashboard.throttle.failed(address)
            error, status = "wrong user name or password", 401
    response = dashboard.render(request, "login.html", status, error=error)
    if status == 429:
        response.headers["Retry-After"] = str(int(wait) + 1)
    return response


async def logout(request: Request) -> Response:
    """``/logout`` (POST, with the CSRF token): end the session."""
    form = await request.form()
    if csrf_ok(request.session.get("csrf"), str(form.get("csrf", ""))) and same_origin(
            request.headers.get("origin"), request.headers.get("host")):
        request.session.clear()
    return RedirectResponse("/login", status_code=303)


async def favicon(request: Request) -> Response:
    """No icon (and no 404 in the log for one)."""
    return Response(status_code=204)

