"""orch: a small, dependable DAG runner. ``from orchestrator import Task, Workflow, TaskState``."""
from orchestrator.task import Task
from orchestrator.workflow import Workflow
from shared.errors import (
    CycleError,
    DuplicateTaskError,
    MissingDependencyError,
    UnknownTaskError,
    WorkflowError,
)
from shared.context import TaskContext
from shared.context import current as current_task
from shared.states import RunState, TaskState

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
    "current_task",
    "TaskContext",
]
