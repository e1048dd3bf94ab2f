"""What the CLI shows of a run: live progress on stderr, a results table on stdout.

Progress goes to stderr so that stdout carries only the results (pipe-able).
On a terminal it is a rich progress bar; elsewhere (CI logs, pipes, tests) it
is one plain line per task that finishes or will be retried.

The bar is refreshed from the progress callback only, never by rich's
background refresh thread: the local backend forks a process per attempt,
and forking while another thread holds a stream lock can deadlock the child.
The price is that the elapsed time only moves when some task changes state.
"""
from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from types import TracebackType
from typing import Any, Optional, Sequence, Union

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from orchestrator.actions import Transition
from orchestrator.scheduler import Scheduler
from orchestrator.workflow import Workflow
from shared.states import TERMINAL_STATES, TaskState

STATE_STYLES: dict[TaskState, str] = {
    TaskState.PENDING: "dim",
    TaskState.QUEUED: "cyan",
    TaskState.RUNNING: "blue",
    TaskState.RETRYING: "yellow",
    TaskState.SUCCESS: "green",
    TaskState.FAILURE: "bold red",
    TaskState.CANCELLED: "magenta",
    TaskState.SKIPPED: "bright_black",
}

REFRESH_INTERVAL = 0.1
"""Seconds between two redraws of the progress bar (the last state is always drawn at the end)."""

MAX_TABLE_ROWS = 500
"""Most rows in the results table; a huge workflow's table would take a minute to render."""

MAX_PLAIN_WIDTH = 1000
"""Widest results table printed when stdout is not a terminal."""


def stdout_console() -> Console:
    """The console for results: stdout, no colors or markup guessing when it is not a terminal."""
    return Console(highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def state_text(state: TaskState) -> Text:
    """``state`` as text in its color."""
    return Text(str(state), style=STATE_STYLES.get(TaskState(state), ""))


def format_duration(seconds: Optional[float]) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``, ``2h03m``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _first_line(text: Optional[str]) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


MAX_CHILD_ROWS = 20
"""A mapped task with more children than this shows them as one summary row."""

Row = Union[str, tuple[str, list[str]]]
"""A task's name, or ``(mapped task, its children)`` shown as one row."""


def results_table(workflow: Workflow, max_rows: int = MAX_TABLE_ROWS) -> Table:
    """One row per task, in execution order: task, state, attempts, duration, error (first line).

    A mapped task's children follow it, collapsed into one row past :data:`MAX_CHILD_ROWS`
    (``transform[0..9999]  9,998 success, 2 failure``). Past ``max_rows`` rows, those kept are
    the tasks that failed by themselves first, then the other unsuccessful ones, then successes;
    a caption says how many were left out (the summary line counts them all).
    """
    rows, hidden = _rows(workflow, max_rows)
    table = Table(caption=f"{hidden} more task{'s' if hidden != 1 else ''} not shown" if hidden else None)
    table.add_column("task", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("error", overflow="fold")
    for row in rows:
        if isinstance(row, tuple):
            table.add_row(*_children_row(workflow, *row))
            continue
        task = workflow.tasks[row]
        table.add_row(
            Text(task.name), state_text(task.state), str(task.attempts),
            format_duration(task.duration), Text(_first_line(task.error)),
        )
    return table


def _children_row(workflow: Workflow, parent: str, children: list[str]) -> tuple[Text, Text, str, str, Text]:
    tasks = [workflow.tasks[name] for name in children]
    counts = Counter(task.state for task in tasks)
    states = Text(", ").join(Text(f"{counts[state]:,} {state}", style=STATE_STYLES.get(state, ""))
                             for state in TaskState if counts[state])
    failed = next((task for task in tasks if task.state is TaskState.FAILURE), None)
    return (Text(f"{parent}[0..{len(children) - 1}]"), states, str(sum(task.attempts for task in tasks)), "-",
            Text(f"{failed.name}: {_first_line(failed.error)}" if failed else ""))


def _rows(workflow: Workflow, limit: int) -> tuple[list[Row], int]:
    order = _display_order(workflow)
    if len(order) <= limit:
        return order, 0

    def rank(row: Row) -> int:
        tasks = [workflow.tasks[name] for name in row[1]] if isinstance(row, tuple) else [workflow.tasks[row]]
        if all(task.state is TaskState.SUCCESS for task in tasks):
            return 2
        failed = any(task.attempts and task.state in (TaskState.FAILURE, TaskState.RETRYING) for task in tasks)
        return 0 if failed else 1

    keep = {id(row) for row in sorted(order, key=rank)[:limit]}  # sorted() is stable: execution order within a rank
    return [row for row in order if id(row) in keep], len(order) - len(keep)


def _display_order(workflow: Workflow) -> list[Row]:
    """Execution order, each mapped task's children right after it (one row past :data:`MAX_CHILD_ROWS`)."""
    children: dict[str, list[str]] = {}
    for name, task in workflow.tasks.items():
        if task.map_parent is not None:
            children.setdefault(task.map_parent, []).append(name)
    try:
        order = workflow.execution_order()
    except Exception:  # an invalid DAG never ran, but its table can still be shown
        order = list(workflow.tasks)
    rows: list[Row] = []
    for name in order:
        if workflow.tasks[name].map_parent is not None:
            continue
        rows.append(name)
        kids = children.get(name, [])
        rows.extend([(name, kids)] if len(kids) > MAX_CHILD_ROWS else kids)
    return rows


def summary(workflow: Workflow) -> Text:
    """One line: ``workflow 'etl', 5 tasks: 4 success, 1 failure``, the counts in their colors."""
    counts = Counter(task.state for task in workflow)
    text = Text(f"workflow {workflow.name!r}, {len(workflow)} task{'s' if len(workflow) != 1 else ''}")
    parts = [(state, counts[state]) for state in TaskState if counts[state]]
    for i, (state, n) in enumerate(parts):
        text.append(": " if i == 0 else ", ")
        text.append(f"{n} {state}", style=STATE_STYLES[state])
    return text


def runs_table(snapshots: Sequence[Any]) -> Table:
    """``orch runs``: id, workflow, state, created, task counts; readable at 80 columns.

    The id, state and time never wrap; the workflow name is cut with an ellipsis
    before anything else gives way, and the counts wrap between whole words
    (one count a line), never inside one.
    """
    table = Table(box=None, pad_edge=False, header_style="bold underline")
    table.add_column("run id", no_wrap=True)
    table.add_column("workflow", overflow="ellipsis", no_wrap=True, max_width=12)
    table.add_column("state", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("tasks", min_width=12, ratio=1)
    for snapshot in snapshots:
        created = datetime.fromtimestamp(snapshot.created_at).strftime("%m-%d %H:%M") if snapshot.created_at else "-"
        counts = Text()
        order = {state.value: n for n, state in enumerate(TaskState)}
        for n, state in enumerate(sorted(snapshot.counts, key=lambda name: order.get(name, len(order)))):
            counts.append("\n" if n else "")  # one count a line: a narrow terminal never splits "3 success"
            known = state in order
            counts.append(f"{snapshot.counts[state]} {state}", style=STATE_STYLES[TaskState(state)] if known else "")
        table.add_row(snapshot.run_id, snapshot.workflow, Text(snapshot.state), created, counts)
    return table


def print_results(workflow: Workflow, console: Optional[Console] = None) -> None:
    """Print the results table and the summary line (to stdout by default).

    Not on a terminal (a pipe, a CI log), the table is as wide as its content,
    so that no error message is wrapped or cut.
    """
    table = results_table(workflow)
    if console is None:
        console = stdout_console()
        if not console.is_terminal:
            wide = console.options.update_width(MAX_PLAIN_WIDTH)
            console.width = max(console.width, Measurement.get(console, wide, table).maximum)
    console.print(table)
    console.print(summary(workflow))


class ProgressDisplay:
    """A :data:`~orchestrator.coordinator.ProgressCallback` that shows the run on stderr.

    Use as a context manager around ``workflow.run(on_progress=display)``;
    ``enabled=False`` makes it a silent no-op (``--quiet``).
    """

    def __init__(self, total: int, *, enabled: bool = True, console: Optional[Console] = None) -> None:
        self.total = total
        self.enabled = enabled
        self.console = console or stderr_console()
        self.live = enabled and self.console.is_terminal
        self._progress: Optional[Progress] = None
        self._bar: Optional[TaskID] = None
        self._refreshed = 0.0

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False,
            )
            self._bar = self._progress.add_task("tasks", total=self.total, detail="")
            self._progress.start()
            self._progress.refresh()
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None

    def notice(self, text: Optional[str]) -> None:
        """Show that tasks wait on a queue no live worker serves (``None``: that cleared)."""
        if not self.enabled:
            return
        line = f"warning: {text}" if text else "every waiting task has a live worker again"
        if self._progress is not None:
            self._progress.console.print(line, style="yellow" if text else None, highlight=False)
            self._progress.refresh()
        else:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def __call__(self, scheduler: Scheduler, transitions: Sequence[Transition]) -> None:
        if not self.enabled:
            return
        counts = scheduler.counts()
        done = sum(n for state, n in counts.items() if state in TERMINAL_STATES)
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=done, detail=_detail(counts))
            now = time.monotonic()
            if now - self._refreshed >= REFRESH_INTERVAL:  # a big run has thousands of steps a second
                self._refreshed = now
                self._progress.refresh()
        elif not self.live:
            done -= sum(1 for move in transitions if move.finish in TERMINAL_STATES)  # count them one by one
            for move in transitions:
                done += move.finish in TERMINAL_STATES
                if move.finish in TERMINAL_STATES or move.finish is TaskState.RETRYING:
                    self.console.file.write(_line(move, done, self.total) + "\n")
            self.console.file.flush()


def _detail(counts: dict[TaskState, int]) -> Text:
    text = Text()
    for state in (TaskState.RUNNING, TaskState.RETRYING, TaskState.FAILURE, TaskState.CANCELLED, TaskState.SKIPPED):
        if counts.get(state):
            text.append(f" {counts[state]} {state}", style=STATE_STYLES[state])
    return text


def _line(move: Transition, done: int, total: int) -> str:
    """``[3/5] transform: success (attempt 1)`` for logs that are not a terminal."""
    line = f"[{done}/{total}] {move.task}: {move.finish}"
    if move.attempt:
        line += f" (attempt {move.attempt})"
    if move.finish is not TaskState.SUCCESS and move.error:
        line += f": {_first_line(move.error)}"
    return line
