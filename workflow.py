"""The classic import: ``from workflow import Task, Workflow`` (re-exports of :mod:`orchestrator`)."""
from orchestrator import (  # noqa: F401
    CycleError,
    DuplicateTaskError,
    MissingDependencyError,
    RunState,
    Task,
    TaskState,
    UnknownTaskError,
    Workflow,
    WorkflowError,
)

__all__ = [
    "Task",
    "Workflow",
    "TaskState",
    "RunState",
    "WorkflowError",
    "CycleError",
    "MissingDependencyError",
    "DuplicateTaskError",
    "UnknownTaskError",
]
