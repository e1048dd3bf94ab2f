"""``orch logs``: what a run's attempts printed and logged; registered on the root group of
:mod:`orchestrator.cli` when it is imported. Reading goes through :mod:`orchestrator.logs`."""
from __future__ import annotations

import json
from typing import Optional

import click

from orchestrator.cli import CliOptions, handle_errors, main, pass_options, redis_url_option
from orchestrator.logs import follow_run_log, format_line, run_log
from shared.connection import connect


@main.command()
@click.argument("run_id")
@click.argument("task", required=False)
@click.option("--attempt", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show attempt N (default: each task's latest).")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new lines until the task (without TASK: the run) is final.")
@click.option("--json", "as_json", is_flag=True,
              help='A JSON list of {"task", "attempt", "time", "line"} (with --follow: one object per line).')
@redis_url_option
@pass_options
@handle_errors
def logs(options: CliOptions, run_id: str, task: Optional[str], attempt: Optional[int], follow: bool,
         as_json: bool) -> None:
    """Print the log of TASK in run RUN_ID, or of every task that ran, in execution order.

    A log holds the attempt's print() output, stderr, logging records (ORCH_TASK_LOG_LEVEL,
    default INFO) and the traceback of a failure, each line with its time.
    """
    connection = connect(options.require_redis_url("logs"))
    with_task = task is None
    if follow:
        for line in follow_run_log(connection, run_id, task, attempt):
            click.echo(json.dumps(line.document()) if as_json else format_line(line, with_task))
        return
    lines = run_log(connection, run_id, task, attempt)
    if as_json:
        click.echo(json.dumps([line.document() for line in lines]))
        return
    for line in lines:
        click.echo(format_line(line, with_task))
