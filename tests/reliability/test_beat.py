"""Scenario 5: beat. Two beat processes started at once (a rollout overlap) send each due
entry once, not twice (RedBeat's lock in Redis); a beat restart neither replays an entry
already sent nor skips one that fell due while no beat ran.

compute_index runs every minute here (SCHEDULE_COMPUTE_INDEX="* * * * *"); no worker runs, so
what beat sent waits in the queues and is counted there. One minute boundary is enough:

  a beat runs and is stopped before the boundary T (it sent nothing: no replay at start);
  after T, two beats start at once: the entry missed at T is sent once (not skipped, not twice);
  the lock holder is SIGKILLed: the standby takes over and does not send T again (no replay).
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from typing import Any

import pytest
import redis
from reliability_helpers import record, wait_until

from conftest import RedisServer

LOCK_TIMEOUT = 5
QUEUES = ("high_priority", "low_priority", "default")


@pytest.fixture
def broker() -> Any:
    server = RedisServer(password=secrets.token_hex(12)).start()
    yield server
    server.close()


def sent_tasks(client: redis.Redis) -> list[tuple[str, str]]:
    """(task name, id) of every message waiting in the queues."""
    out = []
    for queue in QUEUES:
        for raw in client.lrange(queue, 0, -1):
            headers = json.loads(raw)["headers"]
            out.append((headers["task"], headers["id"]))
    return out


@pytest.mark.slow
def test_two_beats_send_once_and_a_restart_neither_replays_nor_skips(
    broker: RedisServer, start_service: Any
) -> None:
    env = {
        "REDIS_URL": broker.url,
        "SCHEDULE_COMPUTE_INDEX": "* * * * *",
        "BEAT_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
    }
    client = redis.Redis.from_url(broker.url)
    # At least 12 s before the next minute boundary T, so the first beat starts and stops
    # before it.
    if time.time() % 60 > 48:
        time.sleep(61 - time.time() % 60)
    boundary = (int(time.time()) // 60 + 1) * 60

    first = start_service("beat", **env)
    wait_until(lambda: client.exists("waardhaven:redbeat:compute-index-hourly"), 20)
    time.sleep(2)
    assert first.stop(signal.SIGTERM, timeout=20) == 0
    assert time.time() < boundary - 1, "the first beat ran into the boundary"
    assert sent_tasks(client) == [], "a beat that starts sends nothing that is not due"

    time.sleep(max(0.0, boundary + 2 - time.time()))
    a = start_service("beat", **env)  # a rollout overlap: two at once
    b = start_service("beat", **env)
    wait_until(lambda: sent_tasks(client), 20, 0.2, "the missed entry to be sent")
    time.sleep(6)  # both beats ticked many times (loop interval 1 s)
    after_overlap = sent_tasks(client)
    holder, standby = (a, b) if "Sending due task" in a.output else (b, a)

    holder.stop(signal.SIGKILL, timeout=10)  # the lock is not released: it must expire
    killed = time.time()
    wait_until(lambda: "beat: Acquired lock" in standby.output, LOCK_TIMEOUT + 15, 0.2)
    took_over = time.time() - killed
    time.sleep(4)
    after_restart = sent_tasks(client)
    standby.stop(signal.SIGTERM, timeout=20)

    names = [name for name, _ in after_restart]
    record(
        "beat: two at once, then holder SIGKILL",
        sent=1,
        completed=names.count("compute_index"),
        duplicated=max(0, len(names) - 1),
        lost=0 if "compute_index" in names else 1,
        recover_s=took_over,
    )
    assert [name for name, _ in after_overlap] == ["compute_index"]
    assert after_restart == after_overlap  # the new lock holder did not send T again
    assert "Sending due task" not in standby.output
    assert took_over <= LOCK_TIMEOUT + 3
