"""Task and run states, and their groups.

The states are ``str`` values so that they can be written to Redis, printed and
compared with plain strings (``task.state == "success"``) without conversion.
"""
from __future__ import annotations

from enum import Enum


class TaskState(str, Enum):
    """Where one task of a run stands.

    ``pending``: waiting for its dependencies. ``queued``: handed to a worker
    slot or queue, not started yet. ``running``: an attempt is executing.
    ``retrying``: an attempt failed and the next one waits for its delay.
    ``success`` / ``failure`` / ``cancelled`` / ``skipped``: final. ``skipped``: its trigger
    rule could no longer be met with no upstream failure to blame, or it raised ``Skip``.
    """

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.CANCELLED, TaskState.SKIPPED})
ACTIVE_STATES = frozenset({TaskState.QUEUED, TaskState.RUNNING})


class RunState(str, Enum):
    """Where a whole run stands: ``running`` until every task is final."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class FailureKind(str, Enum):
    """Why an attempt failed; shown to users and used to word the error."""

    ERROR = "error"          # the task raised an exception
    TIMEOUT = "timeout"      # the attempt ran past its timeout and was stopped
    CRASHED = "crashed"      # the process running the attempt died (signal, os._exit)
    LOST = "lost"            # the worker running the attempt stopped heartbeating
    UPSTREAM = "upstream"    # a dependency failed, the task never ran
    CANCELLED = "cancelled"  # the run was cancelled

    def __str__(self) -> str:
        return self.value
