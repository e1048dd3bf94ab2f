"""The outcome of one attempt, as a worker reports it to the coordinator.

On the wire (a Redis stream entry) an outcome is a flat mapping of short
string fields; ``to_fields`` / ``from_fields`` convert, and ``from_fields``
rejects anything malformed with :class:`SerializationError` so that a forged or
truncated entry costs one log line, not a crashed coordinator.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping, Optional

from shared.errors import SerializationError
from shared.events import TaskFailed, TaskSucceeded
from shared.signing import Signer, sign_fields
from shared.states import FailureKind

STARTED = "started"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCEL = "cancel"
_KINDS = {STARTED, SUCCEEDED, FAILED}
OUTCOME_KIND = "outcome"
"""What an outcome's signature says it signs (:meth:`~shared.signing.Signer.sign`)."""
CANCEL_KIND = "cancel"
"""What a cancel request's signature says it signs (its attempt is 0)."""


def cancel_fields(by: str, run_id: str = "", signer: Optional[Signer] = None) -> dict[str, bytes | str]:
    """A stream entry asking the coordinator of run ``run_id`` to cancel it (signed by ``signer``)."""
    return sign_fields(signer, CANCEL_KIND, run_id, 0, {"status": CANCEL, "by": by})


def cancel_requester(raw: Mapping[bytes | str, bytes | str]) -> Optional[str]:
    """Who asked, if ``raw`` is a cancel request; ``None`` for any other entry."""
    status = raw.get(b"status", raw.get("status"))
    if status not in (CANCEL, CANCEL.encode()):
        return None
    by = raw.get(b"by", raw.get("by")) or "unknown"
    return by.decode("utf-8", "replace") if isinstance(by, bytes) else str(by)


def _shared(name: Optional[str]) -> Optional[str]:
    """One string object per worker name, however many outcomes name it: every task of a run keeps
    the name of its worker (``Task.worker``), which would otherwise be a copy per task."""
    return None if name is None else sys.intern(name)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to attempt ``attempt`` of ``task`` in run ``run_id``.

    ``result`` is the codec-encoded return value (``succeeded`` only); ``error``
    is one line, ``"ValueError: bad row 7"``; ``at`` is the worker's epoch time;
    ``types`` the raised exception's classes (:func:`shared.errors.class_refs`), comma-separated;
    ``with_start``: a finished attempt's entry that also reports its start (at ``started_at``, by
    ``worker``), which no entry of its own reported: one entry, one signature, one wake-up of the
    coordinator per short task.
    """

    run_id: str
    task: str
    attempt: int
    status: str
    at: float
    result: Optional[bytes] = None
    error: Optional[str] = None
    kind: FailureKind = FailureKind.ERROR
    traceback: Optional[str] = None
    worker: Optional[str] = None
    started_at: Optional[float] = None
    types: Optional[str] = None
    with_start: bool = False

    def to_fields(self, signer: Optional[Signer] = None) -> dict[str, bytes | str]:
        """The stream entry's fields, signed by ``signer`` if given."""
        fields: dict[str, bytes | str] = {
            "run": self.run_id,
            "task": self.task,
            "attempt": str(self.attempt),
            "status": self.status,
            "at": repr(self.at),
        }
        optional = {
            "result": self.result,
            "error": self.error,
            "kind": self.kind.value if self.status == FAILED else None,
            "traceback": self.traceback,
            "worker": self.worker,
            "started_at": None if self.started_at is None else repr(self.started_at),
            "types": self.types,
            "start": "1" if self.with_start else None,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return sign_fields(signer, OUTCOME_KIND, self.run_id, self.attempt, fields)

    @classmethod
    def from_fields(cls, raw: Mapping[bytes | str, bytes | str]) -> "Outcome":
        try:
            f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

            def text(name: str, default: Optional[str] = None) -> Optional[str]:
                value = f.get(name)
                if value is None:
                    return default
                return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

            status = text("status")
            if status not in _KINDS:
                raise ValueError(f"unknown status {status!r}")
            attempt = int(text("attempt") or "")
            if attempt < 1:
                raise ValueError(f"attempt {attempt} < 1")
            task, run_id = text("task"), text("run")
            if not task or not run_id:
                raise ValueError("missing task or run")
            result = f.get("result")
            if isinstance(result, str):
                result = result.encode("utf-8")
            started = text("started_at")
            return cls(
                run_id=run_id,
                task=task,
                attempt=attempt,
                status=status,
                at=float(text("at") or ""),
                result=result,
                error=text("error"),
                kind=FailureKind(text("kind", FailureKind.ERROR.value)),
                traceback=text("traceback"),
                worker=_shared(text("worker")),
                started_at=None if started is None else float(started),
                types=text("types"),
                with_start=text("start") == "1",
            )
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise SerializationError(f"malformed outcome message: {exc}") from None


def finished_event(outcome: Outcome, at: float) -> TaskSucceeded | TaskFailed:
    """The scheduler's event for a finished attempt's outcome (``succeeded`` or ``failed``), at ``at``
    on the coordinator's clock. Every backend turns outcomes into events here."""
    if outcome.status == SUCCEEDED:
        return TaskSucceeded(outcome.task, outcome.attempt, at, outcome.result, outcome.started_at)
    types = tuple(outcome.types.split(",")) if outcome.types else ()
    return TaskFailed(outcome.task, outcome.attempt, at, outcome.error or "failed", outcome.kind,
                      outcome.traceback, outcome.started_at, types)
