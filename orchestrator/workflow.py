"""``Workflow``: a named set of tasks with dependencies, and the way to run it."""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator, Mapping, Optional

from orchestrator import dag
from orchestrator.backends.local import DEFAULT_MAX_WORKERS, LocalBackend
from orchestrator.coordinator import Coordinator, ProgressCallback
from orchestrator.logs import LogSource, MemoryLogs, RedisLogs, attempt_log, log_text
from orchestrator.scheduler import Scheduler
from orchestrator.task import Task
from shared import context
from shared.config import check_log_settings
from shared.connection import connect
from shared.errors import DuplicateTaskError, NoSuchAttemptError, UnknownTaskError, WorkflowError
from shared.params import round_trip
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
        self.params: dict[str, Any] = {}
        """The parameters of the last run (``run(params=...)``), as its tasks saw them."""
        self.retries = 0
        """Times the last run was rerun from failure (:meth:`retry`)."""
        self._last_run: Optional[dict[str, Any]] = None
        self.last_run_id: Optional[str] = None
        """The id of the last distributed run (set when it is submitted), else None."""
        self._log_source: Optional[LogSource] = None

    def add_task(self, task: Task) -> Task:
        """Add ``task``; a second task with the same name raises :class:`DuplicateTaskError`."""
        if not isinstance(task, Task):
            raise WorkflowError(f"add_task() takes a Task, not {type(task).__name__}")
        if task.name in self.tasks:
            raise DuplicateTaskError(task.name)
        if isinstance(task.dependencies, list):
            _share_names(task.dependencies, self.tasks)
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
        """``{name: result}`` of the tasks that succeeded in the last run (a mapped task's children are
        in ``tasks``, their results in the mapped task's list)."""
        return {name: t.result for name, t in self.tasks.items()
                if t.state is TaskState.SUCCESS and t.map_parent is None}

    def run(
        self,
        max_workers: Optional[int] = None,
        *,
        redis_url: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
        params: Optional[Mapping[str, Any]] = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Run every task once its dependencies succeeded; return ``{name: result}`` of the successes.

        Locally, ``max_workers`` attempts run at once (default 4). With
        ``redis_url`` the run goes to the workers listening on the tasks'
        queues; ``options`` are those of :func:`orchestrator.distributed.run_distributed`.
        The run's id is then in ``last_run_id``. ``params`` (names to values the
        codec encodes; checked before anything runs) are what every task reads as
        ``current_task().params``. Each call starts a fresh run; :meth:`retry`
        starts the last one again from where it failed.
        """
        checked = round_trip(params)
        for name in [name for name, task in self.tasks.items() if task.map_parent is not None]:
            del self.tasks[name]  # a mapped task's children of an earlier run
        for task in self.tasks.values():
            task.reset()
        self.params, self.retries = checked, 0
        self._log_source = None
        if redis_url is not None:
            from orchestrator.distributed import run_distributed

            def submitted(run_id: str) -> None:
                self._read_logs_from(RedisLogs(connect(redis_url, check=False), run_id))
                if on_submitted is not None:
                    on_submitted(run_id)

            on_submitted = options.pop("on_submitted", None)
            self._last_run = {"redis_url": redis_url, **options}
            run_distributed(self, redis_url, on_progress=on_progress, params=params, on_submitted=submitted,
                            **options)
            return self.results
        if options:
            raise TypeError(f"unexpected options for a local run: {', '.join(sorted(options))}")
        check_log_settings()
        self._last_run = {"max_workers": max_workers}
        self._run_locally(Scheduler(self.tasks.values(), self.validate()), [], max_workers, on_progress)
        return self.results

    def retry(self, tasks: Iterable[str] = (), *, on_progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
        """Start the last run again from where it failed, on the backend it ran on; return
        ``{name: result}`` of the successes, like :meth:`run`.

        Succeeded tasks keep their results and do not run again; failed, upstream-failed
        and cancelled tasks, the tasks named in ``tasks`` (even if they succeeded) and
        everything downstream of those run again, with fresh attempt budgets; attempt
        numbers keep growing and each task's earlier attempts stay in ``Task.history``.
        Embedded runs are rerun in memory from the Task objects; distributed ones are the
        same run in Redis (:func:`orchestrator.distributed.retry_run`), driven to its end.
        """
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if self._last_run is None:
            raise WorkflowError("retry() reruns the last run of this workflow, and it has not run yet: call run()")
        redis_url = self._last_run.get("redis_url")
        if redis_url is not None:
            self._retry_distributed(redis_url, names, on_progress)
            return self.results
        restored = {name: (t.state, t.attempts, t.error, t.attempt_base) for name, t in self.tasks.items()}
        graph_tasks = [task for task in self.tasks.values() if task.map_parent is None]
        scheduler, _ = Scheduler.restore(graph_tasks, restored, 0.0, dag.validate({t.name: t for t in graph_tasks}),
                                         expansions(self.tasks.values(), len(graph_tasks)))
        if not scheduler.finished:
            raise WorkflowError("retry() needs a finished run; the last run of this workflow did not finish")
        actions = scheduler.rerun(names, time.time())
        self.retries += 1
        self._run_locally(scheduler, actions, self._last_run["max_workers"], on_progress)
        return self.results

    def _run_locally(self, scheduler: Scheduler, actions: list, max_workers: Optional[int],
                     on_progress: Optional[ProgressCallback]) -> None:
        logs = self._log_source if isinstance(self._log_source, MemoryLogs) else None  # a rerun adds to them
        backend = LocalBackend(self.tasks, max_workers or _default_workers(), run_id=f"local-{os.getpid()}",
                               params=self.params, logs=logs)
        self._read_logs_from(backend.logs)
        try:
            coordinator = Coordinator(self.tasks, backend, on_progress=on_progress, scheduler=scheduler)
            coordinator.apply(actions)
            coordinator.run()
        finally:
            backend.close()

    def _retry_distributed(self, redis_url: str, names: list[str], on_progress: Optional[ProgressCallback]) -> None:
        from orchestrator.distributed import retry_run
        from orchestrator.run_store import load_history
        from shared.connection import connect

        run_id, last_run = self.last_run_id, self._last_run
        assert run_id is not None and last_run is not None  # retry() calls this after a distributed run only
        connection = connect(redis_url)
        try:
            _, stored = retry_run(connection, run_id, names, on_progress=on_progress,
                                  settings=last_run.get("settings"))
            load_history(connection, run_id, stored)
        finally:
            connection.close()
        for name, task in self.tasks.items():
            task.take_outcome(stored[name])
        self.retries += 1

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



def expansions(tasks: Iterable[Task], first: int) -> list[tuple[str, int, int]]:
    """The expansions of mapped tasks as ``Scheduler.restore`` takes them, from the children among
    ``tasks`` (in the order they were made), numbered from ``first``."""
    counts: dict[str, int] = {}
    for task in tasks:
        if task.map_parent is not None:
            counts[task.map_parent] = counts.get(task.map_parent, 0) + 1
    out = []
    for name, count in counts.items():
        out.append((name, first, count))
        first += count
    return out


def _default_workers() -> int:
    return max(DEFAULT_MAX_WORKERS, os.cpu_count() or 1)


def _share_names(dependencies: list[str], tasks: Mapping[str, Task]) -> None:
    """Point each dependency naming a task already added at that task's own name string.

    The caller usually makes each dependency's name anew (``f"t{i}"``): at 100,000 tasks the
    copies are about 13 MB that a run's coordinator would otherwise hold as long as the Task
    objects. Equal strings, so nothing else changes."""
    for k, dep in enumerate(dependencies):
        known = tasks.get(dep)
        if known is not None:
            dependencies[k] = known.name
