"""The wire format of a job: what the coordinator puts on a queue for a worker.

Both sides import it from here, so the coordinator never imports a worker
module to learn how a job looks.

- On orch's own queues (``orch:queue:{queue}``, the default path) a job is one
  compact JSON array, :func:`job_message`. It is deterministic, so the
  coordinator can ``LREM`` exactly that entry to take a queued job back.
- On the RQ-compatible path a job is an RQ job whose function is
  :data:`JOB_FUNCTION` with the same fields as its arguments.

With signing on (:mod:`shared.signing`), a job carries one more field, last: the
HMAC of the entry without it (on orch's queues: its exact bytes; in an RQ job:
the bytes of the same fields as :func:`job_message` lays them out), its run id
and its attempt. Last, so that the Lua script that takes a lean job (which reads
only its first three fields) is unchanged; and the worker checks it on the
bytes as they came, before it decodes anything else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from shared.signing import SIGNATURE_CHARS, Signer

JOB_FUNCTION = "worker.rq_job.run_task"
"""The function of every RQ job orch enqueues."""


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt, as a worker receives it."""

    run_id: str
    task: str
    attempt: int
    ref: str
    payload: str
    timeout: Optional[float]
    max_result_bytes: Optional[int]

    def args(self) -> tuple:
        return (self.run_id, self.task, self.attempt, self.ref, self.payload, self.timeout, self.max_result_bytes)


JOB_KIND = "job"
"""What a job's signature says it signs (:meth:`~shared.signing.Signer.sign`)."""
_SIGNED_TAIL = len(',""]') + SIGNATURE_CHARS
"""Bytes a signature adds at the end of a lean entry: ``,"<64 hex digits>"]`` in place of ``]``."""


def job_message(run_id: str, task: str, attempt: int, ref: str, payload: str, timeout: Optional[float],
                max_result_bytes: Optional[int], signer: Optional[Signer] = None) -> str:
    """The queue entry of one attempt on orch's own queues, signed by ``signer`` if given.

    Deterministic (the same arguments and key give the same entry), so that the coordinator
    can take a queued entry back with ``LREM``."""
    message = json.dumps([run_id, task, attempt, ref, payload, timeout, max_result_bytes], separators=(",", ":"))
    if signer is None:
        return message
    return f'{message[:-1]},"{signer.sign(JOB_KIND, run_id, attempt, message.encode())}"]'


def job_signature(signer: Optional[Signer], args: tuple[Any, ...]) -> Optional[str]:
    """The signature an RQ job of orch with arguments ``args`` (:meth:`Job.args`) carries as its
    last argument; ``None`` when signing is off."""
    if signer is None:
        return None
    return signer.sign(JOB_KIND, args[0], args[2], job_message(*args).encode())


class MalformedJob(ValueError):
    """A queue entry no coordinator wrote. ``attempt_key`` is ``(run, task, attempt)`` when those
    three could be read (so the attempt can be failed), else ``None`` (the entry is dropped)."""

    def __init__(self, reason: str, attempt_key: Optional[tuple[str, str, int]] = None) -> None:
        super().__init__(reason)
        self.attempt_key = attempt_key


class JobRefused(MalformedJob):
    """A job whose signature is missing or wrong while this worker requires signed jobs: refused
    before anything it names is imported or decoded."""


def _signature_refusal(signed: bool) -> str:
    if not signed:
        return ("job is not signed, and this worker runs only jobs signed with its key (ORCH_SIGNING_KEY or "
                "ORCH_SIGNING_KEY_FILE); give the coordinator the same key")
    return ("job signature does not match this worker's key (ORCH_SIGNING_KEY): forged, altered, copied from "
            "another run or attempt, or signed with a key this worker does not have")


def check_job_signature(signer: Optional[Signer], run_id: str, attempt: int, signed_bytes: bytes,
                        signature: Any) -> None:
    """Raise :class:`JobRefused` unless signing is off or ``signature`` signs ``signed_bytes`` for
    ``run_id`` and ``attempt`` (the task is among the signed bytes)."""
    if signer is not None and not signer.verify(JOB_KIND, run_id, attempt, signed_bytes, signature):
        raise JobRefused(_signature_refusal(signature is not None), None)


def check_job_args(signer: Optional[Signer], args: tuple[Any, ...], signature: Any) -> None:
    """Raise :class:`JobRefused` unless signing is off or ``signature`` signs the RQ job of orch with
    arguments ``args`` (the seven of :meth:`Job.args`; strings and numbers as decoded)."""
    if signer is None:
        return
    try:
        signed = job_message(*args).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        signed = b""
    check_job_signature(signer, str(args[0]), args[2] if type(args[2]) is int else -1, signed, signature)


def parse_job_message(raw: bytes | str, signer: Optional[Signer] = None, max_bytes: Optional[int] = None) -> Job:
    """The :class:`Job` in a queue entry; raises :class:`MalformedJob` saying what is wrong.

    An entry longer than ``max_bytes`` is refused unread (no attempt to report: it is dropped).
    With ``signer``, an entry whose signature is missing or wrong raises :class:`JobRefused`,
    whose ``attempt_key`` names the attempt it claims to be."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if max_bytes is not None and len(data) > max_bytes:
        raise MalformedJob(f"job entry of {len(data)} bytes is over this worker's limit of {max_bytes} bytes "
                           f"(ORCH_MAX_PAYLOAD_BYTES); not read")
    try:
        fields = json.loads(data)
        if not isinstance(fields, list):
            raise TypeError(f"a {type(fields).__name__}, not a list")
        signature = fields.pop() if len(fields) == 8 else None
        run_id, task, attempt, ref, payload, timeout, max_result_bytes = fields
    except (ValueError, TypeError) as exc:
        raise MalformedJob(f"not a job entry: {exc}") from None
    if not (isinstance(run_id, str) and isinstance(task, str)) or type(attempt) is not int or attempt < 1:
        raise MalformedJob("run id and task must be strings, attempt a positive integer")
    key = (run_id, task, attempt)
    if signer is not None:
        signed = data[:-_SIGNED_TAIL] + b"]" if signature is not None else data
        try:
            check_job_signature(signer, run_id, attempt, signed, signature)
        except JobRefused as exc:
            raise JobRefused(str(exc), key) from None
    try:
        if not (isinstance(ref, str) and isinstance(payload, str)):
            raise TypeError("reference and payload must be strings")
        timeout = None if timeout is None else float(timeout)
        max_result_bytes = None if max_result_bytes is None else int(max_result_bytes)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout {timeout} is not positive")
    except (ValueError, TypeError, OverflowError) as exc:
        raise MalformedJob(str(exc), key) from None
    return Job(run_id, task, attempt, ref, payload, timeout, max_result_bytes)
