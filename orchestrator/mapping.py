"""Dynamic fan-out: the children a mapped task expands into, once its upstreams' results are known.

``transform.map(rows)`` (or ``Task(..., map_over="extract")``) records a task whose arguments
hold :class:`~shared.upstream.Mapped` markers. When its trigger rule is met the scheduler asks
for an expansion; the coordinator calls :func:`children_arguments` with the upstream results
and reports the count back as an event, so the scheduler stays pure. Child ``k`` gets item
``k`` of each mapped upstream in place of its marker (several mapped upstreams are zipped); the
mapped task's result is the list of its children's results, in item order.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from shared.errors import MapError
from shared.upstream import Mapped

DEFAULT_MAX_MAP_LENGTH = 10_000


def child_name(task: str, k: int) -> str:
    """``transform[3]``: the name of child ``k`` of mapped task ``task``."""
    return f"{task}[{k}]"


def children_arguments(task: str, args: tuple, kwargs: Mapping[str, Any], results: Mapping[str, Any],
                       limit: int = DEFAULT_MAX_MAP_LENGTH) -> list[tuple[tuple, dict]]:
    """Each child's ``(args, kwargs)``: the mapped task's, with item k of each mapped upstream's result
    (``results[name]``) in place of its :class:`Mapped` marker. Raises :class:`MapError` naming the
    task: a result that is not a list or tuple, lists of different lengths, a length
    past ``limit`` (``ORCH_MAX_MAP_LENGTH``)."""
    names = list(dict.fromkeys(v.task for v in (*args, *kwargs.values()) if isinstance(v, Mapped)))
    items: dict[str, Sequence[Any]] = {}
    for name in names:
        value = results.get(name)
        if not isinstance(value, (list, tuple)):
            raise MapError(f"task {task!r} maps over the result of task {name!r}, which is a "
                           f"{type(value).__name__}, not a list")
        items[name] = value
    lengths = {name: len(values) for name, values in items.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
        raise MapError(f"task {task!r} maps over results of different lengths ({shown}); they must be equal")
    count = next(iter(lengths.values()), 0)
    if count > limit:
        raise MapError(f"task {task!r} would expand into {count:,} children, over the limit of {limit:,} "
                       "(ORCH_MAX_MAP_LENGTH)")

    def child(k: int) -> tuple[tuple, dict]:
        def item(value: Any) -> Any:
            return items[value.task][k] if isinstance(value, Mapped) else value
        return tuple(map(item, args)), {key: item(value) for key, value in kwargs.items()}

    return [child(k) for k in range(count)]
