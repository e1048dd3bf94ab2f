"""RQ's worker bookkeeping without the writes that change nothing.

Between two jobs, a forking RQ worker writes its own hash (``rq:worker:{name}``)
in eight round trips within a millisecond or two: the job's working time back to
0, its state to idle twice, and its heartbeat (``last_heartbeat`` and the TTL)
three times, besides the suspension check, which heartbeats too. For a job of a
few milliseconds that is most of the worker parent's Redis traffic.
:class:`QuietBookkeeping` leaves out, in the worker's parent process, a write
whose effect Redis already holds because this process wrote it:

- a heartbeat with the same TTL as one this process sent less than :data:`WITHIN`
  seconds ago, with no work horse run since (a horse sets a shorter TTL): the
  key's expiry is never more than that second sooner than RQ's writes would set it;
- a state that this process wrote less than that second ago (a work horse never
  writes the state);
- a working time of 0 within that second of a work horse's start (the horse sets
  it to 0 as it starts) with none written since.

What ``rq info`` shows is unchanged, except that ``last_heartbeat`` may be that
second older. Writes on a pipeline, and every write of a work horse, go out as
RQ sends them (and those on a pipeline count as written).
"""
from __future__ import annotations

import time
from typing import Any, Optional

WITHIN = 1.0
"""Seconds for which a value this process wrote is taken to be still in Redis."""


class QuietBookkeeping:
    """Mix in before RQ's ``Worker``: ``class MyWorker(QuietBookkeeping, Worker)``."""

    _written: Optional[dict[str, tuple[Any, float]]] = None

    def _unchanged(self, field: str, value: Any, pipeline: Any) -> bool:
        """Whether writing ``value`` to ``field`` now, not on a pipeline, would change nothing."""
        if pipeline is not None or self.is_horse or not self._written:  # type: ignore[attr-defined]
            return False
        last = self._written.get(field)
        return last is not None and last[0] == value and time.monotonic() - last[1] < WITHIN

    def _wrote(self, field: str, value: Any) -> None:
        if self._written is None:
            self._written = {}
        self._written[field] = (value, time.monotonic())

    def heartbeat(self, timeout: Optional[int] = None, pipeline: Any = None) -> None:
        ttl = timeout or self.worker_ttl + 60  # type: ignore[attr-defined]  # worker_ttl: RQ's Worker, which this mixes into
        if self._unchanged("ttl", ttl, pipeline):
            return
        super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[misc]
        self._wrote("ttl", ttl)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if self._unchanged("state", state, pipeline):
            self._state = state
            return
        super().set_state(state, pipeline=pipeline)  # type: ignore[misc]
        self._wrote("state", state)

    def set_current_job_working_time(self, current_job_working_time: float, pipeline: Any = None) -> None:
        if self._unchanged("working_time", current_job_working_time, pipeline):
            self.current_job_working_time = current_job_working_time
            return
        super().set_current_job_working_time(current_job_working_time, pipeline=pipeline)  # type: ignore[misc]
        self._wrote("working_time", current_job_working_time)

    def monitor_work_horse(self, job: Any, queue: Any) -> None:
        """While the horse runs: it sets the working time to 0 as it starts, and a shorter TTL."""
        self._wrote("working_time", 0)
        try:
            super().monitor_work_horse(job, queue)  # type: ignore[misc]
        finally:
            self._wrote("ttl", None)
