"""orch: a small, dependable DAG runner. ``from orchestrator import Task, Workflow, TaskState, task, flow``."""
from orchestrator.flow import Flow, TaskFunction, TaskHandle, flow, task
from orchestrator.task import Task
from orchestrator.trigger_rules import TriggerRule
from orchestrator.workflow import Workflow
from shared.errors import (
    CycleError,
    DuplicateTaskError,
    Fail,
    FlowError,
    MissingDependencyError,
    Skip,
    TaskTimeout,
    UnknownTaskError,
    WorkerCrash,
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
    "Fail",
    "Skip",
    "TaskTimeout",
    "WorkerCrash",
    "TriggerRule",
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
