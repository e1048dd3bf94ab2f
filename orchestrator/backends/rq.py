"""The distributed backend: jobs out on Redis queues, a Redis stream of outcomes back.

Each queue's jobs take the form its live workers run (:mod:`.routing`): a
compact JSON entry on ``orch:queue:{queue}`` for ``orch worker`` (persistent
work processes, :mod:`worker.lean`), or an RQ job (``rq info`` sees it) for
``orch worker --mode rq`` (a forked work horse per job). Both report on the
same stream, so everything below the dispatch is shared. Jobs still waiting on
a queue whose workers changed kind are moved, and a queue that no live worker
serves is reported (``on_notice``, and the run's ``warning`` field).

Each :class:`~orchestrator.coordinator.Step` becomes one MULTI/EXEC: the task
records and results it commits, the RQ jobs of the attempts it dispatches
(``Queue.enqueue_many`` on the same pipeline) and, at the end, the run's final
state and retention. So a coordinator that dies between two steps leaves the
run exactly as of the last step, and the id of the last outcome it applied
(``last_event``) says where a successor must resume reading.

Outcomes are read with a blocking ``XREAD``: the coordinator reacts to a
finished task as soon as Redis hands it the entry, and never polls. Between
reads (at most a second apart) it renews its lease on the run and checks the
heartbeat keys of the workers running its attempts: an attempt whose worker's
heartbeat lapsed fails as "worker lost" and is retried like any failure.

With a signing key (:mod:`shared.signing`) every job sent is signed, and a report (a start or
an outcome) or cancel request whose signature is missing or wrong is ignored with one log line.

Every Redis call here survives an outage of up to ``Settings.outage`` seconds:
a step is written again whole after a reconnect (its writes are idempotent;
an attempt enqueued twice is reported twice, and the scheduler takes one).
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import redis
from orchestrator.coordinator import Step
from orchestrator.backends.routing import AUTO, TRANSPORTS, Routes
from orchestrator.backends.watch import LossWatch
from orchestrator.lease import EXPIRE_MEMBERS, Lease, LeaseLost
from orchestrator.metrics_store import RunMetrics
from orchestrator.run_spec import RunSpec
from orchestrator.run_store import run_keys, task_record
from orchestrator.task import Task
from shared import keys
from shared.config import NO_TIMEOUT, Settings
from shared.errors import SerializationError
from shared.jobs import JOB_FUNCTION, job_message, job_signature
from shared.events import Event, RunCancelled, TaskStarted
from shared.messages import (CANCEL_KIND, OUTCOME_KIND, STARTED, Outcome, cancel_requester,
                             finished_event)
from shared.signing import Signer, fields_verified
from shared.states import RunState, TaskState
from shared.workers import LEAN

if TYPE_CHECKING:
    from rq import Queue

log = logging.getLogger("orch.coordinator")

READ_BATCH = 1000
"""Most outcomes taken from the stream in one read."""
RQ_RESULT_TTL = 60
"""Seconds RQ keeps a finished orch job (its result is in the run's own keys). Not 0: RQ
deletes a job with no result TTL down a path that costs its work horse ~11 round trips."""
START_BATCH = 0.002
"""Seconds the coordinator lets reports gather after a read that brought only starts."""
HOUSEKEEPING_INTERVAL = 1.0
"""Most seconds between lease renewals and worker heartbeat checks (a third of the lease's
TTL when that is shorter, so that a live coordinator's lease never lapses between two)."""
DEFER_WRITES = 0.2
"""Longest a step that only marks tasks running or succeeded (and starts nothing) waits to be
written with the next one."""


def _deferrable(step: Step) -> bool:
    """A step that only marks tasks running or succeeded, and so changes nothing any worker or
    successor waits for: no job to send or stop, no retry, failure, expansion, rerun or end."""
    return bool(step.transitions) and not (
        step.dispatches or step.stops or step.finished or step.retries or step.tracebacks or step.attempts
        or step.children or step.rerun or step.cancelled_by) and all(
        move.finish in (TaskState.RUNNING, TaskState.SUCCESS) for move in step.transitions)


class RQBackend:
    """Carries out one run's steps through RQ and reads its outcomes back."""

    def __init__(
        self,
        connection: redis.Redis,
        run_id: str,
        tasks: Mapping[str, Task],
        specs: RunSpec,
        settings: Optional[Settings] = None,
        last_event: str = "0-0",
        lease: Optional[Lease] = None,
        running: Optional[Mapping[str, tuple[int, str]]] = None,
        transport: str = AUTO,
        queued: Sequence[tuple[str, int]] = (),
        on_notice: Optional[Callable[[Optional[str]], None]] = None,
        retries: int = 0,
        workflow: str = "",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
        self.routes = Routes(connection, transport)
        self.on_notice = on_notice
        self.notice: Optional[str] = None
        self.connection = connection
        self.run_id = run_id
        self.tasks = tasks
        self.specs = specs
        self.settings = settings or Settings()
        self.retries = retries
        """Times the run was rerun from failure (as of the last step)."""
        self.signer = Signer.from_environment()
        self.metrics = RunMetrics(connection, workflow, tasks)
        """What this run adds to the Prometheus counters, kept in memory and flushed about once a second."""
        self._index = specs.index
        self._queues: dict[str, Queue] = {}
        self._last_event = last_event
        self._events_key = keys.events(run_id)
        self.lease = lease
        self.watch = LossWatch(connection, run_id, self.settings.heartbeat_ttl, dict(running or {}))
        self._waiting: dict[str, dict[str, tuple[int, Optional[str]]]] = {}
        """queue -> {task: (attempt, transport)} of attempts dispatched and not started
        (transport ``None``: dispatched by an earlier coordinator, in a form not known)."""
        self._forms: dict[str, set[Optional[str]]] = {}
        """queue -> transports its waiting attempts may have (a superset), to skip queues with nothing to move."""
        for task, attempt in queued:
            self._mark_waiting(task, attempt, None)
            self.watch.dispatched(self.job_id(task, attempt), task, attempt,
                                  self._queue(self._queue_name(task)).intermediate_queue_key)
        self._deferred: Optional[Step] = None
        """Deferrable steps carried out in memory and not yet written (see :func:`_deferrable`)."""
        self._deferred_since = 0.0
        self._only_starts_read = False
        self._housekeeping_at = 0.0
        self._housekeeping_every = min(HOUSEKEEPING_INTERVAL, self.settings.lease_ttl / 3)

    def _queue(self, name: str) -> Queue:
        """RQ's queue ``name`` (RQ is imported when first needed: a run on lean workers alone never loads it,
        3.7 MB less in its coordinator)."""
        if name not in self._queues:
            from rq import Queue
            from rq.serializers import JSONSerializer

            self._queues[name] = Queue(name, connection=self.connection, serializer=JSONSerializer)
        return self._queues[name]

    def job_id(self, task: str, attempt: int) -> str:
        return keys.job_id(self.run_id, self._index[task], attempt)

    def _queue_name(self, task: str) -> str:
        return self.specs[task]["queue"]

    def _mark_waiting(self, task: str, attempt: int, transport: Optional[str]) -> None:
        queue = self._queue_name(task)
        self._waiting.setdefault(queue, {})[task] = (attempt, transport)
        self._forms.setdefault(queue, set()).add(transport)

    def _forget_waiting(self, task: str) -> None:
        waiting = self._waiting.get(self._queue_name(task))
        if waiting:
            waiting.pop(task, None)

    # ------------------------------------------------------------------ output
    def carry_out(self, step: Step) -> None:
        if step.rerun:
            self.retries += 1
        for stop in step.stops:
            self.watch.finished(self.job_id(stop.task, stop.attempt), stop.task, stop.attempt)
        for move in step.transitions:
            if move.finish is not TaskState.QUEUED:
                self._forget_waiting(move.task)
        if self.notice is not None and not step.finished:
            self._reconnecting(self._update_notice)  # e.g. the waiting task just started: say so now
        for task, first, _, payloads in step.children:  # once, outside the write a reconnect may repeat
            self.specs.add_children(task, first, payloads)
        self.metrics.count(step)
        if _deferrable(step):
            # Shown, not needed to resume: the outcomes stay in the stream after the last_event
            # written, so a successor reads them again; a step that sends jobs writes these first.
            if self._deferred is None:
                self._deferred, self._deferred_since = Step(), time.monotonic()
            self._deferred.absorb(step)
            return
        if self._deferred is not None:
            self._deferred.absorb(step)
            step, self._deferred = self._deferred, None
        self._reconnecting(self._write_step, step)
        if step.finished:
            self._reconnecting(self.metrics.flush)
        for stop in step.stops:
            self._stop_running(stop.task, stop.attempt)

    def _flush_deferred(self) -> None:
        if self._deferred is not None and time.monotonic() - self._deferred_since >= DEFER_WRITES:
            self._reconnecting(self._write_step, self._deferred)
            self._deferred = None

    def _write_step(self, step: Step) -> None:
        """All of ``step`` in one atomic round trip (fenced by the lease when there is one)."""
        run_id = self.run_id
        changed = {move.task for move in step.transitions}
        pipe = self.connection.pipeline(transaction=True)
        if step.rerun:
            self._reopen(pipe, step)
        if changed:
            pipe.hset(keys.tasks(run_id), mapping={name: task_record(self.tasks[name]) for name in changed})
        if step.attempts:
            pipe.hset(keys.attempts(run_id), mapping={keys.attempt_field(task, record.attempt): record.to_json()
                                                      for task, record in step.attempts})
        if step.children:
            pipe.hset(keys.maps(run_id), mapping={task: self.specs.map_record(task) for task, *_ in step.children})
        if step.results:
            pipe.hset(keys.results(run_id), mapping=step.results)
        if step.tracebacks:
            pipe.hset(keys.tracebacks(run_id), mapping=step.tracebacks)
        meta: dict[str, Any] = {"last_event": self._last_event}
        if step.counts:
            meta["counts"] = json.dumps(step.counts)
        if step.cancelled_by:
            meta["cancelled_by"] = step.cancelled_by
            meta["cancelled_at"] = repr(step.cancelled_at)
        if step.finished:
            meta.update(state=step.finished.state.value, finished_at=repr(step.finished.at))
        pipe.hset(keys.run(run_id), mapping=meta)
        self._unqueue(pipe, step.stops)
        self._queue_jobs(pipe, [(d.task, d.attempt) for d in step.dispatches])
        if self._last_event != "0-0":
            pipe.xtrim(self._events_key, minid=self._last_event, approximate=False)
        if step.finished:
            pipe.hdel(keys.run(run_id), "warning")
            for key in keys.all_of_run(run_id):
                pipe.expire(key, self.settings.retention)
            if self.lease is None:
                for key in self.connection.smembers(keys.logs(run_id)):
                    pipe.expire(key, self.settings.retention)
            else:
                pipe.execute_command(EXPIRE_MEMBERS, keys.logs(run_id), self.settings.retention)
            pipe.srem(keys.ACTIVE, run_id)
            pipe.delete(keys.lease(run_id))
        if self.lease is None:
            pipe.execute()
        else:
            commands = [args for args, _options in pipe.command_stack]
            pipe.reset()
            self.lease.apply(commands)

    def _reopen(self, pipe: Any, step: Step) -> None:
        """A rerun from failure: the run is running again, active (so an ``orch coordinator`` adopts it
        if its driver dies), kept past its retention until it finishes again, its retries counted;
        the results of the tasks that run again are dropped."""
        run_id = self.run_id
        for key in run_keys(self.connection, run_id):  # the logs of earlier attempts too
            pipe.persist(key)
        pipe.hdel(keys.run(run_id), "finished_at", "cancelled_by", "cancelled_at")
        pipe.hset(keys.run(run_id), "state", RunState.RUNNING.value)
        pipe.hset(keys.run(run_id), "retries", self.retries)  # counted in carry_out: a rewrite stays idempotent
        pipe.sadd(keys.ACTIVE, run_id)
        rerun = [move.task for move in step.transitions if move.finish is TaskState.PENDING]
        if rerun:
            pipe.hdel(keys.results(run_id), *rerun)

    def _job_args(self, task: str, attempt: int) -> tuple[str, str, int, str, str, Optional[float], int]:
        spec = self.specs[task]
        return (self.run_id, task, attempt, spec["ref"], spec["payload"], spec["timeout"],
                self.settings.max_result_bytes)

    def _lean_entry(self, task: str, attempt: int) -> str:
        return job_message(*self._job_args(task, attempt), signer=self.signer)

    def _unqueue(self, pipe: Any, attempts: Sequence[Any]) -> None:
        """Take queued attempts back, in whichever form they were sent (a no-op for one already taken)."""
        for stop in attempts:
            queue = self._queue_name(stop.task)
            pipe.lrem(keys.lean_queue(queue), 0, self._lean_entry(stop.task, stop.attempt))
            pipe.lrem(self._queue(queue).key, 0, self.job_id(stop.task, stop.attempt))

    def _queue_jobs(self, pipe: Any, attempts: Sequence[tuple[str, int]]) -> None:
        """Queue ``(task, attempt)`` pairs on ``pipe``, each queue's in the form its live workers run."""
        lean: dict[str, list[str]] = {}
        rq_jobs: dict[str, list[Any]] = {}
        for task, attempt in attempts:
            queue = self._queue_name(task)
            transport = self.routes.transport(queue)
            self._mark_waiting(task, attempt, transport)
            if transport == LEAN:
                lean.setdefault(queue, []).append(self._lean_entry(task, attempt))
            else:
                rq_jobs.setdefault(queue, []).append(self._rq_job(task, attempt))
        for queue_name, messages in lean.items():
            pipe.rpush(keys.lean_queue(queue_name), *messages)
        for queue_name, jobs in rq_jobs.items():
            rq_queue = self._queue(queue_name)
            rq_queue.enqueue_many(jobs, pipeline=pipe)
            for job in jobs:
                self.watch.dispatched(job.job_id, job.args[1], job.args[2], rq_queue.intermediate_queue_key)

    def _rq_job(self, task: str, attempt: int) -> Any:
        timeout = self.specs[task]["timeout"]
        job_timeout = NO_TIMEOUT if timeout is None else math.ceil(timeout) + math.ceil(self.settings.kill_grace)
        fields = self._job_args(task, attempt)
        args: tuple[Any, ...] = fields if self.signer is None else (*fields, job_signature(self.signer, fields))
        from rq import Queue

        return Queue.prepare_data(
            JOB_FUNCTION,
            args=args,
            timeout=job_timeout,
            result_ttl=RQ_RESULT_TTL,
            failure_ttl=self.settings.retention,
            job_id=self.job_id(task, attempt),
            description=f"orch run {self.run_id} task {task!r} attempt {attempt}",
        )

    # ------------------------------------------------------------ routing
    def _reroute(self) -> None:
        """Move the attempts still waiting on a queue whose live workers now run the other form."""
        moving: list[tuple[str, int, Optional[str]]] = []
        for queue, forms in self._forms.items():
            route = self.routes.transport(queue)
            if forms == {route}:
                continue
            self._forms[queue] = {route}
            moving += [(task, attempt, via) for task, (attempt, via) in self._waiting.get(queue, {}).items()
                       if via != route]
        if not moving:
            return
        pipe = self.connection.pipeline(transaction=False)
        for task, attempt, _via in moving:
            pipe.lrem(keys.lean_queue(self._queue_name(task)), 1, self._lean_entry(task, attempt))
            pipe.lrem(self._queue(self._queue_name(task)).key, 1, self.job_id(task, attempt))
        removed = pipe.execute()
        from rq.job import Job

        taken_back = []
        pipe = self.connection.pipeline(transaction=True)
        for n, (task, attempt, _via) in enumerate(moving):
            from_lean, from_rq = removed[2 * n], removed[2 * n + 1]
            if from_rq:
                pipe.delete(Job.key_for(self.job_id(task, attempt)))
                self.watch.finished(self.job_id(task, attempt), task, attempt)
            if from_lean or from_rq:
                taken_back.append((task, attempt))
            else:  # a worker took it meanwhile: it reports as usual
                self._mark_waiting(task, attempt, self.routes.transport(self._queue_name(task)))
        self._queue_jobs(pipe, taken_back)
        pipe.execute()
        if taken_back:
            log.info("run %s: moved %d waiting job(s) to the form their queue's live workers run",
                     self.run_id, len(taken_back))

    def _update_notice(self) -> None:
        """Say (once, and again when it changes) which queues' tasks wait with no live worker."""
        notice = self.routes.notice({queue: len(tasks) for queue, tasks in self._waiting.items()})
        if notice == self.notice:
            return
        self.notice = notice
        if notice is None:
            self.connection.hdel(keys.run(self.run_id), "warning")
        else:
            self.connection.hset(keys.run(self.run_id), "warning", notice)
        if self.on_notice is not None:
            self.on_notice(notice)
        elif notice is None:
            log.info("run %s: every waiting task has a live worker again", self.run_id)
        else:
            log.warning("run %s: %s", self.run_id, notice)

    def _reconnecting(self, call: Any, *args: Any) -> Any:
        """``call(*args)``, retried with backoff while Redis is unreachable, up to ``settings.outage`` s."""
        deadline = time.monotonic() + self.settings.outage
        pause = 0.1
        while True:
            try:
                return call(*args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("run %s: Redis unreachable (%s); retrying in %.1fs", self.run_id, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _stop_running(self, task: str, attempt: int) -> None:
        """Ask the worker running this attempt, if any, to kill its work process (either kind)."""
        self.connection.publish(keys.STOP_CHANNEL, json.dumps([self.run_id, task, attempt]))
        from rq.command import send_stop_job_command
        from rq.serializers import JSONSerializer

        try:
            send_stop_job_command(self.connection, self.job_id(task, attempt), serializer=JSONSerializer)
        except Exception as exc:  # the job may be queued, finished or unknown: nothing to stop
            log.debug("stop of %s attempt %s: %s", task, attempt, exc)

    # ------------------------------------------------------------------- input
    def wait(self, timeout: float) -> Sequence[Event]:
        self._flush_deferred()
        lost = list(self._reconnecting(self._housekeeping))
        if not lost:
            if self._deferred is not None:  # wake in time to write the deferred records
                timeout = min(timeout, max(0.0, self._deferred_since + DEFER_WRITES - time.monotonic()))
            if self._only_starts_read and timeout > 0:
                # Starts are never urgent: after a read that brought nothing else, what arrives in
                # the next moment is read together (one wake-up for many reports, not one each).
                pause = min(START_BATCH, timeout)
                time.sleep(pause)
                timeout -= pause
            read: list[Event] = self._reconnecting(self._read, min(timeout, self._housekeeping_every))
            self._only_starts_read = bool(read) and all(type(event) is TaskStarted for event in read)
            return read
        # An attempt whose worker's heartbeat lapsed may have reported before it did (a worker
        # cut off for a while; a resumed run finds outcomes that waited in the stream for
        # longer than the TTL): read everything already in the stream first, so that those
        # outcomes come before the losses, which the scheduler then ignores as not current.
        events: list[Event] = []
        while True:
            before = self._last_event
            events.extend(self._reconnecting(self._read, 0))
            if self._last_event == before:
                break
        return events + lost

    def _housekeeping(self) -> list[Event]:
        """Renew the lease and fail the attempts of workers that are gone, once a second."""
        now = time.monotonic()
        if now < self._housekeeping_at:
            return []
        self._housekeeping_at = now + self._housekeeping_every
        if self.lease is not None and not self.lease.acquire():
            raise LeaseLost(self.run_id)
        self.routes.refresh()
        self._reroute()
        self._update_notice()
        self.metrics.flush_if_due()
        return self.watch.check(lean=True)

    def _read(self, timeout: float) -> list[Event]:
        block_ms = max(1, int(timeout * 1000))
        reply = self.connection.xread({self._events_key: self._last_event}, count=READ_BATCH, block=block_ms)
        events: list[Event] = []
        now = time.time()  # one clock reading for the batch: one float the batch's tasks share, not one each
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_event = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                events.extend(self._events_of(fields, now))
        return events

    def _events_of(self, fields: Mapping[Any, Any], now: Optional[float] = None) -> tuple[Event, ...]:
        """The events an entry of the run's stream stands for, at ``now`` (the coordinator's clock, which
        decides retry times, not a worker's; read here if not given): none for one to ignore, two for
        a finished attempt's outcome that also reports its start."""
        now = time.time() if now is None else now
        by = cancel_requester(fields)
        if by is not None:
            if self.signer is not None and not fields_verified(self.signer, CANCEL_KIND, self.run_id, 0, fields):
                log.error("run %s: ignored a cancel request (by %.80r) with a missing or wrong signature",
                          self.run_id, by)
                return ()
            return (RunCancelled(now, by),)
        try:
            outcome = Outcome.from_fields(fields)
        except SerializationError as exc:
            log.error("run %s: ignored an unreadable event: %s", self.run_id, exc)
            return ()
        if outcome.run_id != self.run_id or outcome.task not in self.tasks:
            log.error("run %s: ignored an event for run %.80r task %.80r", self.run_id, outcome.run_id, outcome.task)
            return ()
        if self.signer is not None and not fields_verified(self.signer, OUTCOME_KIND, self.run_id, outcome.attempt,
                                                           fields):
            log.error("run %s: ignored a %s outcome of task %.80r attempt %s with a missing or wrong signature",
                      self.run_id, outcome.status, outcome.task, outcome.attempt)
            return ()
        job_id = self.job_id(outcome.task, outcome.attempt)
        if outcome.status == STARTED:
            self.watch.started(job_id, outcome.task, outcome.attempt, outcome.worker)
            return (TaskStarted(outcome.task, outcome.attempt, now, outcome.worker),)
        self.watch.finished(job_id, outcome.task, outcome.attempt)
        if outcome.with_start:
            return TaskStarted(outcome.task, outcome.attempt, now, outcome.worker), finished_event(outcome, now)
        return (finished_event(outcome, now),)

    def close(self) -> None:
        self.connection.close()
