"""``@task`` / ``@flow`` workflows for tests/test_authoring.py (importable by workers: ``--path tests``)."""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator import flow, task


@task(max_retries=3, retry_delay=0.01, timeout=30)
def extract(day: str) -> list[dict]:
    return [{"day": day, "n": i} for i in range(3)]


@task
def rates(day: str) -> dict:
    return {"day": day, "eur": 1.1}


@task(queue="default")
def load(rows: list[dict], rates: dict) -> int:
    assert all(row["day"] == rates["day"] for row in rows), (rows, rates)
    return len(rows) * 2 + 2


@flow(name="etl")
def etl(day: str = "2026-12-01"):
    rows = extract(day)
    load(rows, rates(day))


@task
def add(x: int, y: int = 0) -> int:
    return x + y


@task
def collect(values: list, named: dict, pair: tuple) -> dict:
    """Handles inside containers arrive as results, in place."""
    return {"values": values, "named": named, "pair": list(pair)}


@task
def flaky_once(marker_dir: str, value: int) -> int:
    """Fails its first attempt (marker file), then returns ``value``."""
    marker = Path(marker_dir) / "flaky_once"
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return value


@flow
def nested(base: int = 1, marker_dir: str = ""):
    one = add(base)
    two = add(base, y=1)
    three = add.with_options(name="three", max_retries=2)(one, y=two)
    again = flaky_once.with_options(max_retries=1)(marker_dir, 5) if marker_dir else add(5)
    collect([one, two, 7], {"three": three, "k": "v"}, (again, "x"))


@flow
def needs_day(day: str):
    rates(day)


def pid() -> int:
    return os.getpid()


@task
def echo_params() -> dict:
    from orchestrator import current_task
    return current_task().params


@flow
def dated(day: str = "2026-01-01"):
    echo_params()


# ------------------------------------------------------------------ policies (tests/test_policies_run.py)
def _count(marker_dir: str, name: str) -> int:
    """How many times ``name`` ran (a marker line per run), this run included."""
    path = Path(marker_dir) / name
    with open(path, "a") as f:
        f.write("ran\n")
    return len(path.read_text().splitlines())


@task(max_retries=3, retry_on=(KeyError,))
def lookup(marker_dir: str) -> str:
    if _count(marker_dir, "lookup") < 2:
        raise KeyError("not yet")
    return "found"


@task(max_retries=3, retry_on=(KeyError,))
def wrong_type(marker_dir: str) -> str:
    _count(marker_dir, "wrong_type")
    raise ValueError("bad row 7")


@task(max_retries=3)
def refuse(marker_dir: str) -> str:
    from orchestrator import Fail
    _count(marker_dir, "refuse")
    raise Fail("input is corrupt")


@task
def maybe_skip(marker_dir: str) -> str:
    from orchestrator import Skip
    _count(marker_dir, "maybe_skip")
    raise Skip("no new files")


@task
def after_skip(value: str) -> str:
    return value


@task(trigger_rule="all_done")
def cleanup(marker_dir: str, *upstream) -> list:
    _count(marker_dir, "cleanup")
    return list(upstream)


@task(trigger_rule="one_failed")
def alert(marker_dir: str, *upstream) -> str:
    _count(marker_dir, "alert")
    return "alerted"


@flow
def policies(marker_dir: str = ""):
    found = lookup(marker_dir)
    wrong = wrong_type(marker_dir)
    refused = refuse(marker_dir)
    skipped = maybe_skip(marker_dir)
    after_skip(skipped)
    cleanup(marker_dir, found, wrong, refused)
    alert.with_options(name="alert_on_wrong")(marker_dir, wrong)
    alert.with_options(name="alert_on_found")(marker_dir, found)


# ------------------------------------------------------------------ dynamic fan-out (tests/test_map.py)
@task
def numbers(n: int) -> list[int]:
    return list(range(n))


@task
def letters(n: int) -> list[str]:
    return [chr(ord("a") + i % 26) for i in range(n)]


@task(max_retries=1)
def square(x: int, offset: int = 0, marker_dir: str = "") -> int:
    """Fails the first attempt of item 1 when ``marker_dir`` is given (a marker file per item and run)."""
    if marker_dir:
        marker = Path(marker_dir) / f"square-{x}"
        with open(marker, "a") as f:
            f.write("ran\n")
        if x == 1 and len(marker.read_text().splitlines()) == 1:
            raise RuntimeError("item 1 fails once")
    return x * x + offset


@task
def pair(x: int, letter: str) -> str:
    return f"{letter}{x}"


@task
def total(values: list) -> int:
    return sum(values)


@flow
def squares(n: int = 3, marker_dir: str = ""):
    total(square.map(numbers(n), offset=1, marker_dir=marker_dir))


@flow
def zipped(n: int = 3, m: int = 3):
    pair.map(numbers(n), letters(m))


@task
def slow_square(x: int, marker_dir: str) -> int:
    """0.3 s per item, and a marker line per run of each item."""
    import time
    with open(Path(marker_dir) / f"square-{x}", "a") as f:
        f.write("ran\n")
    time.sleep(0.3)
    return x * x


@flow
def slow_squares(n: int = 8, marker_dir: str = ""):
    total(slow_square.map(numbers(n), marker_dir=marker_dir))


@task
def checked_item(x: int, marker_dir: str) -> int:
    """Fails for item 2 while ``marker_dir/bad`` exists; a marker line per run of each item."""
    with open(Path(marker_dir) / f"square-{x}", "a") as f:
        f.write("ran\n")
    print(f"item {x}")
    if x == 2 and (Path(marker_dir) / "bad").exists():
        raise ValueError("item 2 is bad")
    return x * 10


@flow
def checked(n: int = 4, marker_dir: str = ""):
    total(checked_item.map(numbers(n), marker_dir=marker_dir))
