"""Run one attempt of a task in this process and describe what happened.

This is the part every backend shares: call the function, encode its result
with the codec (an unserializable result is a task failure, not a crash), and
turn an exception into a one-line error plus its traceback. Killing the
attempt on timeout is the caller's job, from outside this process.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

from shared import codec, upstream
from shared.errors import SerializationError, class_refs
from shared.messages import FAILED, SUCCEEDED, Outcome
from shared.states import FailureKind
from worker import task_log

def describe_exception(exc: BaseException) -> str:
    """One line naming the exception type and message: ``"ValueError: bad row 7"``."""
    message = str(exc).strip().splitlines()
    name = type(exc).__qualname__
    return f"{name}: {message[0]}" if message else name


def exception_types(exc: BaseException) -> str:
    """The classes of ``exc`` as an outcome reports them (:func:`shared.errors.class_refs`, comma-separated):
    the coordinator decides from them whether the attempt is retried (``retry_on``, ``Fail``, ``Skip``)."""
    return ",".join(class_refs(type(exc)))


def kill_group(pid: Optional[int]) -> None:
    """SIGKILL the process group that an attempt's process leads (it calls ``os.setpgrp()``),
    so nothing the task started keeps running. A group not made yet, or gone, is no error
    (nor is a process not started yet, whose ``pid`` is None)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def timeout_error(limit: float) -> str:
    """The error of an attempt killed from outside for running past its timeout."""
    return f"TaskTimeout: attempt ran past its timeout of {limit:g}s and was killed"


def death_error(exitcode: Optional[int]) -> str:
    """The error of an attempt whose process died without reporting, from its exit code as
    :mod:`multiprocessing` gives it (negative: killed by that signal; ``os.waitstatus_to_exitcode``
    turns a ``waitpid`` status into one)."""
    if exitcode is None:
        how = "no exit status"
    elif exitcode < 0:
        try:
            how = f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            how = f"signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    return f"WorkerCrash: worker process died: {how}"


def run_attempt(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    run_id: str,
    task: str,
    attempt: int,
    worker: Optional[str] = None,
    max_result_bytes: Optional[int] = None,
    timeout_errors: tuple[type[BaseException], ...] = (),
    upstream_result: Optional[Callable[[str], Any]] = None,
) -> Outcome:
    """Call ``func(*args, **kwargs)`` and return its :class:`Outcome`; never raises an ``Exception``.

    An exception of a type in ``timeout_errors`` is reported as a timeout. The traceback of a
    failure also goes into the attempt's log, when one is being captured (:mod:`worker.task_log`).
    With ``upstream_result``, every :class:`~shared.upstream.Upstream` in the arguments is first
    replaced by ``upstream_result(task)`` (a failure to read it fails the attempt like any exception).
    """
    started = time.time()
    common: dict[str, Any] = dict(run_id=run_id, task=task, attempt=attempt, worker=worker, started_at=started)
    try:
        if upstream_result is not None:
            args, kwargs = upstream.resolve((args, kwargs), upstream_result)
        value = func(*args, **kwargs)
        blob = codec.encode(value, f"result of task {task!r}")
        if max_result_bytes is not None and len(blob) > max_result_bytes:
            raise SerializationError(
                f"result of task {task!r} is {len(blob)} bytes encoded, over the limit of {max_result_bytes}"
            )
    except Exception as exc:
        kind = FailureKind.TIMEOUT if isinstance(exc, timeout_errors) else FailureKind.ERROR
        trace = traceback.format_exc()
        task_log.note(trace)
        return Outcome(status=FAILED, at=time.time(), error=describe_exception(exc), kind=kind,
                       traceback=trace, types=exception_types(exc), **common)
    return Outcome(status=SUCCEEDED, at=time.time(), result=blob, **common)
