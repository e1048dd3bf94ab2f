"""Which form each queue's jobs take, and when a queue has no live worker.

A user never makes a worker flag and a submit flag agree: the coordinator
looks at the live workers of each queue (:mod:`shared.workers`) and sends that
queue's jobs in the form they run. ``orch worker`` (lean, the default) serves
orch's own queues; ``orch worker --mode rq`` (the RQ-compatible opt-in) serves
RQ jobs. A queue served by lean workers, or by no live worker yet, gets lean
jobs; a queue served only by RQ workers gets RQ jobs. When that changes (the
only worker of a queue is replaced by one of the other kind), the jobs still
waiting there are moved (:class:`Routes` says which; the backend moves them).

A queue whose jobs wait while no live worker serves it is said out loud,
:func:`waiting_notice`, so that a run never waits in silence. Busy workers are
not a warning: the jobs are waiting their turn.

The decisions are pure functions of what was read (``choose_transport``,
``waiting_notice``); :class:`Routes` holds the last reading.
"""
from __future__ import annotations

import time
from typing import Mapping, Optional

import redis

from shared.workers import LEAN, RQ, kinds_by_queue, live_workers

AUTO = "auto"
"""The default: each queue's jobs in the form its live workers run."""
TRANSPORTS = (AUTO, LEAN, RQ)
REFRESH_INTERVAL = 1.0
"""Seconds between two readings of the live-worker registry."""


def choose_transport(kinds: set[str], pinned: Optional[str] = None) -> str:
    """The form of a queue's jobs, given the kinds of its live workers (``pinned``: always that one)."""
    if pinned in (LEAN, RQ):
        return pinned
    return RQ if kinds == {RQ} else LEAN


def waiting_notice(waiting: Mapping[str, int], served: Mapping[str, set[str]],
                   pinned: Optional[str] = None) -> Optional[str]:
    """One line for the queues whose ``waiting`` tasks no live worker can run, or ``None``.

    ``waiting``: queue -> tasks dispatched there and not started; ``served``:
    queue -> kinds of its live workers.
    """
    parts = []
    for queue in sorted(waiting):
        count = waiting[queue]
        if not count:
            continue
        kinds = served.get(queue, set())
        what = f"{count} task{'s' if count != 1 else ''} waiting on queue '{queue}'"
        if not kinds:
            parts.append(f"{what}: no live worker serves it")
        elif pinned in (LEAN, RQ) and pinned not in kinds:
            need = "orch worker --mode rq" if pinned == RQ else "orch worker"
            parts.append(f"{what}: its live workers do not run {pinned} jobs (start '{need}', "
                         f"or submit without a transport)")
    return "; ".join(parts) or None


class Routes:
    """The last reading of the live workers, and the transport of each queue from it."""

    def __init__(self, connection: redis.Redis, pinned: Optional[str] = None) -> None:
        self.connection = connection
        self.pinned = None if pinned in (None, AUTO) else pinned
        self.served: dict[str, set[str]] = {}
        self._read_at: Optional[float] = None

    def refresh(self, force: bool = False) -> None:
        """Read the registry again if the last reading is older than ``REFRESH_INTERVAL``."""
        now = time.monotonic()
        if not force and self._read_at is not None and now - self._read_at < REFRESH_INTERVAL:
            return
        self._read_at = now
        self.served = kinds_by_queue(live_workers(self.connection))

    def transport(self, queue: str) -> str:
        if self.pinned is not None:
            return self.pinned
        if self._read_at is None:
            self.refresh()
        return choose_transport(self.served.get(queue, set()))

    def notice(self, waiting: Mapping[str, int]) -> Optional[str]:
        return waiting_notice(waiting, self.served, self.pinned)
