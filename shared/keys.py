"""Every Redis key orch writes, in one place.

Layout (``{id}`` is a run id; RQ's own ``rq:*`` keys are RQ's):

==============================  ======  ==================================================
key                             type    contents
==============================  ======  ==================================================
``orch:runs``                   zset    run id -> creation time (epoch s), for ``orch runs``
``orch:run:{id}``               hash    run metadata: workflow, state, created_at,
                                        finished_at, total, counts, transport, cancelled_by,
                                        cancelled_at, last_event (stream id applied last),
                                        lease_holder (token of the last coordinator to
                                        adopt the run), spec (JSON, format 2 of
                                        orchestrator/run_spec.py: task names, dependencies
                                        as task numbers, the tasks' shared settings and
                                        argument payloads as tables, per task an index
                                        into each)
``orch:run:{id}:tasks``         hash    task name -> JSON record: state, attempt, error,
                                        started_at, finished_at, worker, retry_at
``orch:run:{id}:results``       hash    task name -> codec-encoded result (successes only)
``orch:run:{id}:tracebacks``    hash    task name -> traceback text of its last failure
``orch:run:{id}:events``        stream  outcomes reported by workers, and cancel requests;
                                        read by the coordinator, trimmed once applied;
                                        opened (empty) with the run, workers add only to it
``orch:run:{id}:lease``         string  token of the coordinator driving the run (TTL: lease)
``orch:active``                 set     ids of runs not finished yet (what coordinators adopt)
``orch:alive:{worker}``         string  a worker's heartbeat, its descriptor (JSON: kind, queues,
                                        host, pid, concurrency); it lapses (TTL) when the worker dies
``orch:workers``                set     names of workers that heartbeat (see shared/workers.py)
``orch:queue:{queue}``          list    lean mode: attempts waiting (JSON), oldest first
``orch:inflight:{slot}``        list    lean mode: the attempt one work process has taken and not
                                        finished (``{slot}`` is ``{worker}#{n}``, :func:`lean_slot`)
``orch:lean-workers``           set     lean mode: the slots (``{worker}#{n}``) whose in-flight
                                        lists may hold attempts; what the LossWatch inspects
``orch:stop`` (pub/sub)         channel lean mode: "stop this attempt" requests (cancellation)
==============================  ======  ==================================================

All keys of a run get the run's retention as TTL when the run finishes. The coordinator opens a
run's event stream (empty) when it writes the run; workers add to a stream only if it exists
(``XADD NOMKSTREAM``), so that a forged job naming a made-up run, or a report after the run's
retention, writes nothing. (RQ's own keys for a job that is not orch's, e.g. the result it files
for a refused one, get :data:`ORPHAN_TTL`.)
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


def tracebacks(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:tracebacks"


def events(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:events"


def lease(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:lease"


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
    """Every key that belongs to one run (for retention and deletion)."""
    return [run(run_id), tasks(run_id), results(run_id), tracebacks(run_id), events(run_id)]


def job_id(run_id: str, task_index: int, attempt: int) -> str:
    """The RQ job id of one attempt: ``orch-{run}-{task index}-{attempt}``.

    The task's index in the run's spec is used, not its name, because task
    names may hold any character and RQ job ids are used inside key names.
    """
    return f"{PREFIX}-{run_id}-{task_index}-{attempt}"
