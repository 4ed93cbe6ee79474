"""With a Celery or billiard other than the tested ones (tasks.compat.TESTED), the worker says
that it runs without its private hooks and stays correct: children are still recycled and every
task still runs once.

The "other version" is played by a sitecustomize module that changes TESTED before the worker
imports anything else: the installed libraries stay the real ones.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from tasks.celery_app import app

TASKS = 30


def test_worker_without_the_hooks_recycles_and_runs_every_task(
    start_service: Any, redis_client: Any, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            from tasks import compat
            compat.TESTED = {**compat.TESTED, "billiard": "0.0.0-untested"}
            """
        )
    )
    redis_client.flushdb()
    worker = start_service(
        "worker-low",
        PYTHONPATH=str(site),
        WORKER_MAX_TASKS_PER_CHILD="5",  # 30 tasks on 2 children: 6 recycles at least
        WORKER_CONCURRENCY="2",
    ).wait_ready(90)
    results = [app.send_task("ping", queue="default") for _ in range(TASKS)]
    assert [r.get(timeout=120) for r in results] == ["pong"] * TASKS
    log = worker.output
    assert "not installing the prefork pool patches" in log
    assert "not installing the task message check" in log
    assert "billiard 0.0.0-untested" in log
    # Recycled children: more child processes than the pool's two ran tasks.
    children = set(re.findall(r"ForkPoolWorker-\d+", log))
    assert len(children) > 2, children
