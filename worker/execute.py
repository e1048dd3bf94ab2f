"""Run one attempt of a task in this process and describe what happened.

This is the part every backend shares: call the function, encode its result
with the codec (an unserializable result is a task failure, not a crash), and
turn an exception into a one-line error plus its traceback. Killing the
attempt on timeout is the caller's job, from outside this process.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from shared import codec, upstream
from shared.errors import SerializationError, class_refs
from shared.messages import FAILED, SUCCEEDED, Outcome
from shared.states import FailureKind

LOG_TAIL_CHARS = 64 * 1024
"""How much of an attempt's captured output is kept (the end of it)."""


def describe_exception(exc: BaseException) -> str:
    """One line naming the exception type and message: ``"ValueError: bad row 7"``."""
    message = str(exc).strip().splitlines()
    name = type(exc).__qualname__
    return f"{name}: {message[0]}" if message else name


def exception_types(exc: BaseException) -> str:
    """The classes of ``exc`` as an outcome reports them (:func:`shared.errors.class_refs`, comma-separated):
    the coordinator decides from them whether the attempt is retried (``retry_on``, ``Fail``, ``Skip``)."""
    return ",".join(class_refs(type(exc)))


def kill_group(pid: int) -> None:
    """SIGKILL the process group that an attempt's process leads (it calls ``os.setpgrp()``),
    so nothing the task started keeps running. A group not made yet, or gone, is no error."""
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


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy, so output is both seen and stored."""

    def __init__(self, stream: Any, copy: io.StringIO) -> None:
        self._stream = stream
        self._copy = copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        if self._stream is not None:
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()


@contextlib.contextmanager
def _captured_output(enabled: bool) -> Iterator[Optional[io.StringIO]]:
    if not enabled:
        yield None
        return
    copy = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, copy)), contextlib.redirect_stderr(_Tee(sys.stderr, copy)):
        yield copy


def run_attempt(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    run_id: str,
    task: str,
    attempt: int,
    worker: Optional[str] = None,
    capture_output: bool = False,
    max_result_bytes: Optional[int] = None,
    timeout_errors: tuple[type[BaseException], ...] = (),
    upstream_result: Optional[Callable[[str], Any]] = None,
) -> Outcome:
    """Call ``func(*args, **kwargs)`` and return its :class:`Outcome`; never raises an ``Exception``.

    An exception of a type in ``timeout_errors`` is reported as a timeout. With ``upstream_result``,
    every :class:`~shared.upstream.Upstream` in the arguments is first replaced by
    ``upstream_result(task)`` (a failure to read it fails the attempt like any exception).
    """
    started = time.time()
    common = dict(run_id=run_id, task=task, attempt=attempt, worker=worker, started_at=started)
    with _captured_output(capture_output) as output:
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
            log = output.getvalue()[-LOG_TAIL_CHARS:] if output else None
            kind = FailureKind.TIMEOUT if isinstance(exc, timeout_errors) else FailureKind.ERROR
            return Outcome(status=FAILED, at=time.time(), error=describe_exception(exc), kind=kind,
                           traceback=traceback.format_exc(), log=log or None, types=exception_types(exc), **common)
    log = output.getvalue()[-LOG_TAIL_CHARS:] if output else None
    return Outcome(status=SUCCEEDED, at=time.time(), result=blob, log=log or None, **common)
