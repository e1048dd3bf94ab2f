"""``orch schedule ...``: add, list, show, pause, resume, remove, trigger and backfill schedules.

Thin commands over :mod:`orchestrator.schedules` (the same functions the Python API and the
dashboard call); an ``orch coordinator`` fires the ticks.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import click
from rich.table import Table

from orchestrator import report
from orchestrator.cli import CliOptions, handle_errors, main, parse_params, pass_options, redis_url_option
from orchestrator.schedule_logic import MAX_DUE, Catchup, Overlap, iso
from orchestrator.schedules import (MAX_BACKFILL, add_schedule, backfill_schedule, describe_schedule, list_schedules,
                                    pause_schedule, remove_schedule, resume_schedule, trigger_schedule)
from shared.connection import connect


def _connection(options: CliOptions, command: str) -> Any:
    return connect(options.require_redis_url(f"schedule {command}"))


@main.group()
def schedule() -> None:
    """Start runs on a cron or interval schedule (fired by 'orch coordinator')."""


@schedule.command("add")
@click.argument("name")
@click.argument("target")
@click.option("--cron", default=None, metavar="EXPR", help="5 fields (minute hour day month weekday), or 6 with "
              "seconds first, in the zone --tz.")
@click.option("--every", default=None, metavar="N[smhd]", help="An interval instead, e.g. 30s, 15m, 1h (at least 1s).")
@click.option("--tz", default="UTC", show_default=True, metavar="ZONE", help="IANA time zone of --cron.")
@click.option("--param", "param", multiple=True, metavar="KEY=VALUE", help="A run parameter (repeatable), as for "
              "'orch submit'; each run also gets scheduled_at.")
@click.option("--start", default=None, metavar="WHEN", help="No tick before this ISO date or date-time (in --tz).")
@click.option("--end", default=None, metavar="WHEN", help="No tick after this ISO date or date-time (a date counts "
              "whole).")
@click.option("--jitter", default=None, metavar="N[smhd]", help="Fire each tick at a fixed pseudo-random offset in "
              "[0, N) (off by default).")
@click.option("--overlap", type=click.Choice([o.value for o in Overlap]), default="skip", show_default=True,
              help="When the previous run still goes: skip the tick, queue one, allow both, or cancel the previous.")
@click.option("--catchup", type=click.Choice([c.value for c in Catchup]), default="latest", show_default=True,
              help="Ticks missed while no coordinator ran: run the latest, all (up to --max-catchup) or none.")
@click.option("--max-catchup", type=click.IntRange(min=0, max=MAX_DUE), default=100, show_default=True,
              help="The most missed ticks --catchup all runs.")
@click.option("--grace", default=None, metavar="N[smhd]", help="How late a tick may fire before it counts as missed "
              "(default: the interval, at most 1h).")
@click.option("--no-check", is_flag=True, help="Do not load TARGET here (its code is only where coordinators run).")
@redis_url_option
@pass_options
@handle_errors
def add(options: CliOptions, name: str, target: str, cron: Optional[str], every: Optional[str], tz: str,
        param: tuple[str, ...], start: Optional[str], end: Optional[str], jitter: Optional[str], overlap: str,
        catchup: str, max_catchup: int, grace: Optional[str], no_check: bool) -> None:
    """Add schedule NAME that runs TARGET (as 'orch submit' takes it)."""
    created = add_schedule(_connection(options, "add"), name, target, cron=cron, every=every, tz=tz,
                           params=parse_params(param), start=start, end=end, jitter=jitter or 0.0, overlap=overlap,
                           catchup=catchup, max_catchup=max_catchup, grace=grace, check=not no_check)
    first = created.timing.next_tick(created.created_at)
    when = "never (it has ended)" if first is None else iso(first, created.timing.tz)
    click.echo(f"schedule {name}: {created.describe_timing()}; first tick {when}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list (shape in the README).")
@redis_url_option
@pass_options
@handle_errors
def list_(options: CliOptions, as_json: bool) -> None:
    """List the schedules with their next tick and last run."""
    found = list_schedules(_connection(options, "list"))
    if as_json:
        click.echo(json.dumps(found))
        return
    table = Table(box=None, pad_edge=False, header_style="bold underline")
    for column in ("name", "next", "last run", "state"):  # never wrapped: names and ids are copied from here
        table.add_column(column, no_wrap=True)
    table.add_column("when", min_width=12, ratio=1)  # wraps between words in a narrow terminal
    for item in found:
        when = item["timing"] + (" (paused)" if item["paused"] else "")
        # in the schedule's zone (its 'when' names it), as short as orch runs' times: readable at 80 columns
        upcoming = item["next"][5:19].replace("T", " ") if item["next"] else ("ended" if item["ended"] else "-")
        table.add_row(item["name"], upcoming, item["last_run"] or "-", item["last_run_state"] or "-", when)
    report.stdout_console().print(table)


@schedule.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (shape in the README).")
@redis_url_option
@pass_options
@handle_errors
def show(options: CliOptions, name: str, as_json: bool) -> None:
    """Show NAME: its next 5 fire times, last runs, and ticks skipped or missed, with why."""
    document = describe_schedule(_connection(options, "show"), name)
    if as_json:
        click.echo(json.dumps(document))
        return
    click.echo(f"schedule {document['name']}: {document['target']}, {document['timing']}"
               + (" (paused)" if document["paused"] else ""))
    click.echo(f"overlap {document['overlap']}, catch-up {document['catchup']}"
               + (f", jitter {document['jitter']:g}s" if document["jitter"] else ""))
    if document["params"]:
        click.echo("params: " + ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in document["params"].items()))
    click.echo(("next (paused: skipped unless resumed): " if document["paused"] else "next: ")
               + (", ".join(document["next_fires"]) or "none (the schedule has ended)"))
    if document["waiting"] is not None:
        click.echo(f"waiting: tick {iso(document['waiting'], document['tz'])} starts when {document['last_run']} "
                   "ends (overlap 'queue')")
    click.echo("last runs:" if document["runs"] else "last runs: none yet")
    for run in document["runs"]:
        click.echo(f"  {run['tick']}  {run['run_id']}  {run['state']}")
    if document["ticks"]:
        click.echo("ticks skipped, missed, queued or failed:")
        for tick in document["ticks"]:
            count = f"at least {tick['count']}" if tick.get("at_least") else tick.get("count")
            many = f" ({count} ticks, to {tick['until']})" if tick.get("count") else ""
            click.echo(f"  {tick['tick']}  {tick['outcome']}{many}: {tick.get('reason', '')}")


def _by_name(verb: str, done: str, action: Callable[[Any, str], None], doc: str) -> None:
    """Register ``orch schedule VERB NAME``: one call of ``action`` (the Python API's), one line said."""

    @schedule.command(verb, help=doc)
    @click.argument("name")
    @redis_url_option
    @pass_options
    @handle_errors
    def command(options: CliOptions, name: str) -> None:
        action(_connection(options, verb), name)
        click.echo(f"schedule {name} {done}")


_by_name("pause", "paused", pause_schedule, "Pause NAME: its ticks are recorded as skipped until resumed.")
_by_name("resume", "resumed", resume_schedule, "Resume NAME from its next tick.")
_by_name("remove", "removed", remove_schedule,
         "Remove NAME; its runs and their history stay ('orch runs --schedule NAME').")


@schedule.command("trigger")
@click.argument("name")
@click.option("--param", "param", multiple=True, metavar="KEY=VALUE", help="A run parameter over the schedule's.")
@redis_url_option
@pass_options
@handle_errors
def trigger(options: CliOptions, name: str, param: tuple[str, ...]) -> None:
    """Start one run of NAME now, recorded as manual; prints its run id."""
    click.echo(trigger_schedule(_connection(options, "trigger"), name, parse_params(param)))


@schedule.command("backfill")
@click.argument("name")
@click.option("--from", "start", required=True, metavar="WHEN", help="First instant (ISO date or date-time, in the "
              "schedule's zone).")
@click.option("--to", "end", required=True, metavar="WHEN", help="Last instant (a date counts whole).")
@click.option("--param", "param", multiple=True, metavar="KEY=VALUE", help="A run parameter over the schedule's.")
@click.option("--limit", type=click.IntRange(min=1), default=MAX_BACKFILL, show_default=True,
              help="Refuse a range with more ticks.")
@redis_url_option
@pass_options
@handle_errors
def backfill(options: CliOptions, name: str, start: str, end: str, param: tuple[str, ...], limit: int) -> None:
    """Start one run of NAME per tick in the range, oldest first; prints their run ids."""
    for run_id in backfill_schedule(_connection(options, "backfill"), name, start, end, parse_params(param),
                                    limit=limit):
        click.echo(run_id)
