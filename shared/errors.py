"""Every error orch raises, in one small tree under :class:`WorkflowError`.

Each error keeps its details as attributes and words its message so that it
names the thing the user must fix (the task, the dependency, the cycle path).
"""
from __future__ import annotations

from typing import Iterable, Sequence


class WorkflowError(Exception):
    """Base of all orch errors."""


class DefinitionError(WorkflowError, ValueError):
    """The workflow or a task is defined wrongly; nothing has run."""


class InvalidTaskError(DefinitionError):
    """A task's own arguments are wrong (name, retries, timeout, func)."""

    def __init__(self, task: str, reason: str) -> None:
        self.task = task
        self.reason = reason
        super().__init__(f"task {task!r}: {reason}")


class DuplicateTaskError(DefinitionError):
    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"a task named {task!r} is already in the workflow; task names must be unique")


class MissingDependencyError(DefinitionError):
    def __init__(self, task: str, missing: str) -> None:
        self.task = task
        self.missing = missing
        super().__init__(f"task {task!r} depends on {missing!r}, which is not a task of the workflow")


class CycleError(DefinitionError):
    """The dependencies form a cycle; ``cycle`` lists it with the first task repeated last."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = list(cycle)
        super().__init__(
            "dependency cycle: " + " -> ".join(self.cycle) + " (each task depends on the one after it)"
        )


class FlowError(DefinitionError):
    """A ``@flow`` could not be built: a handle used where it cannot be, a parameter the flow lacks."""


class UnknownTaskError(WorkflowError, KeyError):
    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(task)

    def __str__(self) -> str:
        return f"no task named {self.task!r} in the workflow"


class TaskImportError(WorkflowError):
    """A task's function cannot be imported by reference (on a worker, or at submit)."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"cannot import task function {ref!r}: {reason}")


class UnimportableTasksError(DefinitionError):
    """Tasks whose functions no worker could import (lambdas, closures, ``__main__``)."""

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems = list(problems)
        details = "; ".join(f"task {name!r}: {why}" for name, why in self.problems)
        super().__init__(f"{len(self.problems)} task(s) cannot run on workers: {details}")


class SerializationError(WorkflowError, TypeError):
    """A value (a result or an argument) cannot be encoded, or bytes cannot be decoded."""


class InvalidTransition(WorkflowError, RuntimeError):
    """The scheduler was asked for a state change its table does not allow: a bug, loudly."""

    def __init__(self, task: str, start: str, finish: str, story: Sequence[object] = ()) -> None:
        self.task = task
        self.start = start
        self.finish = finish
        self.story = list(story)
        super().__init__(f"impossible transition of task {task!r}: {start} -> {finish}")


class TargetError(WorkflowError):
    """``orch submit TARGET``: the file, module or attribute cannot be loaded as a workflow."""


class BackendError(WorkflowError):
    """The transport (Redis) cannot be used."""


class InvalidRedisUrlError(BackendError, ValueError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"malformed Redis URL {url!r}: {reason}")


class RedisUnavailableError(BackendError, ConnectionError):
    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"cannot reach Redis at {url}: {reason}")


class RedisAccessError(BackendError, PermissionError):
    """Redis answered but refused this client: a wrong password, an unknown user, a missing ACL right."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"Redis at {url} refused this client: {reason} (check the user and password in the "
                         f"URL, and the user's ACL rights: see the README's ACL lines)")


class SettingError(WorkflowError, ValueError):
    """An environment variable that orch reads holds a value it cannot use."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        self.variable, self.value = variable, value
        super().__init__(f"{variable}={value!r} is not {expected}; fix or unset it")


class RunNotFoundError(WorkflowError, LookupError):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run {run_id!r} in this Redis (wrong id, or its retention expired)")


class RunExpiredError(RunNotFoundError):
    """The run was in this Redis, but its retention (``ORCH_RETENTION``) ended and its state is gone."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        WorkflowError.__init__(self, f"run {run_id!r} expired: its retention (ORCH_RETENTION) ended and its "
                                     f"state is gone from this Redis; submit the workflow again")


class RunStillRunningError(WorkflowError):
    """A run that has not finished cannot be rerun from failure."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} is still running; wait for it to finish (orch status {run_id} --wait), "
                         f"or cancel it (orch cancel {run_id}) and retry then")


class NothingToRerunError(WorkflowError):
    """A rerun that would run nothing: every task succeeded and none was named."""

    def __init__(self) -> None:
        super().__init__("every task of the run succeeded: nothing to rerun (name the tasks to run again "
                         "with --task NAME, or tasks=[...] in Python)")


class InvalidParamsError(DefinitionError):
    """Run parameters that are not a mapping of names to values."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid run parameters: {reason}")


class NoSuchAttemptError(WorkflowError):
    """An attempt number that a task has not reached (a log asked for with ``--attempt N``)."""

    def __init__(self, task: str, attempt: int, attempts: int) -> None:
        self.task, self.attempt, self.attempts = task, attempt, attempts
        made = "no attempt yet" if not attempts else f"attempts 1 to {attempts}" if attempts > 1 else "attempt 1 only"
        super().__init__(f"task {task!r} has no attempt {attempt} ({made}); pick one of those")


class CorruptRunError(WorkflowError):
    """A stored run cannot be read back (its spec was damaged or forged)."""

    def __init__(self, run_id: str, reason: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} cannot be resumed: {reason}")


class TaskRefused(WorkflowError):
    """A worker refused a job before importing anything: its function is not allowed there."""

    def __init__(self, ref: str, worker: str, why: str) -> None:
        self.ref, self.worker, self.why = ref, worker, why
        super().__init__(f"{ref!r} is not allowed on worker {worker} ({why})")


# ---------------------------------------------------------------- raised in and around tasks
class Fail(Exception):
    """Raise in a task to fail it for good, whatever retries it has left: ``raise Fail("bad input")``."""


class Skip(Exception):
    """Raise in a task to end it ``skipped`` (``raise Skip("no new files")``); under the default trigger
    rule its dependents are skipped too."""


class TaskTimeout(Exception):
    """An attempt ran past its timeout. Raised inside the task where the worker can (the RQ-compatible
    worker), else the attempt is killed; either way retried unless ``retry_on`` leaves it out."""


class WorkerCrash(Exception):
    """The process running an attempt died (a signal, ``os._exit``) or its worker was lost. Never raised:
    named in ``retry_on`` to retry such attempts (they are retried when ``retry_on`` is not set)."""


def class_refs(cls: type) -> tuple[str, ...]:
    """``cls`` and its bases as ``module:qualname``, most derived first, without ``object`` and
    ``BaseException``: how an attempt reports the exception it raised, and what ``retry_on`` matches."""
    return tuple(f"{c.__module__}:{c.__qualname__}" for c in cls.__mro__ if c not in (object, BaseException))


class MapError(WorkflowError):
    """A mapped task whose input cannot be mapped: not a list, lists of different lengths, too long.
    The mapped task fails for good with it (the input will not change by retrying)."""


class ScheduleError(DefinitionError):
    """A schedule that cannot be: a bad cron expression, interval, time zone or policy."""


class ScheduleNotFoundError(WorkflowError, LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r} (orch schedule list shows them)")


class ScheduleExistsError(WorkflowError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a schedule named {name!r} exists already; remove it first or pick another name")


class SigningKeyError(WorkflowError, ValueError):
    """The signing key setting (``ORCH_SIGNING_KEY`` / ``ORCH_SIGNING_KEY_FILE``) is unusable; the
    message names the setting to fix."""


class LimitExceededError(WorkflowError, ValueError):
    """A submission goes past one of the limits against a hostile or careless submitter
    (``ORCH_MAX_PAYLOAD_BYTES``, ``ORCH_MAX_TASKS``); nothing was written."""


class MetricsServerError(WorkflowError, OSError):
    """The metrics server (``--metrics-port``) cannot listen where it was told (the port taken, the
    address not this host's)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host, self.port = host, port
        super().__init__(f"cannot serve metrics on {host}:{port}: {reason}; pick a free --metrics-port "
                         f"(or a --metrics-host of this machine)")
