"""``worker.rq_bookkeeping``: which of RQ's own writes of a worker's state are left out, and which never.

A stand-in for RQ's ``Worker`` records what would reach Redis; the clock is set by hand.
"""
from __future__ import annotations

from typing import Any

import pytest

from worker import rq_bookkeeping
from worker.rq_bookkeeping import WITHIN, QuietBookkeeping

PIPE = object()


class _RQWorker:
    """What QuietBookkeeping overrides, as RQ has it, writing to a list instead of Redis."""

    worker_ttl = 420
    is_horse = False

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def heartbeat(self, timeout: Any = None, pipeline: Any = None) -> None:
        self.sent.append(("heartbeat", timeout or self.worker_ttl + 60, pipeline is not None))

    def set_state(self, state: str, pipeline: Any = None) -> None:
        self._state = state
        self.sent.append(("state", state, pipeline is not None))

    def set_current_job_working_time(self, value: float, pipeline: Any = None) -> None:
        self.current_job_working_time = value
        self.sent.append(("working_time", value, pipeline is not None))

    def monitor_work_horse(self, job: Any, queue: Any) -> None:
        self.sent.append(("horse", job))


class _Worker(QuietBookkeeping, _RQWorker):
    pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(rq_bookkeeping.time, "monotonic", lambda: now[0])
    return now


def test_between_two_jobs_each_write_goes_out_once(clock: list[float]) -> None:
    """The sequence RQ's forking worker sends after a short job, then before the next."""
    worker = _Worker()
    worker.set_state("busy", pipeline=PIPE)   # prepare_execution, before the fork
    worker.monitor_work_horse("job", "queue")  # the horse runs (it sets working time 0, TTL 61)
    worker.set_current_job_working_time(0)      # monitor_work_horse's end
    worker.set_state("idle")                    # execute_job's end
    worker.heartbeat()                          # the work loop
    worker.heartbeat(pipeline=PIPE)             # the suspension check
    worker.set_state("idle")                    # dequeue_job_and_maintain_ttl
    worker.heartbeat()                          # its loop, before BLMOVE
    worker.heartbeat()                          # after the dequeue
    assert worker.sent == [("state", "busy", True), ("horse", "job"), ("state", "idle", False),
                           ("heartbeat", 480, False), ("heartbeat", 480, True)]
    assert worker._state == "idle" and worker.current_job_working_time == 0


def test_a_heartbeat_goes_out_after_a_horse_after_a_second_and_with_another_ttl(clock: list[float]) -> None:
    worker = _Worker()
    worker.heartbeat()
    worker.heartbeat(61)
    worker.heartbeat(61)
    worker.monitor_work_horse("job", "queue")
    worker.heartbeat(61)
    clock[0] += WITHIN
    worker.heartbeat(61)
    assert [sent[1] for sent in worker.sent if sent[0] == "heartbeat"] == [480, 61, 61, 61]


class _LongJob(_RQWorker):
    def monitor_work_horse(self, job: Any, queue: Any) -> None:
        self.set_current_job_working_time(1.0)  # RQ's monitor loop, once the horse ran a monitoring interval
        super().monitor_work_horse(job, queue)


def test_a_working_time_written_during_a_job_is_reset_in_redis(clock: list[float]) -> None:
    worker = type("_LongJobWorker", (QuietBookkeeping, _LongJob), {})()
    worker.monitor_work_horse("job", "queue")
    worker.set_current_job_working_time(0)
    assert [sent[1] for sent in worker.sent if sent[0] == "working_time"] == [1.0, 0]


def test_a_state_is_written_again_after_a_second(clock: list[float]) -> None:
    worker = _Worker()
    worker.set_state("idle")
    clock[0] += WITHIN
    worker.set_state("idle")
    assert worker.sent == [("state", "idle", False)] * 2


def test_a_work_horse_and_pipelines_send_everything(clock: list[float]) -> None:
    horse = _Worker()
    horse.is_horse = True
    for _ in range(2):
        horse.heartbeat()
        horse.set_state("busy")
        horse.set_current_job_working_time(0)
    parent = _Worker()
    for _ in range(2):
        parent.heartbeat(pipeline=PIPE)
        parent.set_state("busy", pipeline=PIPE)
        parent.set_current_job_working_time(0, pipeline=PIPE)
    assert len(horse.sent) == len(parent.sent) == 6
