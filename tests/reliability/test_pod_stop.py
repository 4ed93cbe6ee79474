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
    Scenario,
    children,
    grace_period_seconds,
    send_write,
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
    effects: Effects, start_service: Any, redis_client: Any
) -> None:
    env = {
        "WORKER_QUEUES": "default",
        "WORKER_SOFT_SHUTDOWN_TIMEOUT": str(SOFT_SHUTDOWN),
        **CHAOS_TASKS,
    }
    short = [f"short-{i}" for i in range(2)]
    long = [f"long-{i}" for i in range(2)]
    queued = [f"queued-{i}" for i in range(4)]
    keys = short + long + queued
    differs = f"WORKER_SOFT_SHUTDOWN_TIMEOUT={SOFT_SHUTDOWN} (60), WORKER_CONCURRENCY=4 (2)"
    with Scenario("pod stop (SIGTERM, soft shutdown)", differs=differs) as sc:
        sc.measure = lambda: effects.figures(keys, redis_client)
        sc.recovered = lambda: effects.done_at(keys)
        first = start_service("worker-high", WORKER_CONCURRENCY="4", **env).wait_ready()
        results = [send_write(app, k, 1.5) for k in short]
        results += [send_write(app, k, 2 * SOFT_SHUTDOWN) for k in long]
        wait_until(lambda: len(effects.attempts()) == 4, 30, what="four tasks running")
        results += [send_write(app, k, 0.2) for k in queued]
        first_pids = {first.proc.pid, *children(first.proc.pid)}

        first.proc.send_signal(signal.SIGTERM)
        sc.fault_at = time.time()
        code = first.proc.wait(timeout=SOFT_SHUTDOWN + 60)
        exit_s = time.time() - sc.fault_at
        log = first.output
        done_by_first = effects.effects()
        grace = grace_period_seconds()
        sc.details.update(worker_exit_s=round(exit_s, 1), grace_period_s=grace)

        start_service("worker-high", WORKER_CONCURRENCY="2", **env).wait_ready()
        for result in results:
            assert result.get(timeout=60) in set(keys)
        done = effects.effects()
        attempts = effects.attempt_counts()
        figures = effects.figures(keys, redis_client)
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
