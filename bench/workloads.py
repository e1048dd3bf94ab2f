"""The workloads, as plain DAGs every system's driver turns into its own form.

A :class:`Dag` is a list of task names in topological order, each with its
dependencies, the function to call (a name in :mod:`bench.tasks`) and its
arguments. ``layers()`` groups them for the systems without dependencies of
their own (raw RQ): the client enqueues a layer, waits for all of it, then
enqueues the next.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

Entry = tuple[str, list[str], str, tuple[Any, ...]]
"""One task of a workload: name, dependencies, function (a name in :mod:`bench.tasks`), arguments."""


@dataclass
class Dag:
    name: str
    order: list[str] = field(default_factory=list)
    deps: dict[str, list[str]] = field(default_factory=dict)
    func: dict[str, str] = field(default_factory=dict)
    args: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    maps: dict[str, str] = field(default_factory=dict)
    """Mapped tasks (only systems that expand tasks at run time run such a DAG): task -> upstream."""
    jobs: int = 0
    """Jobs a run dispatches, when it is not one per task (a mapped task dispatches its children)."""

    def add(self, name: str, deps: list[str] = (), func: str = "noop", args: tuple[Any, ...] = ()) -> None:  # type: ignore[assignment]
        self.order.append(name)
        self.deps[name] = list(deps)
        self.func[name] = func
        self.args[name] = tuple(args)

    def __len__(self) -> int:
        return len(self.order)

    def entries(self) -> Iterator[Entry]:
        for name in self.order:
            yield name, self.deps[name], self.func[name], self.args[name]

    def layers(self) -> list[list[str]]:
        """Tasks grouped by depth (longest path from a root), in order."""
        depth: dict[str, int] = {}
        for name in self.order:
            depth[name] = 1 + max((depth[d] for d in self.deps[name]), default=-1)
        out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
        for name in self.order:
            out[depth[name]].append(name)
        return out

    def sinks(self) -> list[str]:
        """Tasks no other task depends on (waiting for these waits for the whole DAG)."""
        used = {d for deps in self.deps.values() for d in deps}
        return [name for name in self.order if name not in used]


def fanout(n: int = 500) -> Dag:
    dag = Dag("fanout")
    dag.add("root")
    for i in range(n):
        dag.add(f"item{i}", ["root"])
    dag.add("join", [f"item{i}" for i in range(n)])
    return dag


def mapped(n: int = 10_000) -> Dag:
    """root (returns ``list(range(n))``) -> a task mapped over it (n children at run time) -> join: the
    dynamic counterpart of :func:`fanout`."""
    dag = Dag("map")
    dag.add("root", func="items", args=(n,))
    dag.add("item", ["root"])
    dag.maps["item"] = "root"
    dag.add("join", ["item"])
    dag.jobs = n + 2  # as many as fanout(n): root, the n children, join
    return dag


def chain(n: int = 200) -> Dag:
    dag = Dag("chain")
    for i in range(n):
        dag.add(f"step{i}", [f"step{i - 1}"] if i else [])
    return dag


def sleeps(n: int = 32, seconds: float = 0.1) -> Dag:
    dag = Dag("sleep")
    for i in range(n):
        dag.add(f"sleep{i}", func="sleep_for", args=(seconds,))
    return dag


@dataclass
class StreamedDag:
    """A workload made task by task each time it is read, never held whole: what a driver whose
    system builds its own graph from the calls (orch's ``Workflow``) reads, so that the process's
    memory is the system's, not this harness's description of the workload (about 40 MB for
    100,000 tasks)."""

    name: str
    length: int
    make: Callable[[], Iterator[Entry]]

    def __len__(self) -> int:
        return self.length

    def entries(self) -> Iterator[Entry]:
        return self.make()


def layered_entries(layers: int, width: int, seed: int = 7) -> Iterator[Entry]:
    """``layers`` x ``width`` no-op tasks; each task past the first layer depends on 2 or 3
    distinct tasks of the layer before it, chosen at random (fixed seed: the same DAG every time)."""
    rng = random.Random(seed)
    for layer in range(layers):
        for i in range(width):
            picked = [] if layer == 0 else rng.sample(range(width), min(width, rng.choice((2, 3))))
            deps = [f"t{layer - 1}_{j}" for j in picked]
            yield f"t{layer}_{i}", deps, "noop", ()


def layered(layers: int = 100, width: int = 100, seed: int = 7, name: str = "dag") -> Dag:
    """:func:`layered_entries` as a :class:`Dag`."""
    dag = Dag(name)
    for task, deps, func, args in layered_entries(layers, width, seed):
        dag.add(task, deps, func, args)
    return dag


def streamed_layered(layers: int = 100, width: int = 100, seed: int = 7, name: str = "dag") -> StreamedDag:
    """The same DAG as :func:`layered`, as a :class:`StreamedDag`."""
    return StreamedDag(name, layers * width, lambda: layered_entries(layers, width, seed))
