"""Scenario 5: beat. Two beat processes started at once (a rollout overlap) send each due
entry once, not twice (RedBeat's lock in Redis); a beat restart neither replays an entry
already sent nor skips one that fell due while no beat ran; after the lock holder's SIGKILL
the standby takes over and SENDS the next due entry (its message, from its process, is seen
in the queue).

compute_index runs every minute here (SCHEDULE_COMPUTE_INDEX="* * * * *"); no worker runs, so
what beat sent waits in the queues and is counted there:

  a beat runs and is stopped before the boundary T (it sent nothing: no replay at start);
  after T, two beats start at once: the entry missed at T is sent once (not skipped, not twice);
  the lock holder is SIGKILLed: the standby takes over, does not send T again (no replay), and
  sends T + 60 s once, on time.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from typing import Any

import pytest
import redis
from reliability_helpers import QUEUES, Scenario, wait_until

from conftest import RedisServer

LOCK_TIMEOUT = 5


@pytest.fixture
def broker() -> Any:
    server = RedisServer(password=secrets.token_hex(12)).start()
    yield server
    server.close()


def sent_tasks(client: redis.Redis) -> list[tuple[str, str, str]]:
    """(task name, id, origin: 'gen<pid>@host' of the sender) of every message in the queues."""
    out = []
    for queue in QUEUES:
        for raw in client.lrange(queue, 0, -1):
            headers = json.loads(raw)["headers"]
            out.append((headers["task"], headers["id"], headers.get("origin", "")))
    return out


@pytest.mark.slow
def test_two_beats_send_once_and_the_standby_sends_after_the_holder_dies(
    broker: RedisServer, start_service: Any
) -> None:
    env = {
        "REDIS_URL": broker.url,
        "SCHEDULE_COMPUTE_INDEX": "* * * * *",
        "BEAT_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
    }
    client = redis.Redis.from_url(broker.url)
    seen: dict[str, float] = {}  # message id -> when it was first seen in the queue

    def watch() -> list[tuple[str, str, str]]:
        tasks = sent_tasks(client)
        for _, task_id, _ in tasks:
            seen.setdefault(task_id, time.time())
        return tasks

    # The boundary T at least 40 s away, so the first beat starts and stops before it (a
    # beat takes seconds to start on a busy machine).
    boundary = (int(time.time() + 40) // 60 + 1) * 60
    due = [boundary, boundary + 60]
    overlap: list[float] = []  # when the two beats started

    def measure() -> dict[str, int]:
        names = [name for name, _, _ in watch()]
        # entries that fell due while the two beats ran
        passed = sum(1 for d in due if overlap and time.time() > d + 2)
        sent = min(names.count("compute_index"), passed)
        return {
            "sent": passed,  # due entries: each must be sent once
            "completed": sent,
            "reran": 0,
            "duplicated": max(0, names.count("compute_index") - passed),
            "lost": passed - sent,
            "unfinished": 0,
        }

    differs = f"BEAT_LOCK_TIMEOUT={LOCK_TIMEOUT} (60); compute_index every minute (hourly)"
    # recover: from the holder's SIGKILL until the next due entry is sent (by the standby).
    with Scenario("beat: two at once, holder SIGKILL, standby sends", differs=differs) as sc:
        sc.measure = measure
        sc.recovered = lambda: max(seen.values()) if len(seen) == 2 else None
        first = start_service("beat", **env)
        wait_until(lambda: client.exists("waardhaven:redbeat:compute-index-hourly"), 30)
        time.sleep(2)
        assert first.stop(signal.SIGTERM, timeout=20) == 0
        assert time.time() < boundary - 1, "the first beat ran into the boundary"
        assert watch() == [], "a beat that starts sends nothing that is not due"

        time.sleep(max(0.0, boundary + 2 - time.time()))
        a = start_service("beat", **env)  # a rollout overlap: two at once
        b = start_service("beat", **env)
        overlap.append(time.time())
        wait_until(watch, 40, 0.2, "the missed entry to be sent")
        time.sleep(6)  # both beats ticked many times (loop interval 1 s)
        after_overlap = watch()
        holder, standby = (a, b) if "Sending due task" in a.output else (b, a)
        assert [n for n, _, _ in after_overlap] == ["compute_index"]
        assert after_overlap[0][2].startswith(f"gen{holder.proc.pid}@"), after_overlap

        holder.stop(signal.SIGKILL, timeout=10)  # the lock is not released: it must expire
        sc.fault_at = time.time()
        wait_until(lambda: "beat: Acquired lock" in standby.output, LOCK_TIMEOUT + 15, 0.2)
        sc.details["lock_takeover_s"] = round(time.time() - sc.fault_at, 1)
        assert watch() == after_overlap  # the new lock holder did not send T again
        # The next entry falls due at T + 60: the standby sends it, once.
        wait_until(lambda: len(watch()) == 2, due[1] + 20 - time.time(), 0.1, "next entry")
        time.sleep(3)
        tasks = watch()
        standby.stop(signal.SIGTERM, timeout=20)
        assert [n for n, _, _ in tasks] == ["compute_index"] * 2
        ((_, next_id, origin),) = [t for t in tasks if t not in after_overlap]
        late = seen[next_id] - due[1]
        sc.details["next_entry_sent_late_s"] = round(late, 1)
        assert origin.startswith(f"gen{standby.proc.pid}@"), (tasks, standby.proc.pid)
        assert -1 < late < 3  # on time (beat's loop ticks every second)
