"""Test-only tasks for the observability tests, loaded into a worker with
WAARDHAVEN_EXTRA_TASK_MODULES=obs_tasks and tests/observability on PYTHONPATH.
Never part of the product.

The real tasks give successes (ping), failures (bad arguments: InvalidTaskArguments) and the
domain figures; these add what real tasks cannot be made to do on demand: a retry and a task
that outlives its time limits.
"""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from tasks.celery_app import app


@app.task(name="obs.flaky", bind=True, max_retries=3)
def flaky(self: Any, fails: int = 1) -> int:
    """Fails (and is retried after 0.1 s) `fails` times, then succeeds."""
    if self.request.retries < fails:
        raise self.retry(exc=RuntimeError("flaky"), countdown=0.1)
    return self.request.retries


@app.task(name="obs.sleep")
def sleep(seconds: float, ignore_soft_limit: bool = False) -> float:
    """Sleeps; with `ignore_soft_limit`, keeps sleeping past the soft limit (hard limit hit)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not ignore_soft_limit:
                raise
    return seconds
