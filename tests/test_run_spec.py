"""The compact run spec (``orchestrator/run_spec.py``): round trips, compactness, hostile input."""
from __future__ import annotations

import copy
import datetime
import json
from typing import Any, Callable

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dist_tasks
import orchestrator.distributed as distributed
from orchestrator import Task, Workflow
from orchestrator.backends.rq import RQBackend
from orchestrator.distributed import restore_coordinator, submit_run
from orchestrator.lease import Lease
from orchestrator.run_spec import NO_ARGUMENTS, RunSpec, encode_arguments
from orchestrator.run_store import load_tasks, read_run
from shared import keys
from shared.errors import CorruptRunError
from shared.refs import reference_of
from shared.states import RunState, TaskState
from dist_tasks import task_records
from tests.test_distributed_fake import FakeCluster

ATTRIBUTES = ("dependencies", "max_retries", "retry_delay", "retry_backoff", "timeout", "queue", "args", "kwargs")


def varied_workflow() -> Workflow:
    """Tasks that differ in every field a spec stores, some sharing settings or arguments."""
    wf = Workflow("varied")
    wf.add_task(Task("extract", "dist_tasks:extract_value", args=({"rows": (1, 2), "at": datetime.date(2024, 5, 1)},),
                     queue="io", timeout=30))
    wf.add_task(Task("a", dist_tasks.identity, ["extract"], max_retries=3, retry_delay=0.5, retry_backoff=2.0,
                     args=(1,)))
    wf.add_task(Task("b", dist_tasks.identity, ["extract", "a", "extract"], args=(1,)))  # a repeat, a's arguments
    wf.add_task(Task("c", dist_tasks.add, ["b"], kwargs={"a": 1, "b": 2}, timeout=0.25, queue="io"))
    wf.add_task(Task("naïve name/with spaces", dist_tasks.root_value, ["c", "a"], max_retries=1))
    wf.add_task(Task("bytes", dist_tasks.identity, args=(b"\x00\xff", {3, 4}), retry_delay=7, retry_backoff=0))
    wf.add_task(Task("plain", dist_tasks.root_value))
    return wf


def reference(task: Task) -> str:
    return task.func if isinstance(task.func, str) else reference_of(task.func)


def spec_of(wf: Workflow) -> RunSpec:
    tasks = list(wf.tasks.values())
    return RunSpec.build(tasks, wf.validate(), [reference(t) for t in tasks])


def assert_same_tasks(loaded: dict[str, Task], original: dict[str, Task]) -> None:
    assert list(loaded) == list(original)
    for name, task in original.items():
        copy_ = loaded[name]
        assert copy_.func == reference(task), name
        for attribute in ATTRIBUTES:
            assert getattr(copy_, attribute) == getattr(task, attribute), (name, attribute)
            assert type(getattr(copy_, attribute)) is type(getattr(task, attribute)), (name, attribute)
        assert copy_.state.value == "pending" and copy_.attempts == 0


# ---------------------------------------------------------------------- round trips
def test_a_spec_gives_back_every_task_as_it_was_given() -> None:
    wf = varied_workflow()
    loaded = RunSpec.from_json(spec_of(wf).to_json()).tasks()
    assert_same_tasks(loaded, wf.tasks)


def test_submit_then_load_from_redis_gives_the_same_tasks_and_job_fields() -> None:
    wf = varied_workflow()
    conn = fakeredis.FakeRedis()
    submission = submit_run(wf, conn)
    meta, spec, tasks = load_tasks(conn, submission.run_id)
    assert meta["total"] == str(len(wf.tasks))
    assert_same_tasks(tasks, wf.tasks)
    for i, (name, task) in enumerate(wf.tasks.items()):
        for stored in (spec, submission.specs):
            assert stored.index[name] == i  # RQ job ids are built from it
            fields = stored[name]
            assert (fields["ref"], fields["payload"], fields["timeout"], fields["queue"]) == (
                reference(task), encode_arguments(task), task.timeout, task.queue)
            assert (fields["max_retries"], fields["retry_delay"], fields["retry_backoff"]) == (
                task.max_retries, task.retry_delay, task.retry_backoff)
    assert list(spec) == list(wf.tasks) and len(spec) == len(wf.tasks)
    assert spec.graph.order == wf.execution_order()


def test_shared_settings_and_arguments_are_stated_once() -> None:
    wf = Workflow("wide")
    wf.add_task(Task("root", dist_tasks.root_value, queue="bench"))
    for i in range(2000):
        wf.add_task(Task(f"t{i}", dist_tasks.root_value, ["root", f"t{i - 1}" if i else "root"], queue="bench"))
    stored = json.loads(spec_of(wf).to_json())
    assert stored["profiles"] == [["dist_tasks:root_value", "bench", None, 0, 0.0, 1.0]]
    assert stored["payloads"] == [NO_ARGUMENTS]
    assert "profile" not in stored and "payload" not in stored
    assert stored["names"][:2] == ["root", "t0"] and stored["deps"][:4] == [0, 0, 0, 1]
    assert stored["ndeps"][:3] == [0, 2, 2]
    assert len(json.dumps(stored)) < 25 * len(wf.tasks)


def test_tasks_with_several_profiles_and_payloads_index_them() -> None:
    stored = json.loads(spec_of(varied_workflow()).to_json())
    assert len(stored["profile"]) == len(stored["payload"]) == len(stored["names"])
    a, b = stored["names"].index("a"), stored["names"].index("b")
    assert stored["payload"][a] == stored["payload"][b]  # the same arguments, stored once
    assert stored["profile"][a] != stored["profile"][b]  # different retry policies


def test_an_empty_workflow_round_trips() -> None:
    spec = RunSpec.from_json(spec_of(Workflow("empty")).to_json())
    assert spec.tasks() == {} and len(spec) == 0


# ------------------------------------------------------------------ damaged specs
def _stored_run(spec_text: str) -> tuple[fakeredis.FakeRedis, str]:
    conn = fakeredis.FakeRedis()
    run_id = "20260101T000000-000000000001"
    conn.hset(keys.run(run_id), mapping={"workflow": "w", "state": "running", "spec": spec_text, "transport": "rq"})
    return conn, run_id


def _valid() -> dict[str, Any]:
    return json.loads(spec_of(varied_workflow()).to_json())


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda doc: doc.__setitem__(key, value)


def _item(key: str, position: int, value: Any) -> Callable[[dict], None]:
    return lambda doc: doc[key].__setitem__(position, value)


DAMAGE: dict[str, Callable[[dict], None]] = {
    "no names": lambda doc: doc.pop("names"),
    "no profiles": lambda doc: doc.pop("profiles"),
    "format 3": _set("format", 3),
    "names not a list": _set("names", "abc"),
    "a name not a string": _item("names", 1, 5),
    "an empty name": _item("names", 1, ""),
    "a name twice": _item("names", 1, "extract"),
    "dependency out of range": _item("deps", 0, 7),
    "negative dependency": _item("deps", 0, -1),
    "dependency a float": _item("deps", 0, 0.0),
    "dependency a bool": _item("deps", 0, False),
    "dependency a string": _item("deps", 0, "extract"),
    "dependency counts too short": lambda doc: doc["ndeps"].pop(),
    "dependency counts not adding up": _item("ndeps", 0, 1),
    "negative dependency count": _item("ndeps", 1, -1),
    "a cycle": lambda doc: doc.update(deps=[1, 0] + doc["deps"][2:]),
    "a self loop": _item("deps", 0, 1),
    "profile index out of range": _item("profile", 2, 99),
    "profile column too short": lambda doc: doc["profile"].pop(),
    "profile column not a list": _set("profile", {"0": 1}),
    "profile row too short": _item("profiles", 0, ["dist_tasks:identity", "io"]),
    "profile row a dict": _item("profiles", 0, {"ref": "dist_tasks:identity"}),
    "reference not module:function": lambda doc: doc["profiles"][0].__setitem__(0, "not a reference"),
    "reference not a string": lambda doc: doc["profiles"][0].__setitem__(0, ["m:f"]),
    "queue empty": lambda doc: doc["profiles"][0].__setitem__(1, ""),
    "timeout a string": lambda doc: doc["profiles"][0].__setitem__(2, "30"),
    "timeout zero": lambda doc: doc["profiles"][0].__setitem__(2, 0),
    "max_retries negative": lambda doc: doc["profiles"][0].__setitem__(3, -1),
    "max_retries a float": lambda doc: doc["profiles"][0].__setitem__(3, 1.5),
    "retry_delay a bool": lambda doc: doc["profiles"][0].__setitem__(4, True),
    "payload index out of range": _item("payload", 0, 99),
    "payload not a string": _item("payloads", 0, [[], {}]),
    "payload not [args, kwargs]": _item("payloads", 0, '{"a": 1}'),
    "payload kwargs not a dict": _item("payloads", 0, "[[1], [2]]"),
    "payload not decodable": _item("payloads", 0, "[[1], {"),
    "no payloads but tasks": lambda doc: (doc.pop("payload"), doc.__setitem__("payloads", [])),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_spec_is_a_corrupt_run(damage: str) -> None:
    doc = _valid()
    DAMAGE[damage](doc)
    conn, run_id = _stored_run(json.dumps(doc))
    with pytest.raises(CorruptRunError) as info:
        load_tasks(conn, run_id)
    assert info.value.run_id == run_id and "task spec is unreadable" in str(info.value)
    with pytest.raises(CorruptRunError):  # what a resuming coordinator calls
        restore_coordinator(conn, run_id, Lease(conn, run_id, 5.0))


@pytest.mark.parametrize("text", ["", "{", "null", "7", '"spec"', "[[[[[[" * 20_000, '{"format": 2}'])
def test_a_spec_that_is_not_one_is_a_corrupt_run(text: str) -> None:
    conn, run_id = _stored_run(text)
    with pytest.raises(CorruptRunError):
        load_tasks(conn, run_id)


def test_a_run_without_a_spec_is_a_corrupt_run() -> None:
    conn, run_id = _stored_run("x")
    conn.hdel(keys.run(run_id), "spec")
    with pytest.raises(CorruptRunError):
        load_tasks(conn, run_id)


def test_a_spec_of_format_1_is_refused_naming_the_format() -> None:
    old = [{"name": "a", "ref": "m:f", "deps": [], "max_retries": 0, "retry_delay": 0.0, "retry_backoff": 1.0,
            "timeout": None, "queue": "default", "payload": NO_ARGUMENTS}]
    conn, run_id = _stored_run(json.dumps(old))
    with pytest.raises(CorruptRunError) as info:
        load_tasks(conn, run_id)
    assert "format 1" in str(info.value)


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(), st.text(max_size=8)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=3), max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["format", "names", "deps", "ndeps", "profiles", "profile", "payloads", "payload"]),
       position=st.one_of(st.none(), st.integers(0, 6)), value=_json)
def test_any_damage_to_a_spec_loads_or_is_a_corrupt_run(key: str, position: Any, value: Any) -> None:
    doc = _valid()
    if position is None or not isinstance(doc.get(key), list) or position >= len(doc[key]):
        doc[key] = value
    else:
        doc[key][position] = value
    conn, run_id = _stored_run(json.dumps(doc))
    try:
        _, spec, tasks = load_tasks(conn, run_id)
    except CorruptRunError:
        return
    assert list(tasks) == list(spec) and len(spec.graph.order) == len(tasks)


def test_a_damaged_spec_leaves_the_valid_one_untouched() -> None:
    """The damage table works on copies: the valid spec itself loads."""
    doc = _valid()
    before = copy.deepcopy(doc)
    conn, run_id = _stored_run(json.dumps(doc))
    load_tasks(conn, run_id)
    assert doc == before


# ------------------------------------------------------------------------- resuming
@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    return FakeCluster(monkeypatch, queues=("default", "io"))


class CoordinatorDied(Exception):
    pass


def test_a_run_resumes_from_redis_alone_after_its_coordinator_died(cluster: FakeCluster) -> None:
    """Tasks of several queues, retry policies, timeouts and arguments: the resumed coordinator knows them
    from the stored spec only, runs what is left once, and commits every result."""
    wf = Workflow("resume")
    wf.add_task(Task("a", dist_tasks.add, args=(1, 2)))
    wf.add_task(Task("b", dist_tasks.fail_until, ["a"], max_retries=2, args=(2,), queue="io"))
    wf.add_task(Task("c", dist_tasks.identity, ["a", "b", "a"], kwargs={"value": (1, "x")}, timeout=30))
    wf.add_task(Task("d", "dist_tasks:square", ["c"], args=(4,), queue="io", retry_delay=0.01, retry_backoff=3))

    def die_once_a_succeeded(backend: RQBackend) -> None:
        if wf.tasks["a"].state is TaskState.SUCCESS:
            raise CoordinatorDied()

    cluster.hooks.append(die_once_a_succeeded)
    with pytest.raises(CoordinatorDied):
        cluster.run(wf)
    run_id = wf.last_run_id
    assert wf.tasks["b"].state is TaskState.QUEUED and cluster.queue_length("io") == 1
    cluster.hooks.clear()
    cluster.conn.delete(keys.lease(run_id))  # as when the dead coordinator's lease lapses

    state, tasks = distributed.resume_run(cluster.conn, run_id)

    assert state is RunState.SUCCESS
    assert {name: task.result for name, task in tasks.items()} == {"a": 3, "b": 2, "c": (1, "x"), "d": 16}
    assert {name: task.attempts for name, task in tasks.items()} == {"a": 1, "b": 2, "c": 1, "d": 1}
    assert (tasks["c"].dependencies, tasks["c"].timeout, tasks["d"].queue, tasks["d"].retry_backoff) == (
        ["a", "b", "a"], 30.0, "io", 3.0)
    records = task_records(cluster.conn, run_id)
    assert {name: (r["state"], r["attempt"]) for name, r in records.items()} == {
        "a": ("success", 1), "b": ("success", 2), "c": ("success", 1), "d": ("success", 1)}
    assert read_run(cluster.conn, run_id).state == "success"
    assert cluster.queue_length("io") == cluster.queue_length() == 0
