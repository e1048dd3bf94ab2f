"""Workflow definition errors and DAG ordering."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import dag
from orchestrator.task import Task
from orchestrator.workflow import Workflow
from shared.errors import (
    CycleError,
    DefinitionError,
    DuplicateTaskError,
    InvalidTaskError,
    MissingDependencyError,
    UnknownTaskError,
    WorkflowError,
)


def noop():
    return None


def wf(*tasks: tuple[str, list[str]]) -> Workflow:
    w = Workflow("test")
    for name, deps in tasks:
        w.add_task(Task(name, noop, dependencies=deps))
    return w


# ------------------------------------------------------------------------ cycles


def test_cycle_error_names_the_cycle():
    w = wf(("a", ["b"]), ("b", ["c"]), ("c", ["a"]))
    with pytest.raises(CycleError) as info:
        w.validate()
    assert info.value.cycle == ["a", "b", "c", "a"]
    assert "a -> b -> c -> a" in str(info.value)
    assert str(info.value).startswith("dependency cycle: a -> b -> c -> a")
    with pytest.raises(CycleError):
        w.execution_order()


def test_self_loop_is_a_cycle():
    w = wf(("ok", []), ("a", ["ok", "a"]))
    with pytest.raises(CycleError) as info:
        w.validate()
    assert info.value.cycle == ["a", "a"]
    assert "a -> a" in str(info.value)


def test_cycle_message_leaves_out_tasks_that_only_hang_off_the_cycle():
    # z depends on the cycle x <-> y, and x depends on the root r: neither z nor r is in the cycle
    w = wf(("z", ["x"]), ("r", []), ("x", ["r", "y"]), ("y", ["x"]))
    with pytest.raises(CycleError) as info:
        w.validate()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"x", "y"} and len(cycle) == 3
    assert "z" not in str(info.value) and "'r'" not in str(info.value)


def test_run_refuses_a_cyclic_workflow_before_running_anything(tmp_path):
    marker = tmp_path / "ran"
    w = Workflow()
    w.add_task(Task("root", lambda: marker.write_text("x")))
    w.add_task(Task("a", noop, dependencies=["b"]))
    w.add_task(Task("b", noop, dependencies=["a"]))
    with pytest.raises(CycleError):
        w.run(max_workers=1)
    assert not marker.exists()


@st.composite
def graphs_with_a_cycle(draw):
    n = draw(st.integers(1, 15))
    names = [f"n{i}" for i in range(n)]
    deps = {name: set() for name in names}
    for i in range(n):
        for j in draw(st.lists(st.integers(0, n - 1), max_size=3)):
            deps[names[i]].add(names[j])
    # force a cycle through a random non-empty sequence of nodes
    ring = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n, unique=True))
    for a, b in zip(ring, ring[1:] + ring[:1]):
        deps[a].add(b)
    return {name: sorted(d) for name, d in deps.items()}


@settings(max_examples=200, deadline=None)
@given(graphs_with_a_cycle())
def test_cycle_error_always_names_a_real_cycle(deps):
    w = wf(*deps.items())
    with pytest.raises(CycleError) as info:
        w.validate()
    cycle = info.value.cycle
    assert len(cycle) >= 2 and cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "a task repeats inside the cycle"
    for a, b in zip(cycle, cycle[1:]):
        assert b in deps[a], f"{a} does not depend on {b}"
    assert " -> ".join(cycle) in str(info.value)


# ------------------------------------------------------------ missing / duplicate


def test_missing_dependency_names_task_and_missing_name():
    w = wf(("a", []), ("b", ["a", "ghost"]))
    with pytest.raises(MissingDependencyError) as info:
        w.validate()
    err = info.value
    assert (err.task, err.missing) == ("b", "ghost")
    assert "'b'" in str(err) and "'ghost'" in str(err)
    with pytest.raises(MissingDependencyError):
        w.execution_order()
    with pytest.raises(MissingDependencyError):
        w.run(max_workers=1)


def test_missing_dependency_is_reported_before_a_cycle():
    w = wf(("a", ["b"]), ("b", ["a", "nope"]))
    with pytest.raises(MissingDependencyError) as info:
        w.validate()
    assert info.value.missing == "nope"


def test_duplicate_task_name():
    w = Workflow()
    first = w.add_task(Task("a", noop))
    with pytest.raises(DuplicateTaskError) as info:
        w.add_task(Task("a", lambda: 1))
    assert info.value.task == "a"
    assert "'a'" in str(info.value)
    assert w.get_task("a") is first and len(w) == 1


def test_add_task_takes_only_tasks():
    with pytest.raises(WorkflowError):
        Workflow().add_task("a")  # type: ignore[arg-type]


def test_unknown_task_lookup():
    w = wf(("a", []))
    with pytest.raises(UnknownTaskError) as info:
        w.get_task("b")
    assert "'b'" in str(info.value)
    with pytest.raises(UnknownTaskError):
        w.get_task_result("b")
    assert "a" in w and "b" not in w


def test_every_error_is_a_workflow_error():
    errors = [
        CycleError(["a", "a"]),
        MissingDependencyError("a", "b"),
        DuplicateTaskError("a"),
        InvalidTaskError("a", "why"),
        UnknownTaskError("a"),
    ]
    for err in errors:
        assert isinstance(err, WorkflowError), type(err)
    for cls in (CycleError, MissingDependencyError, DuplicateTaskError, InvalidTaskError):
        assert issubclass(cls, DefinitionError) and issubclass(cls, ValueError)
    import orchestrator
    import workflow

    for name in ("CycleError", "MissingDependencyError", "DuplicateTaskError", "UnknownTaskError"):
        assert issubclass(getattr(orchestrator, name), orchestrator.WorkflowError)
        assert getattr(workflow, name) is getattr(orchestrator, name)


# ------------------------------------------------------------------------- order


def test_execution_order_is_topological_and_stable():
    w = wf(("d", ["b", "c"]), ("c", ["a"]), ("b", ["a"]), ("a", []), ("e", []))
    order = w.execution_order()
    assert order == ["a", "e", "c", "b", "d"]
    assert w.execution_order() == order  # same answer every time


def test_execution_order_without_dependencies_is_insertion_order():
    names = ["zeta", "alpha", "mu", "beta"]
    w = wf(*[(n, []) for n in names])
    assert w.execution_order() == names


def test_execution_order_of_tasks_added_after_their_dependencies_is_the_same_walk():
    """Added in dependency order, the graph is known acyclic without the walk; the order it gives
    when asked is still Kahn's (roots first, in insertion order), not the insertion order."""
    w = wf(("a", []), ("b", ["a", "a"]), ("c", []), ("d", ["b", "c"]), ("e", ["a"]))
    graph = w.validate()
    assert graph.order == w.execution_order() == ["a", "c", "b", "e", "d"]
    assert list(graph.indegree) == [0, 2, 0, 2, 1]  # a repeated dependency counts as often as it is named
    assert list(graph.dependents_of(0)) == [1, 1, 4]


def test_execution_order_of_a_chain_added_backwards():
    w = wf(("c", ["b"]), ("b", ["a"]), ("a", []))
    assert w.execution_order() == ["a", "b", "c"]


@st.composite
def acyclic(draw):
    n = draw(st.integers(0, 30))
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=n, max_size=n, unique=True))
    deps = {}
    for i, name in enumerate(names):
        picks = draw(st.lists(st.integers(0, i - 1), max_size=4)) if i else []
        deps[name] = [names[j] for j in picks]
    # add in a shuffled order so that insertion order is not already topological
    order = draw(st.permutations(names))
    return [(name, deps[name]) for name in order]


@settings(max_examples=200, deadline=None)
@given(acyclic())
def test_execution_order_property(tasks):
    w = wf(*tasks)
    order = w.execution_order()
    assert sorted(order) == sorted(name for name, _ in tasks)
    position = {name: i for i, name in enumerate(order)}
    for name, deps in tasks:
        for dep in deps:
            assert position[dep] < position[name]
    assert w.execution_order() == order
    # stable: the roots come first, in the order they were added
    roots = [name for name, deps in tasks if not deps]
    assert order[: len(roots)] == roots
    dag.validate(w.tasks)


# --------------------------------------------------------------------- bad tasks


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name=""), "name"),
        (dict(name="   "), "name"),
        (dict(name=None), "name"),
        (dict(name=7), "name"),
        (dict(max_retries=-1), "max_retries"),
        (dict(max_retries=1.5), "max_retries"),
        (dict(max_retries=True), "max_retries"),
        (dict(timeout=0), "timeout"),
        (dict(timeout=-1), "timeout"),
        (dict(timeout=math.inf), "timeout"),
        (dict(timeout=math.nan), "timeout"),
        (dict(retry_delay=-0.5), "retry_delay"),
        (dict(retry_delay=math.nan), "retry_delay"),
        (dict(retry_delay="1"), "retry_delay"),
        (dict(retry_backoff=-2), "retry_backoff"),
        (dict(func="not a reference"), "func"),
        (dict(func="module.function"), "func"),
        (dict(func="module:"), "func"),
        (dict(func=":function"), "func"),
        (dict(func="1mod:f"), "func"),
        (dict(func=""), "func"),
        (dict(func=42), "func"),
        (dict(func=None), "func"),
        (dict(dependencies=[1]), "dependencies"),
        (dict(queue=""), "queue"),
    ],
)
def test_invalid_task_arguments(kwargs, words):
    args = dict(name="t", func=noop)
    args.update(kwargs)
    with pytest.raises(InvalidTaskError) as info:
        Task(**args)
    err = info.value
    assert isinstance(err, WorkflowError) and isinstance(err, ValueError)
    assert words in str(err)
    if isinstance(args["name"], str) and args["name"].strip():
        assert err.task == "t" and "'t'" in str(err)


def test_valid_task_arguments():
    t = Task("t", "os.path:join", dependencies="a", max_retries=2, retry_delay=1, timeout=5,
             args=[1], kwargs={"k": 2}, retry_backoff=2)
    assert t.dependencies == ["a"]  # one name, not its letters
    assert (t.max_retries, t.retry_delay, t.timeout, t.retry_backoff) == (2, 1.0, 5.0, 2.0)
    assert t.args == (1,) and t.kwargs == {"k": 2}
    assert t.state.value == "pending" and t.attempts == 0 and t.result is None and t.error is None
    assert t.duration is None
    import os.path

    assert t.resolve() is os.path.join
    assert Task("u", noop, timeout=None).timeout is None


def test_kwargs_are_the_tasks_own_dict_made_when_first_read():
    given = {"k": 2}
    t = Task("t", noop, kwargs=given)
    given["k"] = 3
    assert t.kwargs == {"k": 2} and t.call_kwargs == {"k": 2}  # a copy, as before
    bare = Task("u", noop)
    assert bare.call_kwargs == {} and not isinstance(bare.call_kwargs, dict)  # read only, and no dict made
    bare.kwargs["x"] = 1  # the classic API: changes to task.kwargs are kept
    assert bare.kwargs == {"x": 1} and bare.call_kwargs == {"x": 1}
    bare.kwargs = {"y": 2}
    assert bare.call_kwargs == {"y": 2}


def test_add_task_points_dependencies_at_the_tasks_own_names():
    wf = Workflow("w")
    first = wf.add_task(Task("extract", noop))
    later = wf.add_task(Task("load", noop, ["".join(["ext", "ract"]), "missing"]))  # a name made anew, as f"..." does
    assert later.dependencies == ["extract", "missing"]
    assert later.dependencies[0] is first.name
    with pytest.raises(MissingDependencyError):
        wf.validate()


def test_a_large_workflows_tasks_cost_under_500_bytes_each():
    """The 100,000-task benchmark's coordinator must stay under 120 MB: no dict per task for absent
    kwargs, and no second copy of each dependency's name (bench/README.md, "Coordinator memory")."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        wf = Workflow("big")
        for layer in range(100):
            for i in range(100):
                deps = [f"t{layer - 1}_{(i + k) % 100}" for k in range(3)] if layer else []
                wf.add_task(Task(f"t{layer}_{i}", noop, deps, queue="bench"))
        per_task = (tracemalloc.get_traced_memory()[0] - before) / len(wf)
    finally:
        tracemalloc.stop()
    assert per_task < 500, f"{per_task:.0f} bytes per task"
