"""What a lean work process is doing, in a few words of memory it shares with its parent.

A work process takes and reports its own jobs; its parent only supervises. To
time an attempt out, to find the attempt a stop request names, and to know what
was in a work process's hands when it died, the parent reads this record, which
the work process writes at each change of state: two plain stores per field,
no system call, no message, never a wait on the parent.

The record is a seqlock: the writer makes ``version`` odd, writes the fields and
makes it even again; a reader that saw an odd version, or a different one after
reading, reads again. This relies on the stores becoming visible in program
order, which x86-64 guarantees. A writer killed in the middle of a write leaves
the version odd for good: :meth:`SlotRecord.read` then returns ``None``, which
the parent treats as "nothing known" (see :mod:`worker.lean`).

The attempt is identified by :func:`attempt_id`, a 64-bit hash of
``(run, task, attempt)``: the work processes are forked from the parent, so both
sides hash with the same secret.

One word is the parent's: ``claimed``, the attempt whose start the parent
reported on the work process's behalf (a job taken while the worker was idle has
its start reported with its outcome, unless it runs longer than
:data:`worker.lean.START_REPORT_DELAY`; then the parent reports it). It is
outside the seqlock: one aligned word, written by one side only.
"""
from __future__ import annotations

import ctypes
import math
import multiprocessing.sharedctypes
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional


class State(IntEnum):
    IDLE = 0
    """Starting, or between two calls; holds nothing."""
    BLOCKING = 1
    """Waiting for a job on queue number ``queue`` (``BLMOVE``): a job may land in its in-flight
    list at any moment, and then came from that queue."""
    TAKING = 2
    """In a finish-and-take call: reporting the attempt it ran and maybe taking the next one,
    from a queue it does not know yet. The attempt it ran is over: not to be timed out."""
    RUNNING = 3
    """Holding attempt ``attempt`` from queue number ``queue`` since ``started`` (``unreported``:
    its start is not reported yet)."""
    DONE = 4
    """Exiting on purpose (shutdown, or ``--burst`` with the queues empty): not to be replaced."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent read of a :class:`SlotRecord`."""

    state: State
    queue: int
    attempt: int
    started: float
    deadline: float
    timeout: float
    unreported: bool = False

    def holds(self, attempt: int) -> bool:
        return self.state is State.RUNNING and self.attempt == attempt


class _Fields(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint64), ("state", ctypes.c_int32), ("queue", ctypes.c_int32),
                ("attempt", ctypes.c_int64), ("started", ctypes.c_double), ("deadline", ctypes.c_double),
                ("timeout", ctypes.c_double), ("unreported", ctypes.c_int32), ("claimed", ctypes.c_int64)]


def attempt_id(run_id: str, task: str, attempt: int) -> int:
    """The number a record holds for attempt ``attempt`` of ``task`` in ``run_id``."""
    return hash((run_id, task, attempt))


class SlotRecord:
    """The shared record of one slot; made by the parent before it forks the work process."""

    READ_TRIES = 10_000

    def __init__(self) -> None:
        self._fields = multiprocessing.sharedctypes.RawValue(_Fields)

    def set(self, state: State, queue: int = -1, attempt: int = 0, started: float = 0.0,
            deadline: float = math.inf, timeout: float = 0.0, unreported: bool = False) -> None:
        """Write a new state (the work process does; the parent only to reset a slot it respawns)."""
        f = self._fields
        f.version += 1
        f.state = state
        f.queue = queue
        f.attempt = attempt
        f.started = started
        f.deadline = deadline
        f.timeout = timeout
        f.unreported = unreported
        f.version += 1

    def claim(self, attempt: int) -> None:
        """The parent reported the start of ``attempt`` (the work process then leaves it out)."""
        self._fields.claimed = attempt

    def claimed(self) -> int:
        return self._fields.claimed

    def read(self) -> Optional[Snapshot]:
        """The record as last written; ``None`` if no consistent read was possible (a writer
        that died while writing)."""
        f = self._fields
        for _ in range(self.READ_TRIES):
            before = f.version
            if before & 1:
                continue
            snapshot = Snapshot(State(f.state), f.queue, f.attempt, f.started, f.deadline, f.timeout,
                                bool(f.unreported))
            if f.version == before:
                return snapshot
        return None


class _ParentFields(ctypes.Structure):
    _fields_ = [("halt", ctypes.c_int32), ("beat_at", ctypes.c_double)]


class ParentWords:
    """What the parent tells all its work processes, in shared memory: ``halt`` (a shutdown: take
    no new job) and ``beat_at`` (``time.monotonic()`` of its last heartbeat that reached Redis).
    A work process takes jobs only while that heartbeat stands: if the parent is stopped or cannot
    beat, the coordinator will soon count the worker lost and fail what it holds, so taking more
    would only make work to be done twice."""

    def __init__(self) -> None:
        self._fields = multiprocessing.sharedctypes.RawValue(_ParentFields)

    @property
    def halt(self) -> bool:
        return bool(self._fields.halt)

    @halt.setter
    def halt(self, value: bool) -> None:
        self._fields.halt = int(value)

    @property
    def beat_at(self) -> float:
        return self._fields.beat_at

    @beat_at.setter
    def beat_at(self, value: float) -> None:
        self._fields.beat_at = value
