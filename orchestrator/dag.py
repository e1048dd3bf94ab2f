"""Validation and ordering of a workflow's dependency graph, in O(V + E).

Kahn's algorithm with a counter of unmet dependencies per task, as
:class:`graphlib.TopologicalSorter` does; written out here because graphlib's
general bookkeeping costs about three times as much on a 100,000-task graph.

Tasks are numbered by their position in the mapping (insertion order), and the
edges are kept as flat arrays of those numbers (compressed sparse rows): a
100,000-task graph then takes about 10 MB instead of a list and a few dict
entries per task, and the scheduler and the stored run spec share it.
"""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat
from operator import attrgetter, ge
from typing import Any, Mapping, Optional, Protocol, Sequence, TypeVar

from shared.errors import CycleError, MissingDependencyError


class Node(Protocol):
    # Read-only members (properties), so that a Task's list[str] fits Sequence[str] (mutable members are invariant).
    @property
    def name(self) -> str: ...

    @property
    def dependencies(self) -> Sequence[str]: ...


def check_dependencies(tasks: Mapping[str, Node]) -> None:
    """Raise :class:`MissingDependencyError` for the first dependency that is not a task."""
    for name, task in tasks.items():
        for dep in task.dependencies:
            if dep not in tasks:
                raise MissingDependencyError(name, dep)


@dataclass(frozen=True)
class Graph:
    """A validated DAG over tasks numbered ``0..n-1`` (``names[i]`` is task ``i``).

    - ``deps[deps_start[i]:deps_start[i + 1]]``: task ``i``'s dependencies as given
      (their order and any repeats kept, so a stored spec gives them back as written);
    - ``dependents[dependents_start[i]:dependents_start[i + 1]]``: the tasks that depend
      on ``i``, in task order, one entry per time they name it;
    - ``indegree[i]``: its number of dependencies, as given;
    - ``topological``: the numbers in a topological order (``order`` gives the names).
      When every task comes after its dependencies (as when tasks are added in that
      order), the numbering itself shows there is no cycle, and this order is only
      worked out if asked for: submitting a run does not need it.

    A dependency named twice is two edges, in ``indegree`` and in ``dependents`` alike:
    counting down unmet dependencies then reaches zero exactly when every distinct one
    is met, with no pass to take the repeats out.

    The scheduler starts from these instead of recomputing them, so validating and
    scheduling a DAG walks it once. Read only: the arrays are shared.
    """

    names: list[str]
    index: dict[str, int]
    deps: array
    deps_start: array
    dependents: array
    dependents_start: array
    indegree: array
    known_order: Optional[array] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def topological(self) -> array:
        order = self.known_order
        if order is None:
            order = _kahn(self.indegree, self.dependents, self.dependents_start)[0]
            object.__setattr__(self, "known_order", order)
        return order

    @property
    def order(self) -> list[str]:
        """Task names, each after all its dependencies; ties keep insertion order."""
        names = self.names
        return [names[i] for i in self.topological]

    def dependencies_of(self, i: int) -> array:
        """Task ``i``'s dependencies (numbers), as given."""
        return self.deps[self.deps_start[i]:self.deps_start[i + 1]]

    def dependents_of(self, i: int) -> array:
        """The tasks (numbers) with ``i`` among their dependencies, each once."""
        return self.dependents[self.dependents_start[i]:self.dependents_start[i + 1]]


def analyse(tasks: Mapping[str, Node]) -> Graph:
    """Validate ``tasks`` and return their :class:`Graph`.

    Raises :class:`MissingDependencyError` (the first missing name, in task order)
    or :class:`CycleError` naming a cycle. Ties in the order keep the order in which
    tasks were added, so it is stable.
    """
    names = list(tasks)
    index = dict(zip(names, range(len(names))))
    dep_lists = list(map(attrgetter("dependencies"), tasks.values()))
    try:
        flat = list(map(index.__getitem__, chain.from_iterable(dep_lists)))
    except KeyError:
        check_dependencies(tasks)
        raise
    return from_numbers(names, flat, list(map(len, dep_lists)), index)


def from_numbers(names: list[str], deps: Sequence[int], counts: Sequence[int],
                 index: Optional[dict[str, int]] = None) -> Graph:
    """The :class:`Graph` of tasks given by number: task ``i`` has the next ``counts[i]``
    entries of ``deps`` as its dependencies. Raises :class:`CycleError`.

    The caller guarantees what :func:`analyse` checks by name: every number in range,
    ``sum(counts) == len(deps)``, names unique (``index`` is built if not given).
    """
    n = len(names)
    if index is None:
        index = dict(zip(names, range(n)))
    indegree = array("i", counts)
    times = Counter(deps)
    dependents_start = array("i", accumulate(map(times.get, range(n), repeat(0)), initial=0))
    dependents = _dependents(deps, indegree, dependents_start)
    parts = (names, index, array("i", deps), array("i", accumulate(counts, initial=0)), dependents,
             dependents_start, indegree)
    order = None
    if not _each_after_its_dependencies(deps, counts):
        order, waiting = _kahn(indegree, dependents, dependents_start)
        if len(order) < n:
            raise CycleError(_find_cycle(Graph(*parts), waiting))
    return Graph(*parts, known_order=order)


def _each_after_its_dependencies(deps: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether every dependency has a smaller number than its task (then there is no cycle)."""
    owners = chain.from_iterable(map(repeat, range(len(counts)), counts))
    return not any(map(ge, deps, owners))


def _dependents(deps: Sequence[int], indegree: array, start: array) -> array:
    """The flat dependents array: for each task, the tasks depending on it, in task order."""
    dependents = array("i", [0]) * len(deps)
    fill = start.tolist()
    owners = chain.from_iterable(map(repeat, range(len(indegree)), indegree))
    for i, j in zip(owners, deps):
        dependents[fill[j]] = i
        fill[j] += 1
    return dependents


def _kahn(indegree: array, dependents: array, start: array) -> tuple[array, list[int]]:
    """A topological order (as far as one exists) and each task's count of unordered dependencies."""
    waiting = indegree.tolist()
    bounds = start.tolist()
    order = [i for i, count in enumerate(waiting) if count == 0]
    ready = order.append
    for i in order:  # the list grows while we walk it
        for dependent in dependents[bounds[i]:bounds[i + 1]]:
            left = waiting[dependent] - 1
            waiting[dependent] = left
            if not left:
                ready(dependent)
    return array("i", order), waiting


def topological_order(tasks: Mapping[str, Node]) -> list[str]:
    """Every task after all its dependencies (see :func:`analyse`)."""
    return analyse(tasks).order


def _find_cycle(graph: Graph, waiting: Sequence[int]) -> list[str]:
    """A cycle among the tasks Kahn's walk could not order (each has an unordered dependency)."""
    node = next(i for i, count in enumerate(waiting) if count > 0)
    seen: dict[int, int] = {}
    path: list[int] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(dep for dep in graph.dependencies_of(node) if waiting[dep] > 0)
    return [graph.names[i] for i in path[seen[node]:] + [node]]


def validate(tasks: Mapping[str, Node]) -> Graph:
    """Raise the first :class:`~shared.errors.DefinitionError` of the graph, if any."""
    return analyse(tasks)


N = TypeVar("N", bound=Node)


def in_graph_order(specs: list[N], graph: Graph) -> list[N]:
    """``specs`` (anything with a ``name``) indexed by ``graph``'s task numbers (they normally come in that
    order already)."""
    if len(specs) != len(graph):
        raise ValueError(f"{len(specs)} task specs for a graph of {len(graph)} tasks")
    if list(map(attrgetter("name"), specs)) == graph.names:
        return specs
    ordered: list[Any] = [None] * len(specs)
    for spec in specs:
        ordered[graph.index[spec.name]] = spec
    return ordered
