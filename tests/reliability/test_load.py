"""Scenario 8: load. A sustained mixed workload of 20,000 tasks on both worker services (tasks
that write a row to PostgreSQL, tasks that fail once and are retried, tasks that always fail),
with worker-low SIGKILLed halfway (its in-flight tasks come back only after the visibility
timeout, and only worker-low consumes their queue). Every task is accounted for from state:
effects in PostgreSQL, states in the result backend, leftovers in Redis. Worker memory (main
process + prefork children, from /proc) stays flat while children are recycled every
WORKER_MAX_TASKS_PER_CHILD tasks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from typing import Any

import pytest
from reliability_helpers import (
    CHAOS_TASKS,
    SHORT_LIMITS,
    VISIBILITY_TIMEOUT,
    Effects,
    Scenario,
    children,
    kill_group,
    redis_leftovers,
    rss_kib,
    wait_until,
)

from tasks.celery_app import app
from tasks.settings import Settings

TOTAL = int(os.environ.get("CHAOS_LOAD_TASKS", "20000"))
# Upper bound of each wait, for a slow machine (2 shared cores: 20-100 tasks/s).
LIMIT = max(300.0, TOTAL / 10)
PRODUCTION_MAX_TASKS_PER_CHILD = Settings.model_fields["worker_max_tasks_per_child"].default
# Children are recycled every this many tasks: the production value (50), hundreds of recycles
# in one run (cheap since tasks/prefork.py; CHAOS_LOAD_MAX_TASKS_PER_CHILD changes it).
MAX_TASKS_PER_CHILD = int(
    os.environ.get("CHAOS_LOAD_MAX_TASKS_PER_CHILD", str(PRODUCTION_MAX_TASKS_PER_CHILD))
)


class MemorySampler(threading.Thread):
    """RSS (KiB) of each worker's main process and children, every second."""

    def __init__(self, workers: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.workers = workers
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            for name, service in list(self.workers.items()):
                pid = service.proc.pid
                kids = children(pid)
                self.samples.append(
                    {
                        "t": time.time(),
                        "worker": name,
                        "pid": pid,
                        "main": rss_kib(pid),
                        "kids": kids,
                        "children": [rss_kib(k) for k in kids],
                    }
                )


def plan() -> list[tuple[str, str, list[Any], str]]:
    """(id, task, args, queue), interleaved: a steady mix on both queues. Tasks with an effect
    use their key as task id (their rows in PostgreSQL map back to them)."""
    jobs: list[tuple[str, str, list[Any], str]] = []
    for i in range(TOTAL):
        queue = "high_priority" if i % 2 else "low_priority"
        key = f"k{i}"
        if i % 20 == 7:
            jobs.append((key, "chaos.flaky", [key, 1], queue))
        elif i % 20 == 13:
            jobs.append((f"fail-{i}", "test.fail", [f"expected failure {i}"], queue))
        else:
            jobs.append((key, "chaos.write", [key, 0], queue))
    return jobs


def states(client: Any, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """task id -> (state, date_done) from the result backend."""
    out: dict[str, tuple[str, str | None]] = {}
    for start in range(0, len(ids), 1000):
        batch = ids[start : start + 1000]
        for task_id, raw in zip(
            batch, client.mget([f"celery-task-meta-{i}" for i in batch]), strict=True
        ):
            meta = json.loads(raw) if raw else {"status": "PENDING"}
            out[task_id] = (meta["status"], meta.get("date_done"))
    return out


def in_flight(client: Any, queues: tuple[str, ...]) -> set[str]:
    """Ids of the messages delivered from `queues` and not acknowledged (Redis `unacked`)."""
    ids = set()
    for raw in client.hvals("unacked"):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues:
            ids.add(message["headers"]["id"])
    return ids


@pytest.mark.slow
def test_twenty_thousand_tasks_all_accounted_for_through_a_worker_low_sigkill(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    redis_client.flushdb()
    fx = Effects(clean_db).reset()
    env = {
        **CHAOS_TASKS,
        **SHORT_LIMITS,
        "WORKER_CONCURRENCY": "2",
        "WORKER_MAX_TASKS_PER_CHILD": str(MAX_TASKS_PER_CHILD),
        "LOG_LEVEL": "WARNING",
    }
    jobs = plan()
    ids = [j[0] for j in jobs]
    failing = {j[0] for j in jobs if j[1] == "test.fail"}
    effect_keys = [j[0] for j in jobs if j[0] not in failing]
    affected: set[str] = set()  # in flight on worker-low when it was killed

    def finished_at(task_ids: set[str]) -> float | None:
        done = fx.effects()
        times = [done[i][2] for i in task_ids if i in done]
        results = states(redis_client, [i for i in task_ids if i in failing])
        if len(times) + sum(1 for s, _ in results.values() if s == "FAILURE") < len(task_ids):
            return None
        times += [
            dt.datetime.fromisoformat(d).replace(tzinfo=dt.UTC).timestamp()
            for _, d in results.values()
            if d
        ]
        return max(times, default=None)

    published: list[str] = []

    def measure() -> dict[str, int]:
        sent = set(published)
        ids_ = [i for i in ids if i in sent]
        by_state = states(redis_client, ids_)
        done = fx.effects()
        attempts = fx.attempt_counts()
        ok = {k for k in effect_keys if k in sent and k in done and by_state[k][0] == "SUCCESS"}
        ok |= {i for i in failing if i in sent and by_state[i][0] == "FAILURE"}
        waiting = redis_leftovers(redis_client)
        unfinished = sum(1 for i in ids_ if i not in ok and i in waiting)
        flaky = {j[0] for j in jobs if j[1] == "chaos.flaky"}
        return {
            "sent": len(ids_),
            "completed": len(ok),
            # flaky tasks fail once on purpose: only a third run is a re-run
            "reran": sum(1 for k in effect_keys if attempts[k] > (2 if k in flaky else 1)),
            "duplicated": sum(1 for k in effect_keys if done.get(k, (0,))[0] > 1),
            "lost": len(ids_) - len(ok) - unfinished,
            "unfinished": unfinished,
        }

    differs = (
        f"VISIBILITY_TIMEOUT={VISIBILITY_TIMEOUT} (7200): the killed worker's tasks come back"
        " in seconds; LOG_LEVEL=WARNING (INFO)"
    )
    if TOTAL != 20_000:
        differs += f"; {TOTAL} tasks (20,000)"
    with Scenario("load: DB-writing tasks, worker-low SIGKILL", differs=differs) as sc:
        sc.measure = measure
        sc.recovered = lambda: finished_at(affected) if affected else None
        workers = {
            "high": start_service("worker-high", **env).wait_ready(),
            "low": start_service("worker-low", **env).wait_ready(),
        }
        sampler = MemorySampler(workers)
        sampler.start()
        started = time.time()

        def publish() -> None:
            with app.producer_or_acquire() as producer:
                for task_id, name, args, queue in jobs:
                    app.send_task(name, args=args, task_id=task_id, queue=queue, producer=producer)
                    published.append(task_id)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wait_until(lambda: len(fx.effects()) >= len(effect_keys) // 2, LIMIT, 1, "half")
        old = workers["low"]
        kill_group(old.proc.pid)  # worker-low dies mid-load: main process and children
        sc.fault_at = time.time()
        old.proc.wait(timeout=10)
        affected |= in_flight(redis_client, ("low_priority", "default"))
        sc.details["in_flight_on_worker_low"] = len(affected)
        workers["low"] = start_service("worker-low", **env).wait_ready()
        publisher.join(timeout=LIMIT)
        wait_until(lambda: finished_at(set(ids)) is not None, LIMIT, 2.0, "every task to finish")
        elapsed = time.time() - started
        time.sleep(1)
        sampler.halt.set()
        sampler.join()

        attempts = fx.attempt_counts()
        memory = _memory_report(sampler.samples)
        sc.details.update(
            tasks_per_s=round(TOTAL / elapsed),
            max_tasks_per_child=MAX_TASKS_PER_CHILD,
            production_max_tasks_per_child=PRODUCTION_MAX_TASKS_PER_CHILD,
            memory_kib=memory,
        )
        figures = measure()
        assert affected, "worker-low had nothing in flight when it was killed"
        assert figures["completed"] == TOTAL, figures
        assert figures["lost"] == 0 and figures["duplicated"] == 0
        # The killed worker's tasks came back after the visibility timeout, on worker-low.
        recover = (finished_at(affected) or 0) - sc.fault_at
        assert recover >= VISIBILITY_TIMEOUT, recover
        assert all(attempts[j[0]] == 2 for j in jobs if j[1] == "chaos.flaky")
        # Memory: children are replaced (recycling) and, after warm-up, neither the main
        # process nor the children grow (a leak of 1 kB per task would add ~10 MB here).
        for name, mem in memory.items():
            assert mem["children_seen"] >= 4, (name, mem)
            assert mem["main_end"] <= mem["main_warm"] + 8_000, (name, mem)
            assert mem["child_peak_end"] <= mem["child_peak_middle"] + 8_000, (name, mem)
        assert memory["high"]["children_seen"] >= 10  # the worker that ran through it all


def _memory_report(samples: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per worker (its last main process), in KiB: the main process's RSS after warm-up (a
    third in) and at the end; the largest child in the middle and in the last third; the
    total (main + children) at the end; how many children it had (recycling)."""
    report: dict[str, dict[str, int]] = {}
    for name in sorted({s["worker"] for s in samples}):
        mine = [s for s in samples if s["worker"] == name and s["main"]]
        last_pid = mine[-1]["pid"]
        mine = [s for s in mine if s["pid"] == last_pid and any(s["children"])]
        third = max(1, len(mine) // 3)
        peaks = [max(s["children"]) for s in mine]
        report[name] = {
            "samples": len(mine),
            "main_warm": mine[third]["main"],
            "main_end": mine[-1]["main"],
            "child_peak_middle": max(peaks[third : 2 * third] or peaks),
            "child_peak_end": max(peaks[-third:]),
            "total_end": mine[-1]["main"] + sum(mine[-1]["children"]),
            "children_seen": len({k for s in mine for k in s["kids"]}),
        }
    return report
