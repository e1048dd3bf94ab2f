"""Every Redis key orch writes, in one place.

Layout (``{id}`` is a run id; RQ's own ``rq:*`` keys are RQ's):

==================================  ======  ==================================================
key                                 type    contents
==================================  ======  ==================================================
``orch:runs``                       zset    run id -> creation time (epoch s), for ``orch runs``
``orch:run:{id}``                   hash    run metadata: workflow, state, created_at,
                                            finished_at, total, counts, transport, cancelled_by,
                                            params (codec-encoded run parameters, read once per
                                            run by each work process that asks for them),
                                            retries (times the run was rerun from failure),
                                            cancelled_at, last_event (stream id applied last),
                                            lease_holder (token of the last coordinator to
                                            adopt the run), spec (JSON, format 2 of
                                            orchestrator/run_spec.py: task names, dependencies
                                            as task numbers, the tasks' shared settings and
                                            argument payloads as tables, per task an index
                                            into each)
``orch:run:{id}:tasks``             hash    task name -> JSON record: state, attempt, error,
                                            started_at, finished_at, worker, retry_at, base
                                            (attempts made before the task's latest rerun; absent: 0)
``orch:run:{id}:attempts``          hash    ``{attempt}:{task}`` -> JSON record of one earlier attempt
                                            (state, error, worker, started_at, finished_at): each
                                            failed attempt, and a succeeded one a rerun superseded
``orch:run:{id}:maps``              hash    mapped task name -> JSON {"first": number of its first child,
                                            "payloads": each child's encoded [args, kwargs]}: its
                                            expansion, written with the children's first dispatch
``orch:run:{id}:results``           hash    task name -> codec-encoded result (successes only)
``orch:run:{id}:tracebacks``        hash    task name -> traceback text of its last failure
``orch:run:{id}:events``            stream  outcomes reported by workers, and cancel requests;
                                            read by the coordinator, trimmed once applied;
                                            opened (empty) with the run, workers add only to it
``orch:run:{id}:lease``             string  token of the coordinator driving the run (TTL: lease)
``orch:run:{id}:log:{task}:{n}``    stream  the log of attempt ``n`` of ``task``: one entry per line,
                                            id ``0-{line number}``, fields t (time), o (offset), l
                                            (line); see shared/log_records.py. Written by the process
                                            running the attempt, only if it printed or logged, and
                                            only while the run's event stream exists
``orch:run:{id}:logs``              set     names of the run's log keys (what retention expires)
``orch:active``                     set     ids of runs not finished yet (what coordinators adopt)
``orch:alive:{worker}``             string  a worker's heartbeat, its descriptor (JSON: kind, queues,
                                            host, pid, concurrency); it lapses (TTL) when the worker dies
``orch:workers``                    set     names of workers that heartbeat (see shared/workers.py)
``orch:queue:{queue}``              list    lean mode: attempts waiting (JSON), oldest first
``orch:inflight:{slot}``            list    lean mode: the attempt one work process has taken and not
                                            finished (``{slot}`` is ``{worker}#{n}``, :func:`lean_slot`)
``orch:lean-workers``               set     lean mode: the slots (``{worker}#{n}``) whose in-flight
                                            lists may hold attempts; what the LossWatch inspects
``orch:stop`` (pub/sub)             channel lean mode: "stop this attempt" requests (cancellation)
``orch:dashboard:write-probe``      (none)  never exists: ``orch dashboard`` deletes it to learn whether
                                            its Redis user may write (a read-only ACL user may not)
``orch:schedules``                  set     names of the schedules (``orch schedule list``)
``orch:schedules:due``              zset    schedule name -> when its next tick fires (epoch s, jitter
                                            included): the one place coordinators look for due ticks
``orch:schedule:{name}``            hash    a schedule: definition (JSON: target, cron or every, tz,
                                            start, end, jitter, policies), params (codec-encoded),
                                            paused, last_tick (the last tick handled: the fence of
                                            every firing), last_run, waiting (a tick queued behind
                                            the running run: overlap ``queue``), created_at
``orch:schedule:{name}:claim``      string  token of the coordinator handling the schedule's due
                                            ticks (TTL: ``ORCH_LEASE_TTL``)
``orch:schedule:{name}:ticks``      list    what became of each tick, newest first (JSON: tick,
                                            outcome fired/skipped/missed/failed/queued/manual/
                                            backfill, reason, run_id, at); the last 200
``orch:schedule:{name}:runs``       zset    run id -> tick of each run the schedule started (kept,
                                            with the ticks, for the retention after ``remove``)
``orch:metrics``                    hash    the Prometheus counters and histograms coordinators keep:
                                            ``["name","label value",...]`` (JSON) -> number; a
                                            histogram's buckets (non-cumulative) and sum are fields
                                            of their own (see orchestrator/metrics_store.py). Never
                                            expires
``orch:queues``                     set     names of the queues runs were created with (what
                                            the metrics' queue depth gauge reads)
==================================  ======  ==================================================

All keys of a run get the run's retention as TTL when the run finishes: those of
:func:`all_of_run` and the log keys its log index names; a rerun from failure (``orch
retry``) lifts that TTL while the run runs again. A worker also gives each log key it
writes (and the index) its own ``ORCH_RETENTION`` as TTL, so that a log written after its
run finished (an attempt of a worker counted lost) does not stay forever.

The coordinator opens a run's event stream (empty) when it writes the run; workers add to a
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
DASHBOARD_WRITE_PROBE = f"{PREFIX}:dashboard:write-probe"
SCHEDULES = f"{PREFIX}:schedules"
SCHEDULES_DUE = f"{PREFIX}:schedules:due"
METRICS = f"{PREFIX}:metrics"
QUEUES = f"{PREFIX}:queues"
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


def schedule(name: str) -> str:
    """A schedule's hash (names are checked by :func:`orchestrator.schedules.check_name`)."""
    return f"{PREFIX}:schedule:{name}"


def schedule_claim(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:claim"


def schedule_ticks(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:ticks"


def schedule_runs(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:runs"
