"""Scenario 1: a worker killed mid-task (SIGKILL of a prefork child, of the whole pod).

acks_late + task_reject_on_worker_lost: the message of a task whose process died goes back to
the queue (at once when the main process sees its child die; after the visibility timeout when
the whole worker died), and the task is completed exactly once in effect. A message that kills
its worker every time is failed as poison after MAX_DELIVERIES instead of looping.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from reliability_helpers import (
    CHAOS_TASKS,
    RESTORE_SWEEP,
    SHORT_LIMITS,
    VISIBILITY_TIMEOUT,
    Effects,
    alive,
    children,
    kill_group,
    record,
    wait_until,
)

from tasks.celery_app import app


@pytest.fixture
def effects(clean_db: str, redis_client: Any) -> Any:
    redis_client.flushdb()
    fx = Effects(os.environ["DATABASE_URL"]).reset()
    yield fx
    fx.close()


def start_worker(start_service: Any, **env: str) -> Any:
    return start_service(
        "worker-high",
        WORKER_QUEUES="default",
        WORKER_CONCURRENCY="2",
        **CHAOS_TASKS,
        **SHORT_LIMITS,
        **env,
    ).wait_ready()


def send_writes(keys: list[str], seconds: float) -> list[Any]:
    return [app.send_task("chaos.write", args=[k, seconds]) for k in keys]


def running(effects: Effects, pids: list[int]) -> dict[str, int]:
    """key -> pid of attempts still running in one of `pids` (started, not committed)."""
    done = effects.effects()
    out: dict[str, int] = {}
    for key, pid, _ in effects.attempts():
        if pid in pids and key not in done:
            out[key] = pid
    return out


def test_sigkill_of_a_prefork_child_redelivers_at_once(
    effects: Effects, start_service: Any
) -> None:
    worker = start_worker(start_service)
    keys = [f"child-{i}" for i in range(4)]
    results = send_writes(keys, seconds=2.0)
    killed: dict[str, float] = {}
    for _ in range(2):  # two kills, each of a child in the middle of a task
        busy = wait_until(
            lambda: {
                k: p
                for k, p in running(effects, children(worker.proc.pid)).items()
                if k not in killed
            },
            30,
            what="a child running a task",
        )
        time.sleep(0.5)
        key, pid = next(iter(busy.items()))
        os.kill(pid, signal.SIGKILL)
        killed[key] = time.time()
        wait_until(lambda pid=pid: not alive(pid), 10)
    for result in results:
        assert result.get(timeout=60) in set(keys)
    done = effects.effects()
    attempts = effects.attempt_counts()
    figures = effects.figures(keys)
    recover = max(done[k][2] - t for k, t in killed.items())
    # A requeued message goes to the back of its queue: measure when it started again.
    restarted = {k: max(at for key, _, at in effects.attempts() if key == k) for k in killed}
    redelivery = max(restarted[k] - t for k, t in killed.items())
    record(
        "worker child SIGKILL",
        **figures,
        recover_s=recover,
        redelivered=sum(1 for k in keys if attempts[k] > 1),
        redelivery_s=round(redelivery, 1),
    )
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert {k: attempts[k] for k in killed} == dict.fromkeys(killed, 2)  # ran again, once
    assert all(attempts[k] == 1 for k in keys if k not in killed)
    # Requeued by the main process at once, not after the visibility timeout.
    assert redelivery < VISIBILITY_TIMEOUT / 2, redelivery
    assert worker.output.count("exited with 'signal 9 (SIGKILL)'") == 2
    assert app.send_task("ping").get(timeout=30) == "pong"


@pytest.mark.slow
def test_sigkill_of_the_whole_worker_redelivers_after_the_visibility_timeout(
    effects: Effects, start_service: Any
) -> None:
    first = start_worker(start_service)
    keys = [f"pod-{i}" for i in range(6)]
    results = send_writes(keys, seconds=3.0)
    in_flight = wait_until(
        lambda: (r := running(effects, children(first.proc.pid))) and len(r) == 2 and r,
        30,
        what="both children busy",
    )
    kill_group(first.proc.pid)  # the pod dies: main process and children, no goodbye
    killed_at = time.time()
    first.proc.wait(timeout=10)
    # Its two messages are unacknowledged in Redis; the replacement worker takes the queue
    # at once and the two after the visibility timeout.
    start_worker(start_service)
    for result in results:
        assert result.get(timeout=VISIBILITY_TIMEOUT + RESTORE_SWEEP + 40) in set(keys)
    done = effects.effects()
    attempts = effects.attempt_counts()
    figures = effects.figures(keys)
    recover = max(done[k][2] for k in in_flight) - killed_at
    record(
        "worker SIGKILL (whole pod)",
        **figures,
        recover_s=recover,
        redelivered=sum(1 for k in keys if attempts[k] > 1),
    )
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert {k: attempts[k] for k in in_flight} == dict.fromkeys(in_flight, 2)
    assert all(attempts[k] == 1 for k in keys if k not in in_flight)
    # Redelivered once the visibility timeout passed, at the next sweep, then run (3 s).
    assert recover <= VISIBILITY_TIMEOUT + RESTORE_SWEEP + 3 + 5


def test_a_message_that_kills_its_worker_every_time_is_failed_as_poison(
    effects: Effects, start_service: Any
) -> None:
    worker = start_worker(start_service)
    started = time.time()
    result = app.send_task("chaos.suicide", args=["poison"])
    outcome = result.get(timeout=60, propagate=False)
    elapsed = time.time() - started
    attempts = effects.attempt_counts()["poison"]
    record(
        "poison message (kills its worker)",
        sent=1,
        completed=1 if result.state == "FAILURE" else 0,
        duplicated=0,
        lost=0 if result.ready() else 1,
        recover_s=elapsed,
        deliveries=attempts,
    )
    assert result.state == "FAILURE"
    assert type(outcome).__name__ == "PoisonMessage", outcome
    assert "delivered 4 times (max 3)" in str(outcome)
    assert attempts == 3  # MAX_DELIVERIES runs, then failed without running
    assert worker.output.count("exited with 'signal 9 (SIGKILL)'") == 3
    time.sleep(2)
    assert effects.attempt_counts()["poison"] == 3  # not looping
    assert app.send_task("ping").get(timeout=30) == "pong"
