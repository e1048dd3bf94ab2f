"""What the run page draws: the DAG as nodes and edges, collapsed to what a browser can lay out.

A pure function of the run's tasks. Each mapped task is one node whatever its number of
children (its children are counted by state on it). A graph still larger than
:data:`MAX_NODES` is drawn by layers: tasks are placed on their layer (longest path from a
root), consecutive layers are banded so that at most :data:`MAX_BANDS` bands remain, and
each band of more than :data:`BAND_KEEP` tasks becomes one group node counting its tasks
by state. Airflow's graph view freezing on 1,000 tasks is what this avoids: the browser
lays out a few hundred nodes at most, and the grid view shows every task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from orchestrator.task import Task

MAX_NODES = 250
"""Nodes drawn one per task up to this many; beyond, layers are grouped."""
MAX_BANDS = 60
BAND_KEEP = 6
"""A band with at most this many tasks keeps them as task nodes."""


@dataclass
class Node:
    """One node: a task (``kind="task"``), a mapped task with its children (``"map"``), or a
    group of tasks (``"group"``). ``task`` is the task's name for the first two."""

    id: str
    label: str
    kind: str
    task: Optional[str]
    members: int = 1

    def document(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "kind": self.kind, "task": self.task, "members": self.members}


@dataclass
class GraphView:
    nodes: list[Node] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)
    node_of: dict[str, int] = field(default_factory=dict)
    """task name -> index of the node that shows it (a child: its mapped task's node)."""
    collapsed: bool = False

    def document(self) -> dict[str, Any]:
        return {"nodes": [node.document() for node in self.nodes], "edges": [list(edge) for edge in self.edges],
                "collapsed": self.collapsed}


def _layers(order: Sequence[str], dependencies: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each task's layer: 0 for a root, else one more than its deepest dependency (``order`` is topological)."""
    layer: dict[str, int] = {}
    for name in order:
        layer[name] = max((layer[dep] + 1 for dep in dependencies[name] if dep in layer), default=0)
    return layer


def build_graph(order: Sequence[str], tasks: Mapping[str, Task]) -> GraphView:
    """The graph of a run whose tasks are ``tasks``, in topological ``order``."""
    shown = [name for name in order if tasks[name].map_parent is None]
    dependencies = {name: [dep for dep in tasks[name].dependencies if dep in tasks] for name in shown}
    view = GraphView()
    group_of: dict[str, str] = {}
    if len(shown) > MAX_NODES:
        view.collapsed = True
        group_of = _bands(shown, dependencies)
    index: dict[tuple[str, str], int] = {}
    for name in shown:
        key = ("group", group_of[name]) if name in group_of else ("task", name)
        if key not in index:
            index[key] = len(view.nodes)
            if key[0] == "group":
                view.nodes.append(Node(f"group:{key[1]}", key[1], "group", None, 0))
            else:
                view.nodes.append(Node(f"task:{name}", name, "map" if tasks[name].map_over else "task", name))
        node = view.nodes[index[key]]
        if node.kind == "group":
            node.members += 1
        view.node_of[name] = index[key]
    for name in order:
        parent = tasks[name].map_parent
        if parent is not None and parent in view.node_of:
            view.node_of[name] = view.node_of[parent]
    seen: set[tuple[int, int]] = set()
    for name in shown:
        for dep in dependencies[name]:
            edge = (view.node_of[dep], view.node_of[name])
            if edge[0] != edge[1] and edge not in seen:
                seen.add(edge)
                view.edges.append(edge)
    for node in view.nodes:
        if node.kind == "group":
            node.label = f"{node.label} ({node.members} tasks)"
    return view


def _bands(shown: Sequence[str], dependencies: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """task -> group name, for the tasks of bands too large to draw one by one."""
    layer = _layers(shown, dependencies)
    depth = max(layer.values(), default=0) + 1
    width = max(1, math.ceil(depth / MAX_BANDS))
    members: dict[int, list[str]] = {}
    for name in shown:
        members.setdefault(layer[name] // width, []).append(name)
    group_of: dict[str, str] = {}
    for band, names in members.items():
        if len(names) <= BAND_KEEP and width == 1:
            continue
        first, last = band * width, min(depth, (band + 1) * width) - 1
        label = f"layer {first}" if first == last else f"layers {first}-{last}"
        for name in names:
            group_of[name] = label
    return group_of
