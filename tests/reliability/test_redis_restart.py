"""Scenario 3: Redis restarts with append-only persistence (as the chart runs it).

1,000 queued tasks survive a restart, by SIGTERM and by SIGKILL (after appendfsync everysec
has had its second), and all complete. The worker and beat connected before the restarts
reconnect by themselves and go on working (celery#10205: workers that reconnect but stop
consuming); tasks running during the restart are completed once.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from reliability_helpers import (
    CHAOS_TASKS,
    RESTORE_SWEEP,
    SHORT_LIMITS,
    VISIBILITY_TIMEOUT,
    Effects,
    alive,
    producer,
    record,
    wait_until,
)

from conftest import RedisServer

QUEUED = 1000


@pytest.fixture
def broker() -> Any:
    server = RedisServer(password=secrets.token_hex(12), appendonly=True).start()
    yield server
    server.close()


@pytest.fixture
def effects(clean_db: str) -> Any:
    fx = Effects(os.environ["DATABASE_URL"]).reset()
    yield fx
    fx.close()


@pytest.mark.slow
def test_queued_tasks_survive_redis_restarts_and_everyone_reconnects(
    broker: RedisServer, effects: Effects, start_service: Any, tmp_path: Path
) -> None:
    env = {"REDIS_URL": broker.url, **CHAOS_TASKS, **SHORT_LIMITS}
    worker = start_service(
        "worker-high", WORKER_QUEUES="high_priority,default", WORKER_CONCURRENCY="2", **env
    ).wait_ready()
    beat = start_service("beat", BEAT_LOCK_TIMEOUT="5", **env)
    client = producer(broker.url)
    r = redis.Redis.from_url(broker.url)
    wait_until(lambda: r.exists("waardhaven:redbeat::lock"), 30, what="beat's lock")

    queued = [f"queued-{i}" for i in range(QUEUED)]
    for key in queued:  # on a queue no worker consumes yet
        client.send_task("chaos.write", args=[key, 0], queue="low_priority")
    in_flight = ["running-0", "running-1"]
    for key in in_flight:  # running on the worker while Redis goes away
        client.send_task("chaos.write", args=[key, 3], queue="default")
    wait_until(lambda: len(effects.attempts()) == 2, 30, what="two tasks running")
    assert r.llen("low_priority") == QUEUED
    r.close()

    sent = list(queued) + in_flight
    reconnect: dict[str, float] = {}
    for how in (signal.SIGTERM, signal.SIGKILL):
        time.sleep(1.2)  # appendfsync everysec: what is older than a second is on disk
        broker.stop(how)
        time.sleep(2)
        broker.start()
        up = time.time()
        r = redis.Redis.from_url(broker.url)
        assert r.llen("low_priority") == QUEUED, f"queue lost messages after {how.name}"
        # The worker that was connected before consumes again, by itself.
        after = [f"after-{how.name}-{i}" for i in range(20)]
        sent += after
        for key in after:
            client.send_task("chaos.write", args=[key, 0], queue="default")
        wait_until(lambda after=after: set(after) <= set(effects.effects()), 60, 0.2, "worker")
        reconnect[how.name] = min(effects.effects()[k][2] for k in after) - up
        # Beat is alive and ticking again: its heartbeat is fresh and it holds its lock.
        heartbeat = Path(beat.env["HEALTH_DIR"]) / "beat-heartbeat"
        wait_until(lambda hb=heartbeat, up=up: hb.stat().st_mtime > up, 30, what="beat heartbeat")
        wait_until(lambda r=r: r.exists("waardhaven:redbeat::lock"), 30, what="beat's lock")
        assert alive(beat.proc.pid) and alive(worker.proc.pid)
        r.close()

    # A worker for the queue that waited through both restarts drains it.
    started = time.time()
    start_service("worker-low", WORKER_QUEUES="low_priority", WORKER_CONCURRENCY="4", **env)
    wait_until(
        lambda: set(sent) <= set(effects.effects()),
        120 + VISIBILITY_TIMEOUT + RESTORE_SWEEP,
        0.5,
        "every task's effect",
    )
    drain_s = time.time() - started
    figures = effects.figures(sent)
    attempts = effects.attempt_counts()
    record(
        "Redis restart (AOF; SIGTERM, then SIGKILL)",
        **figures,
        recover_s=max(reconnect.values()),
        queued_through_restarts=QUEUED,
        drain_s=round(drain_s, 1),
        redelivered=sum(1 for k in sent if attempts[k] > 1),
    )
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert all(attempts[k] == 1 for k in queued)
    assert "Connection to broker lost" in worker.output
    assert "Traceback" not in beat.output, beat.output[-3000:]
