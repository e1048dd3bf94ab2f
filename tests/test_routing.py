"""Each queue's jobs in the form its live workers run, and the warning for a queue nobody serves.

The decisions are pure (``choose_transport``, ``waiting_notice``); the moves of
waiting jobs are checked on fakeredis with the real backend, registry entries
written the way workers write them.
"""
from __future__ import annotations

import time

import fakeredis
import pytest
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

import dist_tasks
import orchestrator.backends.routing as routing
from orchestrator.backends.routing import choose_transport, waiting_notice
from orchestrator.backends.rq import RQBackend
from orchestrator.coordinator import Coordinator
from orchestrator.distributed import submit_run
from orchestrator.scheduler import Scheduler
from shared import keys
from shared.jobs import job_message
from shared.workers import LEAN, RQ, WorkerInfo, beat, kinds_by_queue, live_workers, retire


def test_a_queue_gets_rq_jobs_only_when_rq_workers_alone_serve_it() -> None:
    assert choose_transport(set()) == LEAN, "no worker yet: the default form"
    assert choose_transport({LEAN}) == LEAN
    assert choose_transport({RQ}) == RQ
    assert choose_transport({LEAN, RQ}) == LEAN
    assert choose_transport({LEAN}, pinned=RQ) == RQ
    assert choose_transport(set(), pinned=LEAN) == LEAN


def test_waiting_notice_names_each_queue_nobody_serves() -> None:
    served = {"default": {LEAN}}
    assert waiting_notice({"default": 5}, served) is None, "busy workers are not a warning"
    assert waiting_notice({"gpu": 1}, served) == "1 task waiting on queue 'gpu': no live worker serves it"
    assert waiting_notice({"gpu": 3, "io": 2, "default": 4, "empty": 0}, served) == (
        "3 tasks waiting on queue 'gpu': no live worker serves it; "
        "2 tasks waiting on queue 'io': no live worker serves it")
    assert waiting_notice({}, served) is None
    pinned = waiting_notice({"default": 2}, served, pinned=RQ)
    assert pinned is not None and "do not run rq jobs" in pinned and "orch worker --mode rq" in pinned


def test_registry_lists_live_workers_and_forgets_lapsed_and_forged_ones() -> None:
    conn = fakeredis.FakeRedis()
    beat(conn, WorkerInfo("a", LEAN, ("default", "io"), concurrency=4), ttl=60)
    beat(conn, WorkerInfo("b", RQ, ("io",)), ttl=60)
    beat(conn, WorkerInfo("gone", RQ, ("gpu",)), ttl=60)
    conn.delete(keys.alive("gone"))                 # its heartbeat lapsed
    conn.sadd(keys.WORKERS, "forged")
    conn.set(keys.alive("forged"), "not json")      # written by something that is no worker
    live = live_workers(conn)
    assert sorted(w.name for w in live) == ["a", "b"]
    assert next(w for w in live if w.name == "a").concurrency == 4
    assert kinds_by_queue(live) == {"default": {LEAN}, "io": {LEAN, RQ}}
    assert not conn.sismember(keys.WORKERS, "gone"), "a lapsed worker leaves the set"
    retire(conn, "a")
    assert [w.name for w in live_workers(conn)] == ["b"]


class Harness:
    """A run submitted on fakeredis and driven one step at a time by the real backend."""

    def __init__(self, conn: fakeredis.FakeRedis, workflow, **backend_options) -> None:
        self.conn = conn
        submission = submit_run(workflow, conn)
        self.run_id = submission.run_id
        self.backend = RQBackend(conn, self.run_id, workflow.tasks, submission.specs, **backend_options)
        self.coordinator = Coordinator(workflow.tasks, self.backend,
                                       scheduler=Scheduler(workflow.tasks.values(), submission.graph))
        self.coordinator.apply(self.coordinator.scheduler.start(time.time()))

    def housekeeping(self) -> None:
        self.backend._housekeeping_at = 0.0
        self.backend.wait(0)

    def rq_ids(self) -> list[str]:
        return Queue("default", connection=self.conn, serializer=JSONSerializer).job_ids

    def lean_entries(self) -> list[bytes]:
        return self.conn.lrange(keys.lean_queue("default"), 0, -1)


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    monkeypatch.setattr(routing, "REFRESH_INTERVAL", 0.0)
    return fakeredis.FakeRedis()


def test_jobs_waiting_for_a_replaced_rq_worker_move_to_the_lean_queue(conn) -> None:
    beat(conn, WorkerInfo("rq-1", RQ, ("default",)), ttl=60)
    h = Harness(conn, dist_tasks.make_example())
    job_id = keys.job_id(h.run_id, 0, 1)
    assert h.rq_ids() == [job_id] and h.lean_entries() == []

    retire(conn, "rq-1")
    beat(conn, WorkerInfo("lean-1", LEAN, ("default",)), ttl=60)
    h.housekeeping()

    assert h.rq_ids() == [], "taken back from RQ's queue"
    assert not conn.exists(Job.key_for(job_id)), "and its RQ job is gone"
    assert h.lean_entries() == [job_message(h.run_id, "extract", 1, "dist_tasks:extract_data", "[[],{}]",
                                            None, h.backend.settings.max_result_bytes).encode()]
    assert not conn.hexists(keys.run(h.run_id), "warning")


def test_a_job_a_worker_already_took_is_not_moved(conn) -> None:
    beat(conn, WorkerInfo("lean-1", LEAN, ("default",)), ttl=60)
    h = Harness(conn, dist_tasks.make_example())
    # a worker took it
    conn.lmove(keys.lean_queue("default"), keys.inflight(keys.lean_slot("lean-1", 0)), "LEFT", "RIGHT")
    retire(conn, "lean-1")
    beat(conn, WorkerInfo("rq-1", RQ, ("default",)), ttl=60)
    h.housekeeping()
    assert h.rq_ids() == [], "not sent twice"
    assert conn.llen(keys.inflight(keys.lean_slot("lean-1", 0))) == 1


def test_a_queue_with_no_live_worker_is_reported_and_cleared(conn) -> None:
    notices: list = []
    h = Harness(conn, dist_tasks.make_on_gpu(), on_notice=notices.append)
    h.housekeeping()
    text = "1 task waiting on queue 'gpu': no live worker serves it"
    assert notices == [text]
    assert conn.hget(keys.run(h.run_id), "warning") == text.encode()
    h.housekeeping()
    assert notices == [text], "said once, not every second"

    beat(conn, WorkerInfo("gpu-1", LEAN, ("gpu",)), ttl=60)
    h.housekeeping()
    assert notices == [text, None]
    assert not conn.hexists(keys.run(h.run_id), "warning")


def test_a_pinned_transport_the_workers_do_not_run_is_reported(conn) -> None:
    beat(conn, WorkerInfo("lean-1", LEAN, ("default",)), ttl=60)
    notices: list = []
    h = Harness(conn, dist_tasks.make_example(), transport=RQ, on_notice=notices.append)
    h.housekeeping()
    assert h.rq_ids() == [keys.job_id(h.run_id, 0, 1)], "pinned: RQ jobs whatever the workers"
    assert len(notices) == 1 and "its live workers do not run rq jobs" in notices[0]
