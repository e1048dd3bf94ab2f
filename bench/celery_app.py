"""The Celery app of the optional Celery comparison (``pip install "celery[redis]"``).

Broker and result backend are the suite's redis-server, named by the
``BENCH_REDIS_URL`` environment variable. Workers: ``celery -A bench.celery_app
worker -Q bench --pool prefork -c N`` (started by the suite).
"""
from __future__ import annotations

import os

from celery import Celery

from bench import tasks as _tasks

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bench"

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(*args, **kwargs):
    return _tasks.noop(*args, **kwargs)


@app.task(name="bench.sleep_for")
def sleep_for(seconds, *args):
    return _tasks.sleep_for(seconds)
