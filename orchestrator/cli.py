"""The ``orch`` command line.

One root group, :func:`main`, holds the options every command shares (today
``--redis-url``, also read from ``ORCH_REDIS_URL``) in a :class:`CliOptions`
object on the click context; commands receive it with ``@pass_options``.
Commands are thin: parse, call one function, print.

Exit codes (the same for every command):

* ``0`` every task succeeded (or the command did what it was asked);
* ``1`` the run finished and some task failed or was cancelled;
* ``2`` bad input: the target cannot be loaded, the workflow is not a valid
  DAG, Redis cannot be used — one line ``error: <message>`` on stderr, no
  traceback (also click's own usage errors);
* ``128 + N`` signal N interrupted a foreground run, which was cancelled first:
  ``130`` Ctrl-C, ``143`` SIGTERM, ``129`` SIGHUP.

To add a command::

    @main.command()
    @click.argument("run_id")
    @pass_options
    @handle_errors          # any WorkflowError -> "error: ..." and exit 2
    def cancel(options: CliOptions, run_id: str) -> None:
        \"\"\"Cancel run RUN_ID.\"\"\"
        cancel_run(options.require_redis_url("cancel"), run_id)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Optional, TypeVar, cast

import click
import redis

from orchestrator import graph as graphs
from orchestrator import report
from orchestrator.coordinator import RunInterrupted
from orchestrator.loading import load_workflow
from orchestrator.workflow import Workflow
from shared.allow import Allowlist
from shared.errors import InvalidTransition, WorkflowError
from shared.params import encode_params
from shared.states import TaskState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliOptions:
    """What the root group parsed, shared by every command (``ctx.obj``)."""

    redis_url: Optional[str] = None

    def require_redis_url(self, command: str) -> str:
        """The Redis URL, or a usage error for commands that only make sense with one."""
        if not self.redis_url:
            raise CliError(f"'orch {command}' needs Redis: pass --redis-url URL or set ORCH_REDIS_URL")
        return self.redis_url


pass_options = click.make_pass_decorator(CliOptions, ensure=True)
"""Pass the :class:`CliOptions` of the root group as the command's first argument."""


class CliError(click.ClickException):
    """Bad input: printed as one line ``error: <message>`` on stderr, exit code 2."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line(message: object) -> str:
    """``message`` as a single line (a multi-line message has its lines joined)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(lines)


def handle_errors(func: F) -> F:
    """Turn any :class:`WorkflowError` raised by the command into ``error: <message>`` and exit 2,
    and so a Redis that refuses a command midway (a missing ACL right) or goes away for good.

    :class:`InvalidTransition` is a bug in orch, not bad input, so it keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InvalidTransition:
            raise
        except WorkflowError as exc:
            raise CliError(one_line(exc) or type(exc).__name__) from None
        except redis.exceptions.NoPermissionError as exc:
            raise CliError(f"Redis refused a command: {one_line(exc)} (give this ACL user the rights the "
                           f"README's ACL lines list)") from None
        except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
            raise CliError(f"Redis refused this client: {one_line(exc)}") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise CliError(f"lost Redis: {one_line(exc)}") from None

    return cast(F, wrapper)


_FINE = frozenset({TaskState.SUCCESS, TaskState.SKIPPED})


def exit_code_of(workflow: Workflow) -> int:
    """0 if every task succeeded or was skipped, else 1 (a failure fails the run, even with a cleanup task
    that ran after it)."""
    return EXIT_OK if all(task.state in _FINE for task in workflow) else EXIT_FAILED


def _exit(code: int) -> NoReturn:
    click.get_current_context().exit(code)
    raise AssertionError("unreachable")  # ctx.exit raises


def _set_redis_url(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    if value:
        ctx.ensure_object(CliOptions).redis_url = value


redis_url_option = click.option(
    "--redis-url", metavar="URL", default=None, expose_value=False, callback=_set_redis_url,
    help="Redis, e.g. redis://HOST:6379/0 (also accepted before the command, or from ORCH_REDIS_URL).",
)
"""The same ``--redis-url`` after the command name (``orch worker --redis-url URL``): it only
sets the one value the root group holds, so there is still one place that reads it."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orch", prog_name="orch", message="%(prog)s %(version)s")
@click.option("--redis-url", envvar="ORCH_REDIS_URL", default=None, metavar="URL", show_envvar=True,
              help="Redis for distributed runs, e.g. redis://localhost:6379/0. Without it, runs are local.")
@click.pass_context
def main(ctx: click.Context, redis_url: Optional[str]) -> None:
    """orch: run a workflow (DAG) of Python tasks, locally or on Redis + RQ workers.

    TARGET is path/to/file.py[:attr] or package.module[:attr]; attr defaults to
    'workflow' and may be a Workflow or a function that returns one.
    """
    ctx.obj = CliOptions(redis_url=redis_url or None)


@contextlib.contextmanager
def interrupting_signals(caught: list[int]) -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI job's timeout, a closed terminal) act like Ctrl-C while a run is
    driven in the foreground: they raise ``KeyboardInterrupt``, which cancels the run. The signal
    is appended to ``caught``; the previous handlers come back afterwards."""
    def interrupt(signum: int, frame: Any) -> None:
        caught.append(signum)
        raise RunInterrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_workflow(workflow: Workflow, options: CliOptions, *, max_workers: Optional[int] = None,
                 quiet: bool = False, params: Optional[dict[str, Any]] = None) -> Optional[int]:
    """Run ``workflow`` with a progress display on stderr; return the signal that cancelled it
    (``SIGINT`` for Ctrl-C), or ``None`` if it ran to its end.

    Without a Redis URL the run is local with ``max_workers`` processes; with
    one it goes to the workers through Redis. Either way an interrupt has
    already cancelled the run when ``workflow.run`` re-raises it.
    """
    caught: list[int] = []
    with report.ProgressDisplay(len(workflow), enabled=not quiet) as progress, interrupting_signals(caught):
        run_options: dict[str, Any] = {"max_workers": max_workers}
        if options.redis_url:
            run_options = {"redis_url": options.redis_url, "on_submitted": _announce, "on_notice": progress.notice}
        try:
            workflow.run(on_progress=progress, params=params, **run_options)
        except KeyboardInterrupt:
            return caught[0] if caught else signal.SIGINT
    return None


def say_cancelled(signum: int) -> None:
    """``run cancelled (Ctrl-C)`` (or the signal's name) on stderr, after an interrupt cancelled a run."""
    how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    click.echo(f"run cancelled ({how})", err=True)


def _announce(run_id: str) -> None:
    click.echo(f"run id: {run_id}", err=True)


def parse_params(given: tuple[str, ...]) -> dict[str, Any]:
    """``--param key=value`` pairs as a dict: each value is parsed as JSON when it parses
    (``n=3``, ``tags=["a","b"]``, ``dry=true``), else kept as a string (``day=2024-05-01``). The
    parameters are checked against the codec here, before anything is loaded or written."""
    params: dict[str, Any] = {}
    for item in given:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not of the form key=value", param_hint="--param")
        try:
            params[key.strip()] = json.loads(text)
        except ValueError:
            params[key.strip()] = text
    encode_params(params)
    return params


@main.command()
@click.argument("target")
@redis_url_option
@click.option("--detach", is_flag=True,
              help="Distributed runs: write the run and return at once; an 'orch coordinator' drives it.")
@click.option("--max-workers", "-j", type=click.IntRange(min=1), default=None, metavar="N",
              help="Local runs: attempts running at once (default: the number of CPUs, at least 4).")
@click.option("--quiet", "-q", is_flag=True, help="No progress display on stderr; the results table is still printed.")
@click.option("--allow", "allow", multiple=True, metavar="PREFIX",
              help="Distributed runs: refuse, before writing anything, a workflow with a task function outside "
                   "these modules (repeatable; also ORCH_ALLOW).")
@click.option("--param", "param", multiple=True, metavar="KEY=VALUE",
              help="A run parameter (repeatable): VALUE is parsed as JSON when it parses, else kept as a string. "
                   "Tasks read them as current_task().params; a factory TARGET accepting 'params' receives them.")
@pass_options
@handle_errors
def submit(options: CliOptions, target: str, detach: bool, max_workers: Optional[int], quiet: bool,
           allow: tuple[str, ...], param: tuple[str, ...]) -> None:
    """Run the workflow TARGET and print a table of its results.

    With a Redis URL the run goes to the workers and its id is printed first.
    Exits 0 if every task succeeded, 1 if any failed or was cancelled, 130 on
    Ctrl-C (which cancels the run).
    """
    if options.redis_url and max_workers is not None:
        raise click.UsageError("--max-workers is for local runs; with --redis-url each worker sets its own")
    if allow:
        try:
            os.environ["ORCH_ALLOW"] = ",".join(Allowlist.from_settings(allow).prefixes)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--allow") from None
    params = parse_params(param)
    workflow = load_workflow(target, params)
    if detach:
        from orchestrator.distributed import run_distributed

        run_id, _ = run_distributed(workflow, options.require_redis_url("submit --detach"), detach=True,
                                    params=params)
        click.echo(run_id)
        return
    interrupted = run_workflow(workflow, options, max_workers=max_workers, quiet=quiet, params=params)
    if interrupted is not None:
        say_cancelled(interrupted)
    report.print_results(workflow)
    _exit(exit_code_of(workflow) if interrupted is None else 128 + interrupted)


@main.command()
@click.argument("target")
@handle_errors
def validate(target: str) -> None:
    """Check that TARGET loads and is a valid DAG (no cycle, no missing dependency)."""
    workflow = load_workflow(target)
    order = workflow.execution_order()
    click.echo(f"ok: {len(workflow)} task{'s' if len(workflow) != 1 else ''}, valid DAG")
    click.echo(f"execution order ({len(order)}):")
    for number, name in enumerate(order, 1):
        click.echo(f"  {number}. {name}")


_RENDERERS: dict[str, Callable[[Workflow], str]] = {"mermaid": graphs.to_mermaid, "dot": graphs.to_dot}


@main.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(sorted(_RENDERERS)), default="mermaid", show_default=True,
              help="Mermaid flowchart or Graphviz DOT.")
@handle_errors
def graph(target: str, fmt: str) -> None:
    """Print the DAG of TARGET as a diagram (edges from dependency to dependent)."""
    workflow = load_workflow(target)
    workflow.validate()
    click.echo(_RENDERERS[fmt](workflow), nl=False)


from orchestrator import cli_cluster  # noqa: E402,F401  (registers worker, status, runs, cancel, ...)
from orchestrator import cli_logs  # noqa: E402,F401  (registers logs)
from orchestrator import cli_schedules  # noqa: E402,F401  (registers schedule ...)

if __name__ == "__main__":  # python -m orchestrator.cli: run the group that cli_cluster registered on
    from orchestrator.cli import main as registered_main

    registered_main()
