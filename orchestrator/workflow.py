"""``Workflow``: a named set of tasks with dependencies, and the way to run it."""
from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from orchestrator import dag
from orchestrator.backends.local import DEFAULT_MAX_WORKERS, LocalBackend
from orchestrator.coordinator import Coordinator, ProgressCallback
from orchestrator.logs import LogSource, RedisLogs, attempt_log, log_text
from orchestrator.scheduler import Scheduler
from orchestrator.task import Task
from shared import context
from shared.config import check_log_settings
from shared.connection import connect
from shared.errors import DuplicateTaskError, NoSuchAttemptError, UnknownTaskError, WorkflowError
from shared.states import TaskState


class Workflow:
    """A DAG of :class:`Task` objects.

    ``run()`` executes it on the embedded local backend (forked processes), or,
    given ``redis_url``, on ``orch worker`` processes through Redis + RQ; both
    return ``{name: result}`` for the tasks that succeeded and leave every
    task's ``state``, ``attempts``, ``result`` and ``error`` set; :meth:`task_log`
    (and each ``Task.log``) reads what the run's attempts printed and logged.
    """

    def __init__(self, name: str = "workflow") -> None:
        if not isinstance(name, str) or not name.strip():
            raise WorkflowError(f"a workflow name must be a non-empty string, not {name!r}")
        self.name = name
        self.tasks: dict[str, Task] = {}
        self._log_source: Optional[LogSource] = None

    def add_task(self, task: Task) -> Task:
        """Add ``task``; a second task with the same name raises :class:`DuplicateTaskError`."""
        if not isinstance(task, Task):
            raise WorkflowError(f"add_task() takes a Task, not {type(task).__name__}")
        if task.name in self.tasks:
            raise DuplicateTaskError(task.name)
        self.tasks[task.name] = task
        return task

    def get_task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(name) from None

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks.values())

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, name: object) -> bool:
        return name in self.tasks

    def validate(self) -> dag.Graph:
        """Raise :class:`CycleError` or :class:`MissingDependencyError` if the DAG is not runnable.

        Returns the validated :class:`~orchestrator.dag.Graph` (the tasks numbered, their
        edges as arrays, a topological ``order``), which a run reuses.
        """
        return dag.validate(self.tasks)

    def execution_order(self) -> list[str]:
        """Task names in an order where each comes after all its dependencies."""
        return dag.topological_order(self.tasks)

    def get_task_result(self, name: str) -> Any:
        """The result of task ``name`` in the current run (``None`` until it has succeeded).

        Inside a task running on an ``orch worker``, this reads the result that
        the named upstream task produced in the same run, from Redis.
        """
        running = context.current()
        if running is not None:
            return running.fetch_result(name)
        return self.get_task(name).result

    @property
    def results(self) -> dict[str, Any]:
        """``{name: result}`` of the tasks that succeeded in the last run."""
        return {name: t.result for name, t in self.tasks.items() if t.state is TaskState.SUCCESS}

    def run(
        self,
        max_workers: Optional[int] = None,
        *,
        redis_url: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Run every task once its dependencies succeeded; return ``{name: result}`` of the successes.

        Locally, ``max_workers`` attempts run at once (default 4). With
        ``redis_url`` the run goes to the workers listening on the tasks'
        queues; ``options`` are those of :func:`orchestrator.distributed.run_distributed`.
        The run's id is then in ``last_run_id``.
        """
        for task in self.tasks.values():
            task.reset()
        self._log_source = None
        if redis_url is not None:
            from orchestrator.distributed import run_distributed

            def submitted(run_id: str) -> None:
                self._read_logs_from(RedisLogs(connect(redis_url, check=False), run_id))
                if on_submitted is not None:
                    on_submitted(run_id)

            on_submitted = options.pop("on_submitted", None)
            run_distributed(self, redis_url, on_progress=on_progress, on_submitted=submitted, **options)
            return self.results
        if options:
            raise TypeError(f"unexpected options for a local run: {', '.join(sorted(options))}")
        check_log_settings()
        scheduler = Scheduler(self.tasks.values(), self.validate())
        backend = LocalBackend(self.tasks, max_workers or _default_workers(), run_id=f"local-{os.getpid()}")
        self._read_logs_from(backend.logs)
        try:
            Coordinator(self.tasks, backend, on_progress=on_progress, scheduler=scheduler).run()
        finally:
            backend.close()
        return self.results


    def _read_logs_from(self, source: LogSource) -> None:
        self._log_source = source
        for task in self.tasks.values():
            task.log_reader = self._attempt_text

    def _attempt_text(self, name: str, attempt: int) -> str:
        assert self._log_source is not None
        return log_text(attempt_log(self._log_source, name, attempt)[0])

    def task_log(self, name: str, attempt: Optional[int] = None) -> str:
        """What attempt ``attempt`` (default: the latest) of task ``name`` printed and logged in the
        last run, embedded or distributed, one line per line with a notice where the cap dropped
        lines; ``""`` if it printed nothing or never ran. An attempt the task did not make raises
        :class:`~shared.errors.NoSuchAttemptError`."""
        task = self.get_task(name)
        if self._log_source is None:
            raise WorkflowError("this workflow has not run yet: task_log() reads the logs of its last run")
        if attempt is None:
            attempt = task.attempts
            if not attempt:
                return ""
        elif not 1 <= attempt <= task.attempts:
            raise NoSuchAttemptError(name, attempt, task.attempts)
        return self._attempt_text(name, attempt)


def _default_workers() -> int:
    return max(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)
