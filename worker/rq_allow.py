"""RQ jobs whose functions pass this worker's allow check before RQ imports them.

RQ imports whatever function name a job carries (``import_attribute``), and so
the names of its success, failure and stopped callbacks. An ``orch worker
--mode rq`` deserializes every job it takes as a :class:`CheckedJob`, whose
``func`` and callbacks are checked with :func:`shared.allow.worker_allowlist`
first: a refused name raises :class:`~shared.errors.TaskRefused` in the work
horse, which RQ files as the job's failure; the worker goes on serving. orch's
own job function is let through: the task it names is checked by
:func:`worker.rq_job.attempt_outcome` the same way, before its import. With
signing on, nothing but orch's own (signed) job function is let through: a plain
RQ job or a callback name carries no signature, and a callback added to a signed
job's hash is outside what its signature covers.

A job whose data is longer than a job entry may be (:func:`shared.config.max_job_entry_bytes`),
stored or once decompressed (a small zlib "bomb" may expand a thousandfold), is not read: the
worker drops it with one log line, as RQ drops a job whose hash is gone. A job
without a failure TTL (none of orch's) gets :data:`shared.keys.ORPHAN_TTL`, so that
the result RQ files for its failure does not stay forever.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any, Optional

from rq.exceptions import NoSuchJobError
from rq.job import Job

from shared import keys
from shared.allow import worker_allowlist
from shared.config import max_job_entry_bytes
from shared.errors import TaskRefused
from shared.jobs import JOB_FUNCTION
from shared.signing import configured_signer

log = logging.getLogger("orch.worker")


def _check(name: Optional[str], job: Job) -> None:
    if name is not None and name != JOB_FUNCTION:
        worker = job.worker_name or "this worker"
        if configured_signer() is not None:
            raise TaskRefused(name, worker, "with ORCH_SIGNING_KEY set it runs only orch's own signed jobs, "
                                            "not plain RQ jobs or callbacks, which carry no signature")
        worker_allowlist().check(name, worker)


def _checked(name_attribute: str, callback: Any) -> property:
    """``callback`` (a property of :class:`Job`) with its function name checked first.

    Typed Any: mypy sees a property read from a class as its getter's return type, not a property."""
    def get(job: Job) -> Any:
        _check(getattr(job, name_attribute), job)
        return callback.fget(job)

    return property(get)


def _oversized(raw: Any, limit: int) -> Optional[str]:
    """Why job data ``raw`` (as stored, maybe zlib-compressed) is not to be read, or ``None``."""
    if not isinstance(raw, (bytes, str)):
        return None
    if len(raw) > limit:
        return f"its data is {len(raw)} bytes"
    if isinstance(raw, bytes):
        try:
            inflater = zlib.decompressobj()
            inflater.decompress(raw, limit + 1)
            if inflater.unconsumed_tail:
                return f"its data expands past {limit} bytes"
        except zlib.error:
            pass  # stored uncompressed: its length was checked
    return None


class CheckedJob(Job):
    """A :class:`rq.job.Job` that imports nothing its worker does not allow, and reads no job data
    longer than a job entry may be."""

    def restore(self, raw_data: Any) -> Any:
        limit = max_job_entry_bytes()
        why = _oversized(raw_data.get(b"data", raw_data.get("data")), limit)
        if why is not None:
            log.error("dropped job %s unread: %s, over this worker's limit of %d bytes (ORCH_MAX_PAYLOAD_BYTES)",
                      self.id, why, limit)
            raise NoSuchJobError(f"job {self.id} is over the size limit")
        restored = super().restore(raw_data)
        if self.failure_ttl is None:  # not orch's (it sets one): RQ would keep its failure's result forever
            self.failure_ttl = keys.ORPHAN_TTL
        return restored

    @property
    def func(self) -> Any:
        if self.instance is None:
            _check(self.func_name, self)
        return super().func

    success_callback = _checked("_success_callback_name", Job.success_callback)
    failure_callback = _checked("_failure_callback_name", Job.failure_callback)
    stopped_callback = _checked("_stopped_callback_name", Job.stopped_callback)
