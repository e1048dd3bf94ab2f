"""The ``orch`` commands that work on a cluster through Redis.

``worker``, ``coordinator``, ``status``, ``runs``, ``cancel``, ``resume`` and ``retry``;
registered on the root group of :mod:`orchestrator.cli` when it is imported.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime
from typing import Optional

import click
import redis

from orchestrator import report
from orchestrator.cli import (EXIT_FAILED, CliOptions, _exit, exit_code_of, handle_errors,
                              interrupting_signals, main, pass_options, redis_url_option, say_cancelled)
from orchestrator.distributed import cancel_run, resume_run, retry_run, serve_coordinator, stored_run, who
from orchestrator.run_store import epoch, load_history, load_tasks, read_run, run_params, run_retries
from orchestrator.run_views import (check_schedule_known, find_runs, run_summary, status_document,
                                    wait_until_final)
from orchestrator.workflow import Workflow
from shared import keys
from shared.allow import Allowlist, worker_allowlist
from shared.config import Settings, check_log_settings
from shared.signing import Signer, configured_signer
from shared.connection import connect
from shared.states import RunState


def _redis(options: CliOptions, command: str) -> redis.Redis:
    return connect(options.require_redis_url(command))


def apply_allowlist(given: tuple[str, ...]) -> Allowlist:
    """The allowlist from ``--allow`` (else ``ORCH_ALLOW``), put in ``ORCH_ALLOW`` for the processes
    this one starts (work processes, work horses, pool workers): it never comes from Redis."""
    try:
        allowlist = Allowlist.from_settings(given)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--allow") from None
    os.environ["ORCH_ALLOW"] = ",".join(allowlist.prefixes)
    worker_allowlist.cache_clear()
    return allowlist


def _when(value: Optional[float | str]) -> str:
    number = epoch(value)
    try:
        return "-" if not number else datetime.fromtimestamp(number).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "-"


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
@click.option("--allow", "allow", multiple=True, metavar="PREFIX",
              help="Import task functions only from this module or package (repeatable; also ORCH_ALLOW, "
                   "comma-separated). Without it, standard-library and orch modules are refused.")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"]))
@redis_url_option
@pass_options
@handle_errors
def worker(options: CliOptions, queues: str, concurrency: int, burst: bool, paths: tuple[str, ...],
           name: Optional[str], mode: str, allow: tuple[str, ...], log_level: str) -> None:
    """Run tasks from QUEUES until stopped.

    SIGTERM or Ctrl-C once: finish the task in hand, then stop. Twice: stop at once.
    """
    url = options.require_redis_url("worker")
    check_log_settings()
    allowlist = apply_allowlist(allow)
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
    if allowlist.startup_warning():
        click.echo(f"warning: {allowlist.startup_warning()}", err=True)
    else:
        click.echo(f"allowed task modules: {allowlist.describe()}", err=True)
    if configured_signer() is not None:
        click.echo("signed jobs only (ORCH_SIGNING_KEY): unsigned or wrongly signed jobs are refused", err=True)
    if mode == "lean":
        from worker.lean import LeanWorker

        LeanWorker(url, queue_names, concurrency=concurrency, name=name, burst=burst).work()
        return
    from worker.rq_worker import serve

    serve(connection, queue_names, concurrency=concurrency, burst=burst, name=name, logging_level=log_level)


@main.command()
@click.option("--poll", type=click.FloatRange(min=0.05), default=0.5, show_default=True,
              help="Seconds between looks for runs to adopt.")
@click.option("--path", "paths", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Put DIR first on sys.path so schedules' targets and their modules import (repeatable).")
@click.option("--allow", "allow", multiple=True, metavar="PREFIX",
              help="Load schedule targets and accept task functions only from these modules (repeatable; also "
                   "ORCH_ALLOW).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve Prometheus metrics (read from Redis) at http://HOST:PORT/metrics.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics server listens on (0.0.0.0: every interface).")
@redis_url_option
@pass_options
@handle_errors
def coordinator(options: CliOptions, poll: float, paths: tuple[str, ...], allow: tuple[str, ...],
                metrics_port: Optional[int], metrics_host: str) -> None:
    """Drive runs submitted with --detach, adopt runs whose coordinator died, and fire schedules.

    Run one or more: a lease makes exactly one drive each run, a fenced claim exactly one fire each tick.
    """
    connection = _redis(options, "coordinator")
    apply_allowlist(allow)
    for path in reversed(paths):
        sys.path.insert(0, os.path.abspath(path))
    Signer.from_environment()  # a bad key setting: one error line now, not one per run adopted
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if metrics_port is not None:
        from orchestrator.metrics import serve_metrics  # prometheus_client: ~50 ms no other command pays

        serve_metrics(connect(options.require_redis_url("coordinator")), metrics_port, metrics_host)
        click.echo(f"metrics at http://{metrics_host}:{metrics_port}/metrics", err=True)
    click.echo(f"orch coordinator on {socket.gethostname()} (pid {os.getpid()}) watching for runs and schedules",
               err=True)
    try:
        serve_coordinator(connection, poll=poll)
    except KeyboardInterrupt:
        click.echo("coordinator stopped; runs it drove are adopted by another coordinator once their lease lapses",
                   err=True)


@main.command()
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Block until the run is final; then exit 0 if it succeeded, else 1.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (shape in the README) instead of the table.")
@redis_url_option
@pass_options
@handle_errors
def status(options: CliOptions, run_id: str, wait: bool, as_json: bool) -> None:
    """Show the state of run RUN_ID and of each of its tasks.

    Exits 0 whenever it could show the run, whatever its state (with --wait: 0 if it
    succeeded, 1 if it failed or was cancelled); 2 for an unknown run.
    """
    connection = _redis(options, "status")
    if wait:
        wait_until_final(connection, run_id)
    meta, _, tasks = load_tasks(connection, run_id, with_results=False)
    load_history(connection, run_id, tasks)
    if as_json:
        click.echo(json.dumps(status_document(run_id, meta, tasks, run_params(meta))))
    else:
        _print_status(run_id, meta, tasks)
    if wait and meta.get("state") != RunState.SUCCESS.value:
        _exit(EXIT_FAILED)


def _print_status(run_id: str, meta: dict, tasks: dict) -> None:
    workflow = Workflow(meta.get("workflow") or "workflow")
    workflow.tasks = tasks
    click.echo(f"run {run_id} ({workflow.name}): {meta.get('state')}, created {_when(meta.get('created_at'))}, "
               f"finished {_when(meta.get('finished_at'))}")
    if meta.get("cancelled_by"):
        click.echo(f"cancelled by {meta['cancelled_by']} at {_when(meta.get('cancelled_at'))}")
    if meta.get("schedule"):
        click.echo(f"schedule {meta['schedule']} ({meta.get('trigger') or 'fired'}), tick {_when(meta.get('tick'))}")
    if meta.get("warning") and meta.get("state") == RunState.RUNNING.value:
        click.echo(f"warning: {meta['warning']}")
    params = run_params(meta)
    if params:
        click.echo("params: " + ", ".join(f"{name}={json.dumps(value, default=str)}" for name, value in params.items()))
    retries = run_retries(meta)
    if retries:
        click.echo(f"retried {retries} time{'s' if retries != 1 else ''} (orch retry); "
                   "earlier attempts below the table")
    report.print_results(workflow)
    _print_earlier_attempts(workflow)


def _print_earlier_attempts(workflow: Workflow, limit: int = 20) -> None:
    """The earlier attempts of the run's tasks (failed ones, and succeeded ones a rerun superseded)."""
    lines = [f"  {name} attempt {record.attempt}: {record.state}" + (f": {record.error}" if record.error else "")
             for name in workflow.execution_order() for record in workflow.tasks[name].history]
    if not lines:
        return
    click.echo("earlier attempts:")
    for line in lines[:limit]:
        click.echo(line)
    if len(lines) > limit:
        click.echo(f"  ... and {len(lines) - limit} more (orch status --json lists them all)")


@main.command()
@click.option("--state", type=click.Choice([s.value for s in RunState]), default=None, help="Only runs in STATE.")
@click.option("--workflow", default=None, metavar="NAME", help="Only runs of workflow NAME.")
@click.option("--schedule", default=None, metavar="NAME", help="Only runs schedule NAME started (removed ones too).")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list (shape in the README) instead of the table.")
@redis_url_option
@pass_options
@handle_errors
def runs(options: CliOptions, state: Optional[str], workflow: Optional[str], schedule: Optional[str], limit: int,
         as_json: bool) -> None:
    """List the most recent runs, newest first, with their state and task counts."""
    connection = _redis(options, "runs")
    if schedule is not None:
        check_schedule_known(connection, schedule)
    found = find_runs(connection, state=state, workflow=workflow, schedule=schedule, limit=limit)
    if as_json:
        click.echo(json.dumps([run_summary(snapshot) for snapshot in found]))
        return
    report.stdout_console().print(report.runs_table(found))


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
    def say_waiting(patience: float) -> None:
        click.echo(f"run {run_id}: its lease is still held (a coordinator that just died keeps it up to "
                   f"ORCH_LEASE_TTL); waiting up to {patience:g}s for it to lapse", err=True)

    with report.ProgressDisplay(len(tasks), enabled=not quiet) as progress:
        _, tasks = resume_run(connection, run_id, on_progress=progress, on_notice=progress.notice,
                              patience=Settings().lease_ttl + 1.0, on_wait=say_waiting)
    workflow = Workflow(meta.get("workflow") or "workflow")
    workflow.tasks = tasks
    report.print_results(workflow)
    _exit(exit_code_of(workflow))


@main.command()
@click.argument("run_id")
@click.option("--task", "tasks", multiple=True, metavar="NAME",
              help="Also rerun NAME and everything downstream of it, even if it succeeded (repeatable).")
@click.option("--detach", is_flag=True, help="Reopen the run and return at once; an 'orch coordinator' drives it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr.")
@redis_url_option
@pass_options
@handle_errors
def retry(options: CliOptions, run_id: str, tasks: tuple[str, ...], detach: bool, quiet: bool) -> None:
    """Start the finished run RUN_ID again from where it failed.

    Succeeded tasks keep their results and do not run again; failed, upstream-failed and
    cancelled tasks (and what depends on them) run again with fresh attempt budgets. The
    run keeps its id and its history. Exits like 'orch submit'; 2 if the run is still
    running, unknown or expired, or a --task is not in it.
    """
    connection = _redis(options, "retry")
    stored_run(connection, run_id)  # an unknown or expired run: say which before anything else
    snapshot = read_run(connection, run_id)
    if detach:
        retry_run(connection, run_id, tasks, detach=True)
        click.echo(run_id)
        return
    caught: list[int] = []
    interrupted: Optional[int] = None
    with report.ProgressDisplay(sum(snapshot.counts.values()), enabled=not quiet) as progress, \
            interrupting_signals(caught):
        try:
            _, stored = retry_run(connection, run_id, tasks, on_progress=progress, on_notice=progress.notice)
        except KeyboardInterrupt:
            interrupted = caught[0] if caught else signal.SIGINT
    workflow = Workflow(snapshot.workflow)
    if interrupted is not None:
        say_cancelled(interrupted)
        _, _, stored = load_tasks(connection, run_id, with_results=False)
    workflow.tasks = stored
    report.print_results(workflow)
    _exit(exit_code_of(workflow) if interrupted is None else 128 + interrupted)
