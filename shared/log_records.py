"""How an attempt's log is stored: one record per line, numbered, timed, with its byte offset.

The writer (:mod:`worker.task_log`) and every reader (:mod:`orchestrator.logs`)
share this form. In Redis an attempt's log is a stream (``keys.task_log``)
with one entry per line: entry id ``0-{n}`` where ``n`` is the line's number
in the attempt's whole output, fields ``t`` (epoch seconds), ``o`` (bytes of
output before the line) and ``l`` (the line, without its newline). A log
past its cap keeps its first and last lines: the line numbers jump where
lines were dropped, and the offsets say how many bytes went with them, so the
stored log needs no other bookkeeping. The embedded backend keeps the same
records in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

LINE_OVERHEAD = 32
"""What a line costs against ``ORCH_MAX_LOG_BYTES`` besides its own bytes: its timestamp and
bookkeeping in Redis (so that a flood of empty lines is bounded too)."""


class LogRecord(NamedTuple):
    """One line of an attempt's output. ``seq``: its number (1 for the first line, dropped lines
    counted); ``time``: when it was written (epoch s); ``offset``: bytes of output before it."""

    seq: int
    time: float
    offset: int
    text: str


@dataclass
class LogBatch:
    """What one flush changes in a stored log: ``records`` to add, and the lines numbered
    ``drop_from`` to ``drop_to`` (inclusive; ``drop_to == 0``: none) to remove."""

    records: list[LogRecord] = field(default_factory=list)
    drop_from: int = 0
    drop_to: int = 0


def text_bytes(text: str) -> int:
    """Bytes of ``text`` and its newline, as the log counts them (UTF-8)."""
    return (len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))) + 1


def entry_id(seq: int) -> str:
    """The stream entry id of line ``seq``."""
    return f"0-{seq}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def record_of_entry(entry: Any, fields: Mapping[Any, Any]) -> LogRecord:
    """The record a stream entry (``XRANGE`` reply item) holds; a damaged field reads as 0/empty."""
    seq = int(_text(entry).partition("-")[2] or 0)
    values = {_text(k): v for k, v in fields.items()}
    try:
        when = float(_text(values.get("t", 0)))
        offset = int(_text(values.get("o", 0)))
    except ValueError:
        when, offset = 0.0, 0
    return LogRecord(seq, when, offset, _text(values.get("l", b"")))
