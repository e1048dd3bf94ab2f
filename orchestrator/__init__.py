"""orch: a small, dependable DAG runner. ``from orchestrator import Task, Workflow, TaskState, task, flow``."""
from orchestrator.flow import Flow, TaskFunction, TaskHandle, flow, task
from orchestrator.task import Task
from orchestrator.workflow import Workflow
from shared.errors import (
    CycleError,
    DuplicateTaskError,
    FlowError,
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
    "task",
    "flow",
    "Flow",
    "TaskFunction",
    "TaskHandle",
    "FlowError",
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
