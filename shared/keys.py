"""Every Redis key orch writes, in one place.

Layout (``{id}`` is a run id; RQ's own ``rq:*`` keys are RQ's):

==================================  ======  ===========================================The coordinator opens a run's event stream (empty) when it writes the run; workers add to a
stream only if it exists (``XADD NOMKSTREAM``), so that a forged job naming a made-up run, or a
report after the run's retention, writes nothing. (RQ's own keys for a job that is not orch's,
e.g. the result it files for a refused one, get :data:`ORPHAN_TTL`.)
"""
from __future__ import annotations

PREFIX = "orch"
RUNS = f"{PREFIX}:runs"
ACTIVE = f"{PREFIX}:active"
STOP_CHANNEL = f"{PREFIX}:stop"
LEAN_WORKERS = f"{PREFIX}:lean-workers"
WORKERS = f"{PREFIX}:workers"
ORPHAN_TTL = 24 * 3600
"""Seconds RQ keeps what it files for a job without a failure TTL of its own (none of orch's)."""


def run(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def tasks(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:tasks"


def results(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:results"


def maps(run_id: str) -> str:
    """The expansions of a run's mapped tasks (their children's arguments)."""
    return f"{PREFIX}:run:{run_id}:maps"


def tracebacks(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:tracebacks"


def attempts(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:attempts"


def attempt_field(task: str, attempt: int) -> str:
    """The field of one attempt in :func:`attempts`: ``{attempt}:{task}`` (a task name may hold ':')."""
    return f"{attempt}:{task}"


def split_attempt_field(field: str) -> tuple[str, int]:
    """``(task, attempt)`` of an :func:`attempt_field`; ``ValueError`` if it is not one."""
    attempt, _, task = field.partition(":")
    return task, int(attempt)


def events(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:events"


def lease(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:lease"


def task_log(run_id: str, task: str, attempt: int) -> str:
    """The log of one attempt (a stream, see :mod:`shared.log_records`). The attempt number comes
    last, so the name is unambiguous whatever characters the task name holds."""
    return f"{PREFIX}:run:{run_id}:log:{task}:{attempt}"


def logs(run_id: str) -> str:
    """The set of a run's log keys (:func:`task_log`), for retention."""
    return f"{PREFIX}:run:{run_id}:logs"


def alive(worker: str) -> str:
    return f"{PREFIX}:alive:{worker}"


def lean_queue(queue: str) -> str:
    return f"{PREFIX}:queue:{queue}"


def inflight(slot: str) -> str:
    """The in-flight list of one lean slot (:func:`lean_slot`)."""
    return f"{PREFIX}:inflight:{slot}"


def lean_slot(worker: str, number: int) -> str:
    """The name of slot ``number`` of lean worker ``worker``: ``{worker}#{number}``.

    Each work process has an in-flight list of its own (``inflight(lean_slot(...))``), so
    that a work process that dies holding a job strands it where its parent, or the
    coordinator once the worker's heartbeat lapsed, finds it.
    """
    return f"{worker}#{number}"


def slot_worker(slot: str) -> str:
    """The worker a slot name (:func:`lean_slot`) belongs to; a name without a slot number is
    a worker's own name (an in-flight list of a worker from before per-slot lists)."""
    worker, sep, number = slot.rpartition("#")
    return worker if sep and number.isdigit() else slot


def all_of_run(run_id: str) -> list[str]:
    """Every key of one run with a fixed name (for retention and deletion); the run's log keys
    are those its log index (:func:`logs`, in this list) names."""
    return [run(run_id), tasks(run_id), results(run_id), tracebacks(run_id), events(run_id), attempts(run_id),
            logs(run_id), maps(run_id)]


def job_id(run_id: str, task_index: int, attempt: int) -> str:
    """The RQ job id of one attempt: ``orch-{run}-{task index}-{attempt}``.

    The task's index in the run's spec is used, not its name, because task
    names may hold any character and RQ job ids are used inside key names.
    """
    return f"{PREFIX}-{run_id}-{task_index}-{attempt}"
