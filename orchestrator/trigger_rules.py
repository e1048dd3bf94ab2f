"""Trigger rules: when a task may start, given how its upstream tasks ended.

Names and meanings are Airflow's, so users know them. :func:`verdict` is the whole
logic, a pure function of the rule and the counts of upstream edges by outcome; the
scheduler calls it each time an upstream of a pending task finishes.

A rule that can no longer be met ends its task ``skipped``, except where the rule
waited for successes and an upstream *failed*: then the task fails with ``upstream
task 'X' failed``, as under the default rule (``all_success``, ``one_success``,
``none_failed``, ``none_failed_min_one_success``). The rules made to react to
failures (``all_failed``, ``one_failed``) are skipped when the failures they wait for
do not come. ``all_done`` and ``always`` are always met (``always`` at once, before
any upstream finished, as in Airflow).
"""
from __future__ import annotations

import enum


class TriggerRule(str, enum.Enum):
    ALL_SUCCESS = "all_success"
    ALL_DONE = "all_done"
    ALL_FAILED = "all_failed"
    ONE_FAILED = "one_failed"
    ONE_SUCCESS = "one_success"
    NONE_FAILED = "none_failed"
    NONE_FAILED_MIN_ONE_SUCCESS = "none_failed_min_one_success"
    ALWAYS = "always"


class Verdict(enum.Enum):
    WAIT = "wait"
    RUN = "run"
    SKIP = "skip"
    FAIL = "fail"
    """An upstream failed and the rule needed it not to: the task fails as 'upstream task X failed'."""


def rule_of(value: object) -> TriggerRule:
    """``value`` as a :class:`TriggerRule`; ``ValueError`` naming the known rules otherwise."""
    try:
        return TriggerRule(value)
    except ValueError:
        known = ", ".join(rule.value for rule in TriggerRule)
        raise ValueError(f"unknown trigger_rule {value!r} (known: {known})") from None


def verdict(rule: TriggerRule, total: int, succeeded: int, failed: int, skipped: int) -> Verdict:
    """What a pending task with ``total`` upstream edges should do now that ``succeeded``, ``failed``
    and ``skipped`` of them ended so (the rest are not finished). A task without upstreams runs."""
    done = succeeded + failed + skipped
    if rule is TriggerRule.ALL_SUCCESS:
        if failed:
            return Verdict.FAIL
        if skipped:
            return Verdict.SKIP
        return Verdict.RUN if succeeded == total else Verdict.WAIT
    if rule is TriggerRule.ALWAYS:
        return Verdict.RUN
    if rule is TriggerRule.ALL_DONE:
        return Verdict.RUN if done == total else Verdict.WAIT
    if rule is TriggerRule.ALL_FAILED:
        if succeeded or skipped:
            return Verdict.SKIP
        return Verdict.RUN if failed == total else Verdict.WAIT
    if rule is TriggerRule.ONE_FAILED:
        if failed or total == 0:
            return Verdict.RUN
        return Verdict.SKIP if done == total else Verdict.WAIT
    if rule is TriggerRule.ONE_SUCCESS:
        if succeeded or total == 0:
            return Verdict.RUN
        if done < total:
            return Verdict.WAIT
        return Verdict.FAIL if failed else Verdict.SKIP
    if failed:  # NONE_FAILED, NONE_FAILED_MIN_ONE_SUCCESS
        return Verdict.FAIL
    if done < total:
        return Verdict.WAIT
    if rule is TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS and total and not succeeded:
        return Verdict.SKIP
    return Verdict.RUN
