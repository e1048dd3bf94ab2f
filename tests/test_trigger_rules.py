"""The trigger rules' decision table (orchestrator/trigger_rules.py), checked case by case and exhaustively."""
from __future__ import annotations

import itertools

import pytest

from orchestrator.trigger_rules import TriggerRule as R, Verdict as V, rule_of, verdict

# (rule, total, succeeded, failed, skipped) -> verdict
CASES = [
    (R.ALL_SUCCESS, 2, 2, 0, 0, V.RUN), (R.ALL_SUCCESS, 2, 1, 0, 0, V.WAIT), (R.ALL_SUCCESS, 2, 0, 1, 0, V.FAIL),
    (R.ALL_SUCCESS, 2, 1, 0, 1, V.SKIP), (R.ALL_SUCCESS, 3, 0, 1, 1, V.FAIL), (R.ALL_SUCCESS, 0, 0, 0, 0, V.RUN),
    (R.ALL_DONE, 2, 1, 0, 0, V.WAIT), (R.ALL_DONE, 3, 1, 1, 1, V.RUN), (R.ALL_DONE, 1, 0, 1, 0, V.RUN),
    (R.ALL_FAILED, 2, 0, 2, 0, V.RUN), (R.ALL_FAILED, 2, 0, 1, 0, V.WAIT), (R.ALL_FAILED, 2, 1, 1, 0, V.SKIP),
    (R.ALL_FAILED, 2, 0, 1, 1, V.SKIP),
    (R.ONE_FAILED, 3, 0, 1, 0, V.RUN), (R.ONE_FAILED, 3, 2, 0, 0, V.WAIT), (R.ONE_FAILED, 3, 2, 0, 1, V.SKIP),
    (R.ONE_SUCCESS, 3, 1, 0, 0, V.RUN), (R.ONE_SUCCESS, 3, 0, 2, 0, V.WAIT), (R.ONE_SUCCESS, 2, 0, 1, 1, V.FAIL),
    (R.ONE_SUCCESS, 2, 0, 0, 2, V.SKIP),
    (R.NONE_FAILED, 2, 1, 0, 1, V.RUN), (R.NONE_FAILED, 2, 0, 0, 2, V.RUN), (R.NONE_FAILED, 2, 1, 0, 0, V.WAIT),
    (R.NONE_FAILED, 2, 0, 1, 0, V.FAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, 2, 1, 0, 1, V.RUN), (R.NONE_FAILED_MIN_ONE_SUCCESS, 2, 0, 0, 2, V.SKIP),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, 2, 1, 1, 0, V.FAIL), (R.NONE_FAILED_MIN_ONE_SUCCESS, 0, 0, 0, 0, V.RUN),
    (R.ALWAYS, 2, 0, 0, 0, V.RUN), (R.ALWAYS, 2, 0, 2, 0, V.RUN),
]


@pytest.mark.parametrize("rule,total,succeeded,failed,skipped,expected", CASES)
def test_each_rule_decides_as_airflow_does(rule, total, succeeded, failed, skipped, expected) -> None:
    assert verdict(rule, total, succeeded, failed, skipped) is expected


@pytest.mark.parametrize("rule", list(R))
def test_every_rule_decides_once_all_upstreams_are_done_and_never_fails_without_a_failure(rule) -> None:
    for total in range(4):
        for succeeded, failed in itertools.product(range(total + 1), repeat=2):
            skipped = total - succeeded - failed
            if skipped < 0:
                continue
            decided = verdict(rule, total, succeeded, failed, skipped)
            assert decided is not V.WAIT, (rule, total, succeeded, failed, skipped)
            if not failed:
                assert decided is not V.FAIL


def test_only_all_success_like_rules_fail_for_an_upstream_failure() -> None:
    reacting = {R.ALL_FAILED, R.ONE_FAILED, R.ALL_DONE, R.ALWAYS}
    for rule in R:
        can_fail = any(verdict(rule, 2, s, f, 2 - s - f) is V.FAIL for s in range(3) for f in range(3 - s))
        assert can_fail is (rule not in reacting), rule


def test_an_unknown_rule_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown trigger_rule 'all_sucess' \(known: all_success, all_done"):
        rule_of("all_sucess")
    assert rule_of("one_failed") is R.ONE_FAILED
