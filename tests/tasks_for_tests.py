"""Module-level task functions for the tests.

Forked children run closures fine, but tasks given as ``"package.module:function"``
must be importable by reference, so they live here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def echo(*args: Any, **kwargs: Any) -> dict:
    return {"args": list(args), "kwargs": kwargs}


def bump(path: str | os.PathLike) -> int:
    """Increment the integer counter kept in ``path`` (0 if absent); return the new value.

    Each attempt of a local task runs in its own forked process, so a counter in
    memory would not survive from one attempt to the next; a file does.
    """
    p = Path(path)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


def log_line(path: str | os.PathLike, text: str) -> None:
    """Append one line (``text`` and the time) to ``path``; small appends do not interleave."""
    with open(path, "a") as f:
        f.write(f"{text} {time.time():.6f}\n")


def read_log(path: str | os.PathLike) -> list[tuple[str, float]]:
    out = []
    for line in Path(path).read_text().splitlines():
        text, _, at = line.rpartition(" ")
        out.append((text, float(at)))
    return out
