"""Scenario 8: load. A sustained mixed workload of 20,000 tasks on both worker services (fast
tasks, tasks that fail once and are retried, tasks that always fail), with worker-low restarted
(SIGTERM, soft shutdown) halfway. Every task is accounted for: succeeded + failed = sent, each
success's effect counted once. Worker memory (main process + prefork children, from /proc)
stays flat while children are recycled every WORKER_MAX_TASKS_PER_CHILD tasks.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest
from reliability_helpers import CHAOS_TASKS, children, record, rss_kib, wait_until

from tasks.celery_app import app
from tasks.settings import Settings

TOTAL = int(os.environ.get("CHAOS_LOAD_TASKS", "20000"))
FLAKY = TOTAL // 20  # fail once, retried, then succeed
FAILING = TOTAL // 20  # always fail (no retry)
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
    """(id, task, args, queue), interleaved: a steady mix on both queues."""
    jobs: list[tuple[str, str, list[Any], str]] = []
    for i in range(TOTAL):
        queue = "high_priority" if i % 2 else "low_priority"
        key = f"k{i}"
        if i % 20 == 7:
            jobs.append((str(uuid.uuid4()), "chaos.flaky", [key, 1], queue))
        elif i % 20 == 13:
            jobs.append((str(uuid.uuid4()), "test.fail", [f"expected failure {i}"], queue))
        else:
            jobs.append((str(uuid.uuid4()), "chaos.tick", [key], queue))
    return jobs


def states(client: Any, ids: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        batch = ids[start : start + 1000]
        for task_id, raw in zip(
            batch, client.mget([f"celery-task-meta-{i}" for i in batch]), strict=True
        ):
            out[task_id] = json.loads(raw)["status"] if raw else "PENDING"
    return out


@pytest.mark.slow
def test_twenty_thousand_tasks_all_accounted_for_through_a_worker_restart(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    redis_client.flushdb()
    env = {
        **CHAOS_TASKS,
        "WORKER_CONCURRENCY": "2",
        "WORKER_MAX_TASKS_PER_CHILD": str(MAX_TASKS_PER_CHILD),
        "LOG_LEVEL": "WARNING",
    }
    workers = {
        "high": start_service("worker-high", **env).wait_ready(),
        "low": start_service("worker-low", **env).wait_ready(),
    }
    sampler = MemorySampler(workers)
    sampler.start()
    jobs = plan()
    started = time.time()

    def publish() -> None:
        with app.producer_or_acquire() as producer:
            for task_id, name, args, queue in jobs:
                app.send_task(name, args=args, task_id=task_id, queue=queue, producer=producer)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()

    def succeeded() -> int:  # tick and flaky tasks that succeeded (one field per key)
        return int(redis_client.hlen("chaos:effects"))

    ids = [j[0] for j in jobs]

    def all_finished() -> bool:
        return all(s in ("SUCCESS", "FAILURE") for s in states(redis_client, ids).values())

    wait_until(lambda: succeeded() >= (TOTAL - FAILING) // 2, 300, 0.5, "half of the tasks")
    old = workers["low"]
    stopped = time.time()
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(timeout=60) == 0
    done_at_restart = succeeded()
    workers["low"] = start_service("worker-low", **env).wait_ready()
    # Back to normal: the restarted worker has done its share of a hundred tasks.
    wait_until(lambda: succeeded() > done_at_restart + 100, 60, 0.2, "the new worker")
    recover = time.time() - stopped
    publisher.join(timeout=300)
    wait_until(lambda: succeeded() >= TOTAL - FAILING, 400, 1.0, "every task to succeed")
    wait_until(all_finished, 60, 1.0, "every task to finish")
    elapsed = time.time() - started
    time.sleep(1)
    sampler.halt.set()
    sampler.join()

    by_state = states(redis_client, ids)
    counts = {s: list(by_state.values()).count(s) for s in set(by_state.values())}
    effects = {k.decode(): int(v) for k, v in redis_client.hgetall("chaos:effects").items()}
    succeed_keys = [j[2][0] for j in jobs if j[1] != "test.fail"]
    duplicated = sum(1 for k in succeed_keys if effects.get(k, 0) > 1)
    missing = sum(1 for k in succeed_keys if k not in effects)
    wrong = [j for j in jobs if by_state[j[0]] != ("FAILURE" if j[1] == "test.fail" else "SUCCESS")]

    memory = _memory_report(sampler.samples)
    record(
        "load: 20k mixed tasks, worker-low restarted",
        sent=TOTAL,
        completed=counts.get("SUCCESS", 0) + counts.get("FAILURE", 0),
        duplicated=duplicated,
        lost=TOTAL - counts.get("SUCCESS", 0) - counts.get("FAILURE", 0),
        recover_s=recover,
        succeeded=counts.get("SUCCESS", 0),
        failed=counts.get("FAILURE", 0),
        retried=FLAKY,
        tasks_per_s=round(TOTAL / elapsed),
        max_tasks_per_child=MAX_TASKS_PER_CHILD,
        production_max_tasks_per_child=PRODUCTION_MAX_TASKS_PER_CHILD,
        memory_kib=memory,
    )
    assert counts.get("SUCCESS", 0) + counts.get("FAILURE", 0) == TOTAL, counts
    assert counts.get("FAILURE", 0) == FAILING
    assert wrong == [] and missing == 0 and duplicated == 0
    assert all(
        int(redis_client.hget("chaos:attempts", j[2][0]) or 0) == 2
        for j in jobs
        if j[1] == "chaos.flaky"
    )
    # Memory: children are replaced (recycling) and, after warm-up, neither the main process
    # nor the children grow (a leak of 1 kB per task would add ~10 MB here).
    for name, figures in memory.items():
        assert figures["children_seen"] >= 4, (name, figures)
        assert figures["main_end"] <= figures["main_warm"] + 8_000, (name, figures)
        assert figures["child_peak_end"] <= figures["child_peak_middle"] + 8_000, (name, figures)
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
