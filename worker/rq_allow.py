"""RQ jobs whose functions pass this worker's allow check before RQ imports them.

RQ imports whatever function name a job carries (``import_attribute``), and so
the names of its success, failure and stopped callbacks. An ``orch worker
--mode rq`` deserializes every job it takes as a :class:`CheckedJob`, whose
``func`` and callbacks are checked with :func:`shared.allow.worker_allowlist`
first: a refused name raises :class:`~shared.errors.TaskRefused` in the work
horse, which RQ files as the job's failure; the worker goes on serving. orch's
own job function is let through: the task it names is checked by
:func:`worker.rq_job.attempt_outcome` the same way, before its import.
"""
from __future__ import annotations

from typing import Any, Optional

from rq.job import Job

from shared.allow import worker_allowlist
from shared.jobs import JOB_FUNCTION


def _check(name: Optional[str], job: Job) -> None:
    if name is not None and name != JOB_FUNCTION:
        worker_allowlist().check(name, job.worker_name or "this worker")


def _checked(name_attribute: str, callback: Any) -> property:
    """``callback`` (a property of :class:`Job`) with its function name checked first.

    Typed Any: mypy sees a property read from a class as its getter's return type, not a property."""
    def get(job: Job) -> Any:
        _check(getattr(job, name_attribute), job)
        return callback.fget(job)

    return property(get)


class CheckedJob(Job):
    """A :class:`rq.job.Job` that imports nothing its worker does not allow."""

    @property
    def func(self) -> Any:
        if self.instance is None:
            _check(self.func_name, self)
        return super().func

    success_callback = _checked("_success_callback_name", Job.success_callback)
    failure_callback = _checked("_failure_callback_name", Job.failure_callback)
    stopped_callback = _checked("_stopped_callback_name", Job.stopped_callback)
