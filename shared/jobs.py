"""The wire format of a job: what the coordinator puts on a queue for a worker.

Both sides import it from here, so the coordinator never imports a worker
module to learn how a job looks.

- On orch's own queues (``orch:queue:{queue}``, the default path) a job is one
  compact JSON array, :func:`job_message`. It is deterministic, so the
  coordinator can ``LREM`` exactly that entry to take a queued job back.
- On the RQ-compatible path a job is an RQ job whose function is
  :data:`JOB_FUNCTION` with the same fields as its arguments.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

JOB_FUNCTION = "worker.rq_job.run_task"
"""The function of every RQ job orch enqueues."""


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt, as a worker receives it."""

    run_id: str
    task: str
    attempt: int
    ref: str
    payload: str
    timeout: Optional[float]
    max_result_bytes: Optional[int]

    def args(self) -> tuple:
        return (self.run_id, self.task, self.attempt, self.ref, self.payload, self.timeout, self.max_result_bytes)


def job_message(run_id: str, task: str, attempt: int, ref: str, payload: str, timeout: Optional[float],
                max_result_bytes: Optional[int]) -> str:
    """The queue entry of one attempt on orch's own queues."""
    return json.dumps([run_id, task, attempt, ref, payload, timeout, max_result_bytes], separators=(",", ":"))


class MalformedJob(ValueError):
    """A queue entry no coordinator wrote. ``attempt_key`` is ``(run, task, attempt)`` when those
    three could be read (so the attempt can be failed), else ``None`` (the entry is dropped)."""

    def __init__(self, reason: str, attempt_key: Optional[tuple[str, str, int]] = None) -> None:
        super().__init__(reason)
        self.attempt_key = attempt_key


def parse_job_message(raw: bytes | str) -> Job:
    """The :class:`Job` in a queue entry; raises :class:`MalformedJob` saying what is wrong."""
    try:
        fields = json.loads(raw)
        run_id, task, attempt, ref, payload, timeout, max_result_bytes = fields
    except (ValueError, TypeError) as exc:
        raise MalformedJob(f"not a job entry: {exc}") from None
    if not (isinstance(run_id, str) and isinstance(task, str)) or type(attempt) is not int or attempt < 1:
        raise MalformedJob("run id and task must be strings, attempt a positive integer")
    key = (run_id, task, attempt)
    try:
        if not (isinstance(ref, str) and isinstance(payload, str)):
            raise TypeError("reference and payload must be strings")
        timeout = None if timeout is None else float(timeout)
        max_result_bytes = None if max_result_bytes is None else int(max_result_bytes)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout {timeout} is not positive")
    except (ValueError, TypeError, OverflowError) as exc:
        raise MalformedJob(str(exc), key) from None
    return Job(run_id, task, attempt, ref, payload, timeout, max_result_bytes)
