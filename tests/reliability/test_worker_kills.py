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
    Scenario,
    alive,
    children,
    kill_group,
    redis_leftovers,
    send_write,
    wait_until,
)

from tasks.celery_app import app

SHORT_VISIBILITY = (
    f"VISIBILITY_TIMEOUT={VISIBILITY_TIMEOUT} (7200): the dead pod's tasks come back in seconds"
)


@pytest.fixture
def effects(clean_db: str, redis_client: Any) -> Any:
    redis_client.flushdb()
    fx = Effects(os.environ["DATABASE_URL"]).reset()
    yield fx
    fx.close()


def start_worker(start_service: Any, **env: str) -> Any:
    """A worker on the default queue at production settings, plus `env`."""
    return start_service(
        "worker-high", WORKER_QUEUES="default", WORKER_CONCURRENCY="2", **CHAOS_TASKS, **env
    ).wait_ready()


def running(effects: Effects, pids: list[int]) -> dict[str, int]:
    """key -> pid of attempts still running in one of `pids` (started, not committed)."""
    done = effects.effects()
    out: dict[str, int] = {}
    for key, pid, _ in effects.attempts():
        if pid in pids and key not in done:
            out[key] = pid
    return out


def test_sigkill_of_a_prefork_child_redelivers_at_once(
    effects: Effects, start_service: Any, redis_client: Any
) -> None:
    keys = [f"child-{i}" for i in range(4)]
    killed: dict[str, float] = {}
    # The child kill needs no short visibility timeout: the main process requeues at once.
    with Scenario("worker child SIGKILL", differs="") as sc:
        worker = start_worker(start_service)
        sc.measure = lambda: effects.figures(keys, redis_client)
        sc.recovered = lambda: effects.done_at(killed)
        results = [send_write(app, k, 2.0) for k in keys]
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
            key, pid = next(iter(busy.items()))
            os.kill(pid, signal.SIGKILL)
            killed[key] = time.time()
            sc.fault_at = sc.fault_at or killed[key]
            wait_until(lambda pid=pid: not alive(pid), 10)
        for result in results:
            assert result.get(timeout=60) in set(keys)
        attempts = effects.attempt_counts()
        # A requeued message goes to the back of its queue: measure when it started again.
        restarted = {k: max(at for key, _, at in effects.attempts() if key == k) for k in killed}
        redelivery = max(restarted[k] - t for k, t in killed.items())
        sc.details["redelivery_s"] = round(redelivery, 1)
        figures = effects.figures(keys, redis_client)
        assert figures["lost"] == 0 and figures["duplicated"] == 0
        assert {k: attempts[k] for k in killed} == dict.fromkeys(killed, 2)  # ran again, once
        assert all(attempts[k] == 1 for k in keys if k not in killed)
        # Requeued by the main process at once, not after the visibility timeout.
        assert redelivery < VISIBILITY_TIMEOUT / 2, redelivery
        assert worker.output.count("exited with 'signal 9 (SIGKILL)'") == 2
        assert app.send_task("ping").get(timeout=30) == "pong"


@pytest.mark.slow
def test_sigkill_of_the_whole_worker_redelivers_after_the_visibility_timeout(
    effects: Effects, start_service: Any, redis_client: Any
) -> None:
    keys = [f"pod-{i}" for i in range(6)]
    in_flight: dict[str, int] = {}
    with Scenario("worker SIGKILL (whole pod)", differs=SHORT_VISIBILITY) as sc:
        sc.measure = lambda: effects.figures(keys, redis_client)
        sc.recovered = lambda: effects.done_at(in_flight)
        first = start_worker(start_service, **SHORT_LIMITS)
        results = [send_write(app, k, 3.0) for k in keys]
        in_flight.update(
            wait_until(
                lambda: (r := running(effects, children(first.proc.pid))) and len(r) == 2 and r,
                30,
                what="both children busy",
            )
        )
        kill_group(first.proc.pid)  # the pod dies: main process and children, no goodbye
        sc.fault_at = time.time()
        first.proc.wait(timeout=10)
        assert set(in_flight) <= set(redis_leftovers(redis_client)), "not unacknowledged"
        # Its two messages are unacknowledged in Redis; the replacement worker takes the queue
        # at once and the two after the visibility timeout.
        start_worker(start_service, **SHORT_LIMITS)
        for result in results:
            assert result.get(timeout=VISIBILITY_TIMEOUT + RESTORE_SWEEP + 40) in set(keys)
        attempts = effects.attempt_counts()
        figures = effects.figures(keys, redis_client)
        assert figures["lost"] == 0 and figures["duplicated"] == 0
        assert {k: attempts[k] for k in in_flight} == dict.fromkeys(in_flight, 2)
        assert all(attempts[k] == 1 for k in keys if k not in in_flight)
        # Redelivered once the visibility timeout passed, at the next sweep, then run (3 s).
        recover = (effects.done_at(in_flight) or 0) - sc.fault_at
        assert recover <= VISIBILITY_TIMEOUT + RESTORE_SWEEP + 3 + 5


def test_a_message_that_kills_its_worker_every_time_is_failed_as_poison(
    effects: Effects, start_service: Any, redis_client: Any
) -> None:
    result = app.AsyncResult("poison")

    def measure() -> dict[str, int]:
        deliveries = effects.attempt_counts()["poison"]
        waiting = "poison" in redis_leftovers(redis_client)
        failed = result.state == "FAILURE"
        return {
            "sent": 1,
            "completed": int(failed),
            "reran": int(deliveries > 1),
            "duplicated": 0,  # it has no effect to apply
            "lost": int(not failed and not waiting),
            "unfinished": int(not failed and waiting),
        }

    # "recover" here: from sending the poison until it is failed and out of the way.
    with Scenario("poison message (kills its worker)", differs="") as sc:
        sc.measure = measure
        worker = start_worker(start_service)
        failed_at: list[float] = []
        sc.recovered = lambda: failed_at[0] if failed_at else None
        sc.fault_at = time.time()
        app.send_task("chaos.suicide", args=["poison"], task_id="poison")
        outcome = result.get(timeout=60, propagate=False)
        failed_at.append(time.time())
        attempts = effects.attempt_counts()["poison"]
        sc.details["deliveries"] = attempts
        assert result.state == "FAILURE"
        assert type(outcome).__name__ == "PoisonMessage", outcome
        assert "delivered 4 times (max 3)" in str(outcome)
        assert attempts == 3  # MAX_DELIVERIES runs, then failed without running
        assert worker.output.count("exited with 'signal 9 (SIGKILL)'") == 3
        time.sleep(2)
        assert effects.attempt_counts()["poison"] == 3  # not looping
        assert "poison" not in redis_leftovers(redis_client)
        assert app.send_task("ping").get(timeout=30) == "pong"
