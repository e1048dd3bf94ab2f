"""Capturing an attempt's log where it runs: print() output, stderr and ``logging`` records.

Every kind of process that runs attempts calls :func:`capturing` around one
attempt: a lean work process (many attempts in sequence), an RQ work horse,
and the embedded backend's forked child. Inside it:

- ``sys.stdout`` and ``sys.stderr`` write into the attempt's log (each line
  timed when its newline is written), and the root logger's records at
  ``ORCH_TASK_LOG_LEVEL`` and above (any library's logger propagates to it)
  go there too, as ``LEVEL name: message``;
- the log is bounded by ``ORCH_MAX_LOG_BYTES`` (:class:`LogBuffer`): the first
  half keeps the first lines, the second half the latest ones, and lines in
  between are dropped before they are ever sent, so a task printing 100 MB
  costs its worker memory and Redis traffic of one cap per flush at most;
- a background thread of this process (:class:`_Flusher`, started at the first
  line) sends what is new in one batch at most :data:`FLUSH_SECONDS` after it
  was written, and once more shortly before a known kill deadline; the end of
  the block sends the rest before the attempt is reported, so a reader that
  sees the attempt final sees its whole log.

An attempt that prints nothing costs no Redis command and no thread. Where
batches go is the caller's ``send``: :func:`redis_sink` (workers: one Lua call
per batch on the run's log stream) or the embedded backend's pipe to its
parent. Output written straight to file descriptors 1 and 2 (a C extension, a
subprocess) is not captured.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from shared import keys
from shared.config import max_log_bytes, retention, task_log_level
from shared.log_records import LINE_OVERHEAD, LogBatch, LogRecord, text_bytes

FLUSH_SECONDS = 0.5
"""Longest a written line waits in the process before it is sent."""
PRE_DEADLINE_SECONDS = 0.1
"""How long before a kill deadline (a timeout enforced from outside) the last flush is made."""
RECORD_FORMAT = "%(levelname)s %(name)s: %(message)s"

Send = Callable[[LogBatch], None]


class LogBuffer:
    """The lines of one attempt not sent yet, bounded: no I/O, no clock (the caller gives the times).

    Half the cap holds the first lines (the head), half the latest ones (the tail).
    Once the head is full, each new line goes to the tail, and the oldest tail lines
    leave it: those not sent yet are never sent, those sent are named in the next
    batch's drop range. Lines longer than :attr:`max_line` characters are cut into pieces.
    """

    def __init__(self, max_bytes: int) -> None:
        self.head_room = max_bytes // 2
        self.tail_room = max_bytes - self.head_room
        self.max_line = min(65536, max_bytes // 16)
        self.seq = 0
        self.offset = 0
        self._head_open = True
        self._head_used = 0
        self._head_new: list[LogRecord] = []
        self._tail: deque[tuple[LogRecord, int]] = deque()
        self._tail_used = 0
        self._tail_unsent = 0
        self._drop_from = 0
        self._drop_to = 0

    def add(self, when: float, text: str) -> None:
        """One line, without its newline."""
        if len(text) <= self.max_line:
            self._add(when, text)
            return
        for start in range(0, len(text), self.max_line):
            self._add(when, text[start:start + self.max_line])

    def _add(self, when: float, text: str) -> None:
        size = text_bytes(text)
        self.seq += 1
        record = LogRecord(self.seq, when, self.offset, text)
        self.offset += size
        cost = size + LINE_OVERHEAD
        if self._head_open:
            if self._head_used + cost <= self.head_room:
                self._head_used += cost
                self._head_new.append(record)
                return
            self._head_open = False
        self._tail.append((record, cost))
        self._tail_used += cost
        self._tail_unsent += 1
        while self._tail_used > self.tail_room:
            sent = len(self._tail) > self._tail_unsent
            old, old_cost = self._tail.popleft()
            self._tail_used -= old_cost
            if not sent:
                self._tail_unsent -= 1
            else:
                self._drop_from = self._drop_from or old.seq
                self._drop_to = old.seq

    def take(self) -> Optional[LogBatch]:
        """What to send now (``None``: nothing); afterwards it counts as sent."""
        if not (self._head_new or self._tail_unsent or self._drop_to):
            return None
        records, self._head_new = self._head_new, []
        if self._tail_unsent:
            records += [r for r, _ in itertools.islice(self._tail, len(self._tail) - self._tail_unsent, None)]
            self._tail_unsent = 0
        batch = LogBatch(records, self._drop_from, self._drop_to)
        self._drop_from = self._drop_to = 0
        return batch


class Capture:
    """The log of one attempt being written: lines in, batches out through ``send``."""

    def __init__(self, send: Send, *, level: int, max_bytes: int, echo: bool = False,
                 flush_before: Optional[float] = None) -> None:
        self.send = send
        self.echo = echo
        self.flush_before = flush_before
        """A monotonic time at which the process may be killed (its last flush comes just before)."""
        self.level = level
        self.max_bytes = max_bytes
        self._buffer: Optional[LogBuffer] = None  # made at the first line: most attempts print nothing
        self._partial: tuple[list[str], list[str]] = ([], [])
        self._partial_size = [0, 0]
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._requested = False
        self._failed = False

    def write(self, text: str, stream: int) -> None:
        """Text written to stdout (``stream`` 0) or stderr (1): complete lines enter the log."""
        with self._lock:
            partial = self._partial[stream]
            if "\n" not in text:
                partial.append(text)
                self._partial_size[stream] += len(text)
                if self._partial_size[stream] > self.max_bytes // 16:  # no newline coming: cut it
                    self._add_locked(time.time(), "".join(partial))
                    partial.clear()
                    self._partial_size[stream] = 0
                return
            pieces = text.split("\n")
            if partial:
                pieces[0] = "".join(partial) + pieces[0]
                partial.clear()
                self._partial_size[stream] = 0
            if pieces[-1]:
                partial.append(pieces[-1])
                self._partial_size[stream] = len(pieces[-1])
            now = time.time()
            for line in itertools.islice(pieces, len(pieces) - 1):
                self._add_locked(now, line)

    def add(self, when: float, text: str) -> None:
        """A complete message (a log record, a traceback): each of its lines enters the log."""
        with self._lock:
            for line in text.rstrip("\n").split("\n"):
                self._add_locked(when, line)

    def _add_locked(self, when: float, line: str) -> None:
        if self._buffer is None:
            self._buffer = LogBuffer(self.max_bytes)
        self._buffer.add(when, line)
        if not self._requested:
            self._requested = True
            _flusher.request(self)

    def flush_delay(self) -> float:
        """How long the flusher may wait before sending what was just written."""
        if self.flush_before is None:
            return FLUSH_SECONDS
        return max(0.0, min(FLUSH_SECONDS, self.flush_before - PRE_DEADLINE_SECONDS - time.monotonic()))

    def flush(self) -> None:
        """Send what is new, in one batch. A failing ``send`` is told once on the real stderr; the
        lines it carried are missing from the stored log, where a reader sees them counted as dropped."""
        with self._send_lock:
            with self._lock:
                self._requested = False
                batch = self._buffer.take() if self._buffer is not None else None
            if batch is None:
                return
            try:
                self.send(batch)
            except Exception as exc:
                if not self._failed:
                    self._failed = True
                    print(f"orch: could not store a task's log lines ({type(exc).__name__}: {exc})",
                          file=sys.__stderr__)

    def close(self) -> None:
        """The attempt is over: what is left of a line without its newline enters the log, then
        everything is sent (the caller reports the attempt after this)."""
        with self._lock:
            now = time.time()
            for partial in self._partial:
                if partial:
                    self._add_locked(now, "".join(partial))
                    partial.clear()
        self.flush()


class _Flusher:
    """The thread that sends each capture's lines at most :data:`FLUSH_SECONDS` after they were
    written; started at the first line this process writes, it lives as long as the process."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._target: Optional[Capture] = None
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    def request(self, capture: Capture) -> None:
        self._target = capture
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="orch-log-flusher", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            capture = self._target
            if capture is None:
                continue
            time.sleep(capture.flush_delay())
            capture.flush()


class _Stream(io.TextIOBase):
    """Stands for ``sys.stdout`` or ``sys.stderr``: into the current capture's log, else (and with
    ``echo``) on to the real stream."""

    def __init__(self, original: Any, number: int) -> None:
        self.original = original
        self.number = number

    def write(self, text: str) -> int:
        capture = _current
        if capture is not None:
            capture.write(text, self.number)
            if not capture.echo:
                return len(text)
        return self.original.write(text) if self.original is not None else len(text)

    def flush(self) -> None:
        if self.original is not None:
            self.original.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return _current is None and self.original is not None and self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def buffer(self) -> Any:
        """The real stream's bytes buffer: bytes written there are not captured."""
        return self.original.buffer

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", None) or "utf-8"

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.original, "errors", None)


class _Records(logging.Handler):
    """The root logger's only handler while installed: records into the current capture's log at
    its level; otherwise (and with ``echo``) to the handlers the root logger had, as they would have."""

    def __init__(self, handlers: list[logging.Handler], level: int) -> None:
        super().__init__(logging.NOTSET)
        self.handlers = handlers
        self.original_level = level
        self.setFormatter(logging.Formatter(RECORD_FORMAT))

    def handle(self, record: logging.LogRecord) -> bool:  # no lock of its own: the capture has one
        capture = _current
        if capture is not None and record.levelno >= capture.level:
            try:
                capture.add(record.created, self.format(record))
            except Exception:
                self.handleError(record)
        if (capture is None or capture.echo) and record.levelno >= self.original_level:
            last_resort = logging.lastResort
            if not self.handlers and last_resort is not None and record.levelno >= last_resort.level:
                last_resort.handle(record)
            for handler in self.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class _Installation:
    """What :func:`install` replaced, to put back."""

    def __init__(self) -> None:
        self.level = _setting(task_log_level, logging.INFO)
        self.max_bytes = _setting(max_log_bytes, 1024 * 1024)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        root = logging.getLogger()
        self.root_level = root.level
        self.root_handlers = list(root.handlers)
        self.records = _Records(self.root_handlers, root.getEffectiveLevel())
        self.out, self.err = _Stream(sys.stdout, 0), _Stream(sys.stderr, 1)
        sys.stdout, sys.stderr = self.out, self.err
        root.handlers = [self.records]
        self.wanted = min(self.level, root.getEffectiveLevel())
        if root.level != self.wanted:
            root.setLevel(self.wanted)

    def check(self) -> None:
        """Before an attempt: put back what an earlier task in this process changed for good (the
        streams, the root logger's handler and level: ``logging.basicConfig(force=True)``)."""
        if sys.stdout is not self.out:
            sys.stdout = self.out
        if sys.stderr is not self.err:
            sys.stderr = self.err
        root = logging.getLogger()
        if self.records not in root.handlers:
            root.addHandler(self.records)
        if root.level != self.wanted:
            root.setLevel(self.wanted)

    def remove(self) -> None:
        if sys.stdout is self.out:
            sys.stdout = self.stdout
        if sys.stderr is self.err:
            sys.stderr = self.stderr
        root = logging.getLogger()
        root.handlers = self.root_handlers + [h for h in root.handlers
                                              if h is not self.records and h not in self.root_handlers]
        root.setLevel(self.root_level)


def _setting(read: Callable[[], int], default: int) -> int:
    """A setting for this process; a bad value (``orch worker`` refuses it at start) falls back."""
    try:
        return read()
    except ValueError:
        return default


_current: Optional[Capture] = None
_installed: Optional[_Installation] = None
_flusher = _Flusher()


def install() -> None:
    """Put the capturing streams and log handler in place for the life of this process (a lean work
    process, so each attempt only switches its log on and off). Idempotent."""
    global _installed
    if _installed is None:
        _installed = _Installation()


class capturing:
    """``with capturing(send):`` captures one attempt's log in the block (see the module's docstring);
    everything is sent when it ends. ``echo``: the output also goes where it went before (the
    embedded backend's terminal). ``flush_before``: a monotonic time at which something may kill
    this process. (A class, not a generator: it runs for every attempt, and costs less.)"""

    def __init__(self, send: Send, *, echo: bool = False, flush_before: Optional[float] = None) -> None:
        self.send, self.echo, self.flush_before = send, echo, flush_before
        self._own = False

    def __enter__(self) -> Capture:
        global _current, _installed
        self._own = _installed is None
        if _installed is None:
            _installed = _Installation()
        else:
            _installed.check()
        _current = Capture(self.send, level=_installed.level, max_bytes=_installed.max_bytes, echo=self.echo,
                           flush_before=self.flush_before)
        return _current

    def __exit__(self, *exc: Any) -> None:
        global _current, _installed
        capture, _current = _current, None
        try:
            if capture is not None:
                capture.close()
        finally:
            if self._own and _installed is not None:
                _installed.remove()
                _installed = None


def note(text: str) -> None:
    """Add ``text`` (a traceback, an error line) to the log being captured, if any."""
    capture = _current
    if capture is not None:
        capture.add(time.time(), text)


def _after_fork() -> None:
    """A forked child starts with no capture and no flusher (the parent's thread is not in it)."""
    global _current, _flusher
    _current = None
    _flusher = _Flusher()


os.register_at_fork(after_in_child=_after_fork)


_APPEND = """
-- KEYS[1]: one attempt's log (a stream); KEYS[2]: the run's log index (a set); KEYS[3]: the run's
-- event stream, which exists while the run does (a forged job's made-up run gets no log).
-- ARGV[1]: TTL (s); ARGV[2], ARGV[3]: the first and last line number to delete (0: none);
-- ARGV[4]: JSON array of [line number, time, offset, line].
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
for _, r in ipairs(cjson.decode(ARGV[4])) do
  redis.pcall('XADD', KEYS[1], '0-' .. string.format('%d', r[1]), 't', r[2], 'o', string.format('%d', r[3]),
              'l', r[4])
end
local last = tonumber(ARGV[3])
if last > 0 then
  local ids = {}
  for seq = tonumber(ARGV[2]), last do
    ids[#ids + 1] = '0-' .. string.format('%d', seq)
    if #ids == 1000 or seq == last then
      redis.call('XDEL', KEYS[1], unpack(ids))
      ids = {}
    end
  end
end
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


def redis_sink(connection: Any, run_id: str, task: str, attempt: int) -> Send:
    """Batches of attempt ``attempt`` of ``task`` into its log stream (``keys.task_log``), one Lua
    call each; the key joins the run's log index and gets this worker's ``ORCH_RETENTION`` as TTL.
    Nothing is prepared until the first batch: an attempt that prints nothing costs nothing. A run
    whose event stream does not exist (a forged job's, or one past its retention) gets no log.
    """
    key = keys.task_log(run_id, task, attempt)
    index = keys.logs(run_id)
    events = keys.events(run_id)
    script: list[Any] = []

    def send(batch: LogBatch) -> None:
        if not script:
            script.append(connection.register_script(_APPEND))
        body = json.dumps([[r.seq, "%.3f" % r.time, r.offset, r.text] for r in batch.records],
                          separators=(",", ":"))
        script[0](keys=[key, index, events], args=[retention(), batch.drop_from, batch.drop_to, body])

    return send
