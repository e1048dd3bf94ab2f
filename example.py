"""The seed example: extract -> transform -> load, with one flaky task that a retry fixes.

Run it directly::

    python example.py

or through the CLI (locally, or on workers started with ``orch worker --path .``)::

    orch submit example.py
    orch --redis-url redis://localhost:6379/0 submit example.py

Every task function is defined at module level (no lambdas, no closures):
remote workers import them by name (``example:extract``), so they must be
importable from this file.

        task1 (extract)
         /          \\
    task2         task3 (fetch_rates, flaky: fails once, then a retry succeeds)
  (transform)        |
         \\          /
          task4 (load)
"""
import time

from orchestrator import current_task
from workflow import Task, Workflow


def extract():
    """Read the raw rows."""
    return {"rows": [3, 1, 4, 1, 5, 9, 2, 6]}


def transform():
    """Clean the rows extracted by task1."""
    data = workflow.get_task_result("task1")
    return sorted(row * 10 for row in data["rows"])


def fetch_rates():
    """Fail on the first attempt of each run, succeed on the retry.

    ``current_task().attempt`` is the number of the attempt running now (1, 2, ...),
    on the embedded backend and on remote workers alike.
    """
    if current_task().attempt == 1:
        raise ConnectionError("rates service unavailable (the first attempt always fails; the retry succeeds)")
    return {"EUR": 1.0, "USD": 1.08}


def load():
    """Combine the transformed rows and the rates into the final report."""
    rows = workflow.get_task_result("task2")
    rates = workflow.get_task_result("task3")
    time.sleep(0.1)
    return {"loaded": len(rows), "total_usd": round(sum(rows) * rates["USD"], 2)}


workflow = Workflow()
workflow.add_task(Task(name="task1", func=extract))
workflow.add_task(Task(name="task2", func=transform, dependencies=["task1"]))
workflow.add_task(Task(name="task3", func=fetch_rates, dependencies=["task1"], max_retries=2, retry_delay=0.5))
workflow.add_task(Task(name="task4", func=load, dependencies=["task2", "task3"], timeout=30))


if __name__ == "__main__":
    results = workflow.run()
    print("results:", results)
    for task in workflow:
        duration = f"{task.duration:.2f}s" if task.duration is not None else "-"
        line = f"{task.name}: {task.state} after {task.attempts} attempt(s) in {duration}"
        print(line + (f" (last error: {task.error})" if task.error else ""))
    raise SystemExit(0 if len(results) == len(workflow) else 1)
