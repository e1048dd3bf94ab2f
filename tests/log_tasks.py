"""Task functions that print and log, for tests/test_task_logs.py (workers import them by reference)."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


def chatty(fail: bool = True) -> str:
    """Prints, writes to stderr, logs through a library logger at INFO and DEBUG, then raises."""
    print("hello from print")
    print("to stderr", file=sys.stderr)
    logging.getLogger("lib").info("library info record")
    logging.getLogger("lib").debug("library debug record")
    logging.getLogger("lib").warning("library warning record")
    if fail:
        raise ValueError("bad row 7")
    return "ok"


def quiet() -> int:
    return 1


def flood(megabytes: int) -> int:
    """About ``megabytes`` MB of numbered 100-byte lines."""
    filler = "x" * 88
    lines = megabytes * 10_000
    for i in range(lines):
        print(f"{i:>10} {filler}")
    return lines


def drip(lines: int, interval: float, marker: str = "") -> int:
    """A line every ``interval`` seconds; then touches ``marker`` (if given) as it returns."""
    for i in range(lines):
        print(f"drip {i}", flush=True)
        time.sleep(interval)
    if marker:
        Path(marker).write_text(str(time.time()))
    return lines


def print_then_sleep(seconds: float) -> None:
    """One line, then a sleep past the task's timeout."""
    print("before the timeout")
    time.sleep(seconds)


def print_then_die(seconds: float) -> None:
    """One line, a wait longer than a flush interval, then death without a report."""
    print("before dying")
    time.sleep(seconds)
    os._exit(3)
