"""The ``orch`` commands that work on a cluster through Redis.

``worker``, ``coordinator``, ``status``, ``runs``, ``cancel`` and ``resume``;
registered on the root group of :mod:`orchestrator.cli` when it is imported.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from datetime import datetime
from typing import Optional

import click
from rich.table import Table

from orchestrator import report
from orchestrator.cli import (EXIT_FAILED, EXIT_OK, CliOptions, _exit, exit_code_of, handle_errors, main,
                              pass_options, redis_url_option)
from orchestrator.distributed import cancel_run, resume_run, serve_coordinator, who
from orchestrator.run_store import list_runs, load_tasks
from orchestrator.workflow import Workflow
from shared import keys
from shared.config import Settings
from shared.connection import connect
from shared.states import RunState


def _redis(options: CliOptions, command: str):  # -> redis.Redis
    return connect(options.require_redis_url(command))


def _when(epoch: Optional[float]) -> str:
    return "-" if not epoch else datetime.fromtimestamp(float(epoch)).strftime("%Y-%m-%d %H:%M:%S")


@main.command()
@click.option("--queues", "-Q", default="default", show_default=True, metavar="Q1,Q2",
              help="Comma-separated queues to serve, in priority order.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tasks run at once (worker processes, or lean work processes).")
@click.option("--burst", is_flag=True, help="Quit once the queues are empty.")
@click.option("--path", "paths", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Put DIR first on sys.path so task modules import (repeatable).")
@click.option("--name", default=None, help="Worker name (default: generated).")
@click.option("--mode", type=click.Choice(["lean", "rq"]), default="lean", show_default=True,
              envvar="ORCH_WORKER_MODE", show_envvar=True,
              help="'lean': persistent work processes (fast). 'rq': the RQ-compatible worker, a forked work "
                   "horse per task, seen by 'rq info' and RQ's tools. Submissions follow either on their own.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"]))
@redis_url_option
@pass_options
@handle_errors
def worker(options: CliOptions, queues: str, concurrency: int, burst: bool, paths: tuple[str, ...],
           name: Optional[str], mode: str, log_level: str) -> None:
    """Run tasks from QUEUES until stopped.

    SIGTERM or Ctrl-C once: finish the task in hand, then stop. Twice: stop at once.
    """
    url = options.require_redis_url("worker")
    for path in reversed(paths):
        sys.path.insert(0, os.path.abspath(path))
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.abspath(p) for p in paths] +
                                               ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    queue_names = [q.strip() for q in queues.split(",") if q.strip()]
    if not queue_names:
        raise click.UsageError("--queues names no queue")
    connection = connect(url)
    shown = connection.connection_pool.connection_kwargs
    where = shown.get("path") or f"{shown.get('host')}:{shown.get('port')}/{shown.get('db', 0)}"
    click.echo(f"orch worker ({mode}) on {socket.gethostname()} connected to Redis at {where}; "
               f"queues: {', '.join(queue_names)}; concurrency: {concurrency}", err=True)
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if mode == "lean":
        from worker.lean import LeanWorker

        LeanWorker(url, queue_names, concurrency=concurrency, name=name, burst=burst).work()
        return
    from worker.rq_worker import serve

    serve(connection, queue_names, concurrency=concurrency, burst=burst, name=name, logging_level=log_level)


@main.command()
@click.option("--poll", type=click.FloatRange(min=0.05), default=0.5, show_default=True,
              help="Seconds between looks for runs to adopt.")
@redis_url_option
@pass_options
@handle_errors
def coordinator(options: CliOptions, poll: float) -> None:
    """Drive runs submitted with --detach and adopt runs whose coordinator died.

    Run one or more: a lease makes exactly one drive each run.
    """
    connection = _redis(options, "coordinator")
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    click.echo(f"orch coordinator on {socket.gethostname()} (pid {os.getpid()}) watching for runs", err=True)
    try:
        serve_coordinator(connection, poll=poll)
    except KeyboardInterrupt:
        click.echo("coordinator stopped; runs it drove are adopted by another coordinator once their lease lapses",
                   err=True)


@main.command()
@click.argument("run_id")
@redis_url_option
@pass_options
@handle_errors
def status(options: CliOptions, run_id: str) -> None:
    """Show the state of run RUN_ID and of each of its tasks. Exits 0 if it succeeded."""
    meta, _, tasks = load_tasks(_redis(options, "status"), run_id, with_results=False)
    workflow = Workflow(meta.get("workflow") or "workflow")
    workflow.tasks = tasks
    click.echo(f"run {run_id} ({workflow.name}): {meta.get('state')}, created {_when(meta.get('created_at'))}, "
               f"finished {_when(meta.get('finished_at'))}")
    if meta.get("cancelled_by"):
        click.echo(f"cancelled by {meta['cancelled_by']} at {_when(meta.get('cancelled_at'))}")
    if meta.get("warning") and meta.get("state") == RunState.RUNNING.value:
        click.echo(f"warning: {meta['warning']}")
    report.print_results(workflow)
    _exit(EXIT_OK if meta.get("state") == RunState.SUCCESS.value else exit_code_of(workflow))


@main.command()
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@redis_url_option
@pass_options
@handle_errors
def runs(options: CliOptions, limit: int) -> None:
    """List the most recent runs, newest first, with their state and task counts."""
    table = Table()
    for column in ("run id", "workflow", "state", "created", "tasks"):
        table.add_column(column, no_wrap=column != "tasks")
    for snapshot in list_runs(_redis(options, "runs"), limit):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(snapshot.counts.items()))
        table.add_row(snapshot.run_id, snapshot.workflow, snapshot.state, _when(snapshot.created_at), counts)
    report.stdout_console().print(table)


@main.command()
@click.argument("run_id")
@redis_url_option
@pass_options
@handle_errors
def cancel(options: CliOptions, run_id: str) -> None:
    """Cancel run RUN_ID: queued tasks are removed, running ones stopped, no new task starts."""
    connection = _redis(options, "cancel")
    by = f"orch cancel by {who()}"
    if cancel_run(connection, run_id, by):
        click.echo(f"run {run_id} cancelled (no coordinator was driving it)")
        return
    # A live coordinator cancels the run at once. A dead one still holds its lease until it
    # lapses (ORCH_LEASE_TTL): keep trying to adopt the run meanwhile, and cancel it then.
    deadline = time.monotonic() + max(10.0, Settings().lease_ttl + 5.0)
    state = None
    while time.monotonic() < deadline:
        state = connection.hget(keys.run(run_id), "state")
        if state and state.decode() != RunState.RUNNING.value:
            break
        if cancel_run(connection, run_id, by, request=False):
            click.echo(f"run {run_id} cancelled (its coordinator had stopped driving it)")
            return
        time.sleep(0.1)
    shown = state.decode() if state else "?"
    click.echo(f"run {run_id}: cancel requested; its coordinator reports: {shown}")
    if shown == RunState.RUNNING.value:
        _exit(EXIT_FAILED)


@main.command()
@click.argument("run_id")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
@redis_url_option
@pass_options
@handle_errors
def resume(options: CliOptions, run_id: str, quiet: bool) -> None:
    """Continue run RUN_ID from its state in Redis (after its coordinator died)."""
    connection = _redis(options, "resume")
    meta, _, tasks = load_tasks(connection, run_id, with_results=False)
    with report.ProgressDisplay(len(tasks), enabled=not quiet) as progress:
        _, tasks = resume_run(connection, run_id, on_progress=progress)
    workflow = Workflow(meta.get("workflow") or "workflow")
    workflow.tasks = tasks
    report.print_results(workflow)
    _exit(exit_code_of(workflow))
