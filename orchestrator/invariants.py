"""The scheduler's invariants, checked after every call in the tests (as dask's ``validate_state``).

One place that says what must always hold of a scheduler's state: the counts, every task's
upstream counters, the attempt budget of its current go, and that no task started before its
trigger rule was met, a pending task's rule says wait, and a task that ended without running
(upstream failed, skipped) ran in no attempt of its go.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from orchestrator.trigger_rules import Verdict, verdict
from shared.states import TERMINAL_STATES, TaskState

if TYPE_CHECKING:
    from orchestrator.scheduler import Scheduler

P, Q, R, W, S, F, K = (TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.SUCCESS,
                       TaskState.FAILURE, TaskState.SKIPPED)


def check(s: "Scheduler") -> None:
    """Raise ``AssertionError`` naming the first invariant of ``s`` that does not hold."""
    counts: Counter[TaskState] = Counter(s._state)
    assert +counts == +s._counts, f"counts {s._counts} != actual {counts}"
    unfinished = sum(1 for state_ in s._state if state_ not in TERMINAL_STATES)
    assert unfinished == s._unfinished, f"unfinished {s._unfinished} != actual {unfinished}"
    for i, spec in enumerate(s._specs):
        name, state = s._names[i], s._state[i]
        assert spec.name == name, f"task {i} is {spec.name!r} in the specs, {name!r} in the graph"
        ended = Counter(s._state[s._index[d]] for d in spec.dependencies)  # repeats too
        found = (s._ok[i], s._bad[i], s._skip[i])
        assert found == (ended[S], ended[F], ended[K]), f"{name}: upstream counts {found} != {ended}"
        now = verdict(spec.trigger_rule, s._total[i], *found)
        this_go = s._attempt[i] - s._base[i]
        assert 0 <= this_go <= spec.max_retries + 1, f"{name}: {this_go} attempts since its latest rerun"
        if state is P:
            assert this_go == 0, f"{name} pending after an attempt since its latest rerun"
            assert now is Verdict.WAIT or not s._started, f"{name} pending although its rule says {now}"
        elif state in (Q, R, W, S) or (state in (F, K) and this_go):
            assert now is Verdict.RUN, f"{name} is {state} (it ran) but its trigger rule says {now}"
        elif state is F:
            assert now is Verdict.FAIL, f"{name} failed upstream but its trigger rule says {now}"
        elif state is K:
            assert now in (Verdict.SKIP, Verdict.FAIL), f"{name} skipped but its trigger rule says {now}"


