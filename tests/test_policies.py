"""Trigger rules, Skip, Fail and retry policies in the pure scheduler (events in, actions out).

The same Harness as tests/test_scheduler.py: ``validate_state()`` runs after every call, so the
rule invariants (no task starts before its rule is met, a pending task's rule says wait, a task
that failed upstream or was skipped by its rule never ran) are checked at every step.
"""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.actions import Dispatch, RunFinished, ScheduleRetry
from orchestrator.retry_policy import retry_delay
from orchestrator.scheduler import Scheduler
from orchestrator.trigger_rules import TriggerRule as R
from shared.errors import Fail, Skip, TaskTimeout, class_refs
from shared.events import RetryDue, TaskFailed, TaskSucceeded
from shared.states import TERMINAL_STATES, FailureKind, RunState, TaskState
from test_scheduler import Harness, Spec, dags

P, Q, S, F, K, W = (TaskState.PENDING, TaskState.QUEUED, TaskState.SUCCESS, TaskState.FAILURE,
                    TaskState.SKIPPED, TaskState.RETRYING)


def raised(h: Harness, name: str, exc: type, message: str = "boom", at: float = 1.0) -> list:
    error = f"{exc.__qualname__}: {message}"
    return h.handle(TaskFailed(name, h.s.attempts(name), at, error, FailureKind.ERROR, types=class_refs(exc)))


def dispatched(out: list) -> list[str]:
    return [a.task for a in out if isinstance(a, Dispatch)]


# ----------------------------------------------------------------- trigger rules
def test_a_cleanup_task_runs_after_a_failure_and_the_run_still_fails() -> None:
    h = Harness([Spec("work"), Spec("other"), Spec("cleanup", ("work", "other"), trigger_rule=R.ALL_DONE),
                 Spec("report", ("work",))])
    h.start()
    h.fail("work")
    assert h.s.state("report") is F and h.s.error("report") == "upstream task 'work' failed"
    assert h.s.state("cleanup") is P
    assert dispatched(h.ok("other")) == ["cleanup"]
    h.ok("cleanup")
    assert h.s.finished and h.s.run_state is RunState.FAILURE


def test_one_failed_starts_at_the_first_failure_and_is_skipped_when_none_fails() -> None:
    h = Harness([Spec("a"), Spec("b"), Spec("alert", ("a", "b"), trigger_rule=R.ONE_FAILED)])
    h.start()
    assert dispatched(h.fail("a")) == ["alert"]  # b still running
    h = Harness([Spec("a"), Spec("b"), Spec("alert", ("a", "b"), trigger_rule=R.ONE_FAILED)])
    h.start()
    h.ok("a")
    h.ok("b")
    assert h.s.state("alert") is K and h.s.error("alert") == "skipped: trigger rule one_failed cannot be met"
    assert h.s.run_state is RunState.SUCCESS


def test_one_success_starts_at_the_first_success_and_fails_when_all_failed() -> None:
    h = Harness([Spec("a"), Spec("b"), Spec("any", ("a", "b"), trigger_rule=R.ONE_SUCCESS)])
    h.start()
    assert dispatched(h.ok("b")) == ["any"]
    h = Harness([Spec("a"), Spec("b"), Spec("any", ("a", "b"), trigger_rule=R.ONE_SUCCESS)])
    h.start()
    h.fail("a")
    assert h.s.state("any") is P
    h.fail("b")
    assert h.s.state("any") is F and h.s.error("any") == "upstream task 'a' failed"


def test_none_failed_runs_past_a_skip_and_fails_past_a_failure() -> None:
    specs = [Spec("a"), Spec("b"), Spec("n", ("a", "b"), trigger_rule=R.NONE_FAILED),
             Spec("m", ("a", "b"), trigger_rule=R.NONE_FAILED_MIN_ONE_SUCCESS)]
    h = Harness(specs)
    h.start()
    raised(h, "a", Skip, "nothing new")
    assert h.s.state("a") is K and h.s.error("a") == "skipped: nothing new"
    assert sorted(dispatched(h.ok("b"))) == ["m", "n"]
    h = Harness(specs)
    h.start()
    raised(h, "a", Skip)
    raised(h, "b", Skip)
    assert h.s.state("n") is Q and h.s.state("m") is K
    h = Harness(specs)
    h.start()
    h.fail("a")
    assert h.s.state("n") is F and h.s.state("m") is F


def test_all_failed_runs_only_when_every_upstream_failed() -> None:
    h = Harness([Spec("a"), Spec("b"), Spec("x", ("a", "b"), trigger_rule=R.ALL_FAILED)])
    h.start()
    h.fail("a")
    assert dispatched(h.fail("b")) == ["x"]
    h = Harness([Spec("a"), Spec("b"), Spec("x", ("a", "b"), trigger_rule=R.ALL_FAILED)])
    h.start()
    h.ok("a")
    assert h.s.state("x") is K


def test_always_starts_with_the_run() -> None:
    h = Harness([Spec("a"), Spec("beacon", ("a",), trigger_rule=R.ALWAYS)])
    assert sorted(dispatched(h.start())) == ["a", "beacon"]


def test_a_skip_skips_all_success_dependents_and_the_run_succeeds() -> None:
    h = Harness([Spec("check", max_retries=3), Spec("load", ("check",)), Spec("after", ("load",)),
                 Spec("done", ("after",), trigger_rule=R.ALL_DONE)])
    h.start()
    out = raised(h, "check", Skip, "no new files")
    assert not [a for a in out if isinstance(a, ScheduleRetry)]  # a skip is not retried
    assert h.states() == {"check": K, "load": K, "after": K, "done": Q}
    assert h.s.error("load") == "skipped: an upstream task was skipped"
    h.ok("done")
    assert h.s.run_state is RunState.SUCCESS


def test_a_failure_at_the_head_of_a_long_chain_settles_it_without_recursion() -> None:
    n = 20_000
    s = Scheduler([Spec(f"t{i}", (f"t{i - 1}",) if i else ()) for i in range(n)]
                  + [Spec("cleanup", (f"t{n - 1}",), trigger_rule=R.ALL_DONE)])
    s.start(0.0)
    out = s.handle(TaskFailed("t0", 1, 1.0, "ValueError: x"))
    assert s.state(f"t{n - 1}") is F and s.error(f"t{n - 1}") == "upstream task 't0' failed"
    assert [a.task for a in out if isinstance(a, Dispatch)] == ["cleanup"]


def test_restore_applies_the_rules_a_crash_left_undecided() -> None:
    specs = [Spec("a"), Spec("b", ("a",)), Spec("cleanup", ("a",), trigger_rule=R.ALL_DONE),
             Spec("alert", ("a",), trigger_rule=R.ONE_FAILED)]
    s, actions = Scheduler.restore(specs, {"a": (F, 1, "ValueError: x")}, 5.0)
    s.validate_state()
    assert {a.task for a in actions if isinstance(a, Dispatch)} == {"cleanup", "alert"}
    assert s.state("b") is F


def test_a_rerun_reconsiders_skipped_tasks_downstream() -> None:
    h = Harness([Spec("a"), Spec("b", ("a",)), Spec("c", ("b",))])
    h.start()
    raised(h, "a", Skip)
    assert h.s.finished and h.states() == {"a": K, "b": K, "c": K}
    h.s.rerun(["a"], 2.0)
    h.s.validate_state()
    assert h.states() == {"a": Q, "b": P, "c": P}
    h.ok("a")
    h.ok("b")
    h.ok("c")
    assert h.s.run_state is RunState.SUCCESS


# ----------------------------------------------------------------- retry policies
def test_fail_fails_for_good_whatever_retries_are_left() -> None:
    h = Harness([Spec("t", max_retries=5)])
    h.start()
    raised(h, "t", Fail, "bad input")
    assert h.s.state("t") is F
    assert h.s.error("t") == "Fail: bad input (not retried: the task raised Fail)"


def test_retry_on_retries_matching_errors_and_subclasses_only() -> None:
    refs = class_refs(LookupError)[:1]
    h = Harness([Spec("t", max_retries=3, retry_on_refs=refs)])
    h.start()
    raised(h, "t", KeyError)  # a LookupError
    assert h.s.state("t") is W
    h.handle(RetryDue("t", 2, 2.0))
    raised(h, "t", ValueError, "bad row 7")
    assert h.s.state("t") is F
    assert h.s.error("t") == "ValueError: bad row 7 (not retried: ValueError is not in retry_on)"


def test_timeouts_and_crashes_are_retried_unless_retry_on_leaves_them_out() -> None:
    h = Harness([Spec("t", max_retries=1)])
    h.start()
    h.fail("t", kind=FailureKind.TIMEOUT, error="TaskTimeout: ran past 1s")
    assert h.s.state("t") is W
    h = Harness([Spec("t", max_retries=1, retry_on_refs=class_refs(ValueError)[:1])])
    h.start()
    h.fail("t", kind=FailureKind.CRASHED, error="WorkerCrash: signal 9")
    assert h.s.error("t") == "WorkerCrash: signal 9 (not retried: WorkerCrash is not in retry_on)"
    h = Harness([Spec("t", max_retries=1, retry_on_refs=class_refs(TaskTimeout)[:1])])
    h.start()
    h.fail("t", kind=FailureKind.TIMEOUT, error="TaskTimeout: ran past 1s")
    assert h.s.state("t") is W


def test_jitter_stays_within_its_bounds_and_the_cap_applies_first() -> None:
    spec = Spec("t", retry_delay=10.0, retry_backoff=2.0, retry_jitter=0.5, max_retry_delay=25.0)
    assert retry_delay(spec, 1, lambda: 0.0) == 10.0
    assert retry_delay(spec, 1, lambda: 0.999) == 10.0 * (1 + 0.5 * 0.999)
    assert retry_delay(spec, 3, lambda: 0.0) == 25.0  # 40 capped
    assert retry_delay(spec, 3, lambda: 1.0) == 37.5
    rng = random.Random(4)
    delays = [retry_delay(spec, 2, rng.random) for _ in range(500)]
    assert min(delays) >= 20.0 and max(delays) <= 30.0 and max(delays) - min(delays) > 5
    draws = iter([0.25])
    h_spec = Spec("t", max_retries=1, retry_delay=4.0, retry_jitter=1.0)
    s = Scheduler([h_spec], random=lambda: next(draws))
    s.start(0.0)
    out = s.handle(TaskFailed("t", 1, 10.0, "ValueError: x"))
    assert [a.at for a in out if isinstance(a, ScheduleRetry)] == [10.0 + 4.0 * 1.25]


# ----------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=dags(max_nodes=25, rules=True), seed=st.integers(0, 2**32 - 1))
def test_random_rules_and_outcomes_keep_the_invariants(specs, seed) -> None:
    """Workers succeed, fail, skip, or raise Fail at random; every step keeps the scheduler's
    invariants (Harness), every task ends final, and no task dispatched more than its budget."""
    rng = random.Random(seed)
    h = Harness(specs)
    dispatches: dict[str, int] = {}
    queue = [a for a in h.start() if isinstance(a, Dispatch)]
    timers: list[ScheduleRetry] = []
    now = 0.0
    while queue or timers:
        now += 1.0
        if timers and (not queue or rng.random() < 0.3):
            timer = timers.pop(rng.randrange(len(timers)))
            out = h.handle(RetryDue(timer.task, timer.attempt, now))
        else:
            job = queue.pop(rng.randrange(len(queue)))
            dispatches[job.task] = dispatches.get(job.task, 0) + 1
            roll = rng.random()
            if roll < 0.5:
                out = h.handle(TaskSucceeded(job.task, job.attempt, now))
            elif roll < 0.6:
                out = h.handle(TaskFailed(job.task, job.attempt, now, "Skip: x", types=class_refs(Skip)))
            elif roll < 0.65:
                out = h.handle(TaskFailed(job.task, job.attempt, now, "Fail: x", types=class_refs(Fail)))
            else:
                out = h.handle(TaskFailed(job.task, job.attempt, now, "ValueError: x", types=class_refs(ValueError)))
        queue += [a for a in out if isinstance(a, Dispatch)]
        timers += [a for a in out if isinstance(a, ScheduleRetry)]
    assert h.s.finished and all(state in TERMINAL_STATES for state in h.states().values())
    assert len([a for a in h.actions if isinstance(a, RunFinished)]) == 1
    for spec in specs:
        assert dispatches.get(spec.name, 0) <= spec.max_retries + 1
        state = h.s.state(spec.name)
        if state in (K, F) and not dispatches.get(spec.name):
            assert h.s.error(spec.name).startswith(("skipped: ", "upstream task "))
    failed = any(state is F for state in h.states().values())
    assert h.s.run_state is (RunState.FAILURE if failed else RunState.SUCCESS)
