"""Test-only tasks, loaded into a worker with WAARDHAVEN_EXTRA_TASK_MODULES=extra_tasks
(and tests/support on PYTHONPATH). Never part of the product."""

from __future__ import annotations

import time

from tasks.celery_app import app


@app.task(name="test.sleep", bind=True)
def sleep(self: object, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="test.fail")
def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@app.task(name="test.mark")
def mark(key: str) -> str:
    """An effect a test can look for: sets `key` in Redis."""
    import os

    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.set(key, "ran")
    client.close()
    return key
