"""Text diagrams of a workflow's DAG: Mermaid and Graphviz DOT.

Edges run from a dependency to its dependent (the direction work flows).
Task names may hold any character, so nodes get generated ids (``t0``,
``t1``, ...) and the name is only ever a label, escaped for the format:
no name can break the syntax or collide with a keyword.
"""
from __future__ import annotations

from typing import Iterable

from orchestrator.workflow import Workflow


def to_mermaid(workflow: Workflow) -> str:
    """A Mermaid flowchart (``graph LR``) of ``workflow``, one node per task."""
    ids = _node_ids(workflow)
    lines = [f"%% workflow: {_single_line(workflow.name)}", "graph LR"]
    lines += [f'    {node}["{_mermaid_label(_label(workflow, name))}"]' for name, node in ids.items()]
    lines += [f"    {ids[dep]} --> {ids[name]}" for dep, name in _edges(workflow)]
    return "\n".join(lines) + "\n"


def to_dot(workflow: Workflow) -> str:
    """A Graphviz ``digraph`` of ``workflow``; render with ``dot -Tsvg``."""
    ids = _node_ids(workflow)
    lines = [f"digraph {_dot_string(workflow.name)} {{", "    rankdir=LR;", "    node [shape=box];"]
    lines += [f"    {node} [label={_dot_string(_label(workflow, name))}];" for name, node in ids.items()]
    lines += [f"    {ids[dep]} -> {ids[name]};" for dep, name in _edges(workflow)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _label(workflow: Workflow, name: str) -> str:
    """A mapped task is one node: ``transform [map]``, or ``transform [map x 3]`` once it expanded."""
    task = workflow.tasks.get(name)
    if task is None or not task.map_over:
        return name
    count = sum(1 for t in workflow if t.map_parent == name)
    return f"{name} [map x {count}]" if count else f"{name} [map]"


def _node_ids(workflow: Workflow) -> dict[str, str]:
    """A safe id for every task and every name a task depends on (even a missing one); a mapped
    task's children are drawn as their mapped task's one node."""
    ids: dict[str, str] = {}
    for task in workflow:
        if task.map_parent is not None:
            continue
        for name in (task.name, *task.dependencies):
            if name not in ids:
                ids[name] = f"t{len(ids)}"
    return ids


def _edges(workflow: Workflow) -> Iterable[tuple[str, str]]:
    for task in workflow:
        if task.map_parent is not None:
            continue
        for dep in dict.fromkeys(task.dependencies):  # a dependency listed twice is one edge
            yield dep, task.name


def _single_line(text: str) -> str:
    return " ".join(text.splitlines())


def _mermaid_label(name: str) -> str:
    """Mermaid entity codes: ``#`` first (it starts a code), then the quote and angle brackets."""
    text = _single_line(name).replace("#", "#35;")
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _dot_string(text: str) -> str:
    """A DOT quoted string; as a label it is an escString, so the backslash is escaped too."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'
