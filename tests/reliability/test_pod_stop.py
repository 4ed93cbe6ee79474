"""Scenario 2: pod stop (SIGTERM to the worker's main process, as a rollout or an HPA
scale-down sends it).

services/worker-*/run set REMAP_SIGTERM=SIGQUIT: the SIGTERM starts a soft shutdown. Running
tasks get WORKER_SOFT_SHUTDOWN_TIMEOUT seconds: the short ones finish, the long ones are then
stopped and their messages go back to the queue ("Restoring N unacknowledged message(s)"), where
another worker finishes them. The worker is gone well before the pod's grace period ends.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from reliability_helpers import (
    CHAOS_TASKS,
    Effects,
    children,
    grace_period_seconds,
    record,
    wait_until,
)

from tasks.celery_app import app

SOFT_SHUTDOWN = 4


@pytest.fixture
def effects(clean_db: str, redis_client: Any) -> Any:
    redis_client.flushdb()
    fx = Effects(os.environ["DATABASE_URL"]).reset()
    yield fx
    fx.close()


@pytest.mark.slow
def test_sigterm_finishes_short_tasks_and_requeues_long_ones(
    effects: Effects, start_service: Any
) -> None:
    env = {
        "WORKER_QUEUES": "default",
        "WORKER_SOFT_SHUTDOWN_TIMEOUT": str(SOFT_SHUTDOWN),
        **CHAOS_TASKS,
    }
    first = start_service("worker-high", WORKER_CONCURRENCY="4", **env).wait_ready()
    short = [f"short-{i}" for i in range(2)]
    long = [f"long-{i}" for i in range(2)]
    queued = [f"queued-{i}" for i in range(4)]
    results = [app.send_task("chaos.write", args=[k, 1.5]) for k in short]
    results += [app.send_task("chaos.write", args=[k, 2 * SOFT_SHUTDOWN]) for k in long]
    wait_until(lambda: len(effects.attempts()) == 4, 30, what="four tasks running")
    results += [app.send_task("chaos.write", args=[k, 0.2]) for k in queued]
    time.sleep(0.3)
    first_pids = {first.proc.pid, *children(first.proc.pid)}

    first.proc.send_signal(signal.SIGTERM)
    stopped_at = time.time()
    code = first.proc.wait(timeout=SOFT_SHUTDOWN + 60)
    exit_s = time.time() - stopped_at
    log = first.output
    done_by_first = effects.effects()

    start_service("worker-high", WORKER_CONCURRENCY="2", **env).wait_ready()
    for result in results:
        assert result.get(timeout=60) in set(short + long + queued)
    keys = short + long + queued
    done = effects.effects()
    attempts = effects.attempt_counts()
    figures = effects.figures(keys)
    grace = grace_period_seconds()
    record(
        "pod stop (SIGTERM, soft shutdown)",
        **figures,
        recover_s=max(at for _, _, at in done.values()) - stopped_at,
        worker_exit_s=round(exit_s, 1),
        grace_period_s=grace,
        requeued=sum(1 for k in keys if attempts[k] > 1),
    )
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    # The short tasks finished on the stopping worker, once.
    assert set(short) <= set(done_by_first)
    assert all(attempts[k] == 1 for k in short)
    # The long ones were stopped and handed back; the second worker ran them once more.
    assert "Initiating Soft Shutdown" in log
    assert "Restoring 2 unacknowledged message(s)" in log
    assert not set(long) & set(done_by_first)
    assert all(attempts[k] == 2 for k in long)
    assert first_pids.isdisjoint(done[k][1] for k in long + queued)
    # The queued ones were never taken by the stopping worker.
    assert all(attempts[k] == 1 for k in queued)
    # Gone in time: soft shutdown plus a little, far inside the pod's grace period.
    assert code == 0, log[-2000:]
    assert exit_s < SOFT_SHUTDOWN + 15
    assert exit_s < (grace if grace is not None else SOFT_SHUTDOWN + 30)
