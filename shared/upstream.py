"""An upstream task's result standing in an argument, until the attempt runs.

A ``@task`` called inside a ``@flow`` with another task's handle as an argument
(``load(extract(day))``) records :class:`Upstream` in that argument's place. It is
plain data: the codec carries it to workers as ``{"__orch__": "upstream", "v": name}``,
and right before the call the worker (or the embedded backend's attempt process)
puts the upstream's result in its place with :func:`resolve`. The value read
from Redis never names code: at most another task's result of the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

MARK = '"upstream"'
"""Text that every encoded payload holding an :class:`Upstream` contains (the codec's tag value), so a
worker can skip the walk for the payloads that cannot hold one (nearly all, in a classic workflow)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """The result of task ``task`` of the same run, to be filled in when the attempt runs."""

    task: str


@dataclass(frozen=True, slots=True)
class Mapped:
    """In a mapped task's arguments: one item of task ``task``'s result, a different one for each of
    the children the mapped task expands into (``transform.map(rows)``). The coordinator puts the
    items in place when it expands the task, so a child's job carries its item, never the list."""

    task: str


def mapped_over(args: tuple, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """The upstream tasks a task's arguments map over (its top-level :class:`Mapped` arguments)."""
    found = [value.task for value in (*args, *kwargs.values()) if isinstance(value, Mapped)]
    return tuple(dict.fromkeys(found))


def replace(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf(x)`` in place of every item ``x`` that is not a list, tuple, set or dict
    (dict keys stay as they are). The one traversal of arguments: the flow builder uses it to turn
    handles into :class:`Upstream` records, the attempt to turn those into results."""
    if isinstance(value, list):
        return [replace(v, leaf) for v in value]
    if isinstance(value, tuple):
        return tuple(replace(v, leaf) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(replace(v, leaf) for v in value)
    if isinstance(value, dict):
        return {k: replace(v, leaf) for k, v in value.items()}
    return leaf(value)


def resolve(value: Any, fetch_result: Callable[[str], Any]) -> Any:
    """``value`` with every :class:`Upstream` replaced by ``fetch_result(its task)``."""
    return replace(value, lambda x: fetch_result(x.task) if isinstance(x, Upstream) else x)
