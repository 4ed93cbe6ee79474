"""Section 1: queue throughput and latency of no-op `ping` tasks, and what each setting costs."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.common import RedisServer, Worker, log, median, percentile

QUEUE = "default"


@dataclass
class Config:
    key: str
    label: str
    tasks: int
    env: dict[str, str] = field(default_factory=dict)
    publish: dict[str, Any] = field(default_factory=dict)  # per-message options (ignore_result)


# The production settings are the app's (prefetch 1, acks_late + reject_on_worker_lost,
# track_started, events, results in Redis, max_tasks_per_child 50); the others change one thing.
CELERY_DEFAULTS = {
    "WORKER_PREFETCH_MULTIPLIER": "4",
    "WORKER_MAX_TASKS_PER_CHILD": "0",
    "BENCH_ACKS_LATE": "0",
    "BENCH_EVENTS": "0",
    "BENCH_TRACK_STARTED": "0",
}


def configs(scale: float) -> list[Config]:
    big, small = int(20_000 * scale), int(6_000 * scale)
    return [
        Config("defaults", "Celery defaults (prefetch 4, no acks_late/events/track_started, "
               "no recycling)", big, dict(CELERY_DEFAULTS)),
        Config("production_stock", "production settings, stock child start", small,
               {"BENCH_STOCK_CHILD_START": "1"}),
        Config("production_public", "production settings, child start with public APIs only "
               "(no private pool patches)", small, {"BENCH_POOL_PATCHES": "0"}),
        Config("production", "production settings (max_tasks_per_child 50 kept)", big),
        Config("prefetch4", "production, prefetch 4 (instead of 1)", small,
               {"WORKER_PREFETCH_MULTIPLIER": "4"}),
        Config("no_acks_late", "production, acks_late off", small, {"BENCH_ACKS_LATE": "0"}),
        Config("no_events", "production, task events off", small, {"BENCH_EVENTS": "0"}),
        Config("no_track_started", "production, track_started off", small,
               {"BENCH_TRACK_STARTED": "0"}),
        Config("ignore_result", "production, results ignored (ignore_result)", small,
               publish={"ignore_result": True}),
        Config("no_recycling", "production, max_tasks_per_child off", small,
               {"WORKER_MAX_TASKS_PER_CHILD": "0"}),
        Config("memory_recycling", "production, max_memory_per_child 256 MiB instead of "
               "max_tasks_per_child", small,
               {"WORKER_MAX_TASKS_PER_CHILD": "0", "WORKER_MAX_MEMORY_PER_CHILD": "262144"}),
    ]  # fmt: skip


def template_message(app: Any, client: redis.Redis, options: dict[str, Any]) -> dict[str, Any]:
    """One ping as the app publishes it (headers, properties, body), taken off the queue."""
    client.delete(QUEUE)
    app.send_task("ping", **options)
    raw = client.lpop(QUEUE)
    assert raw is not None, "the template message did not reach the queue"
    return dict(json.loads(raw))


def enqueue(client: redis.Redis, template: dict[str, Any], n: int) -> int:
    """n copies of the template, each with its own task id and delivery tag (kombu acks by
    tag). Returns the size of one message in bytes."""
    size = 0
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        task_id = str(uuid.uuid4())
        message = dict(template)
        message["headers"] = {**template["headers"], "id": task_id, "root_id": task_id}
        message["properties"] = {
            **template["properties"],
            "correlation_id": task_id,
            "delivery_tag": str(uuid.uuid4()),
        }
        data = json.dumps(message)
        size = len(data)
        pipe.lpush(QUEUE, data)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return size


def raw_baseline(client: redis.Redis, size: int, n: int) -> dict[str, Any]:
    """The broker's limit on this machine: one redis-py connection, LPUSH then BRPOP of a
    message of the same size, one at a time."""
    payload = b"x" * size
    key = "bench:raw"
    client.delete(key)
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        client.lpush(key, payload)
        client.brpop([key], timeout=5)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {
        "round_trips": n,
        "per_second": n / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def drain(
    client: redis.Redis, n: int, worker: Worker, server: RedisServer, timeout: float
) -> dict[str, Any]:
    """Wait until the queue is empty and nothing is unacknowledged; the rate counts from the
    first message taken."""
    t0 = None
    left0 = n
    cpu0 = redis0 = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = int(client.llen(QUEUE))
        now = time.perf_counter()
        if t0 is None and left < n:
            t0, left0 = now, left
            cpu0, redis0 = worker.cpu_seconds(), server.cpu_seconds()
        if t0 is not None and left == 0 and int(client.hlen("unacked")) == 0:
            elapsed = now - t0
            return {
                "tasks": n,
                "per_second": left0 / elapsed,
                "seconds": elapsed,
                "worker_cpu_ms_per_task": (worker.cpu_seconds() - cpu0) * 1000 / left0,
                "redis_cpu_ms_per_task": (server.cpu_seconds() - redis0) * 1000 / left0,
            }
        time.sleep(0.005)
    raise RuntimeError(f"{worker.label}: queue not drained in {timeout}s")


def latency(app: Any, n: int, options: dict[str, Any]) -> dict[str, Any]:
    """publish -> result, one task at a time."""
    for _ in range(20):  # warm-up: connections, the first children
        app.send_task("ping", **options).get(timeout=30)
    values = []
    for _ in range(n):
        t = time.perf_counter()
        result = app.send_task("ping", **options).get(timeout=30)
        values.append(time.perf_counter() - t)
        assert result == "pong"
    return {
        "samples": n,
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000,
    }


def child_lives(records: list[dict[str, Any]]) -> dict[str, Any]:
    """From the probe: how long a new child takes to start and how long a recycled child idles
    between its last task and its exit."""
    lives = [r for r in records if r.get("kind") == "child" and "ready" in r]
    if not lives:
        return {"children": 0}
    forks = sorted(r["fork"] for r in lives)
    exits = [r for r in lives if r.get("tasks")]
    replace = []
    for r in exits:
        later = [f for f in forks if f > r["exit"]]
        if later:
            replace.append(later[0] - r["exit"])
    return {
        "children": len(lives),
        "start_ms": median((r["ready"] - r["fork"]) * 1000 for r in lives),
        "fork_to_first_task_ms": median(
            (r["first_task"] - r["fork"]) * 1000 for r in lives if "first_task" in r
        )
        if any("first_task" in r for r in lives)
        else None,
        "last_task_to_exit_ms": median(
            (r["exit"] - r["last_task_end"]) * 1000 for r in exits if "last_task_end" in r
        )
        if any("last_task_end" in r for r in exits)
        else None,
        "exit_to_next_fork_ms": median(x * 1000 for x in replace) if replace else None,
    }


def run(
    app: Any, server: RedisServer, workdir: Path, scale: float, latency_samples: int
) -> dict[str, Any]:
    client = redis.Redis.from_url(server.url)
    results: dict[str, Any] = {"configs": {}}
    size = len(json.dumps(template_message(app, client, {})))
    results["message_bytes"] = size
    log(f"queue: raw redis-py LPUSH/BRPOP baseline ({size}-byte messages)")
    results["raw"] = raw_baseline(client, size, int(20_000 * scale))
    only = {k for k in os.environ.get("BENCH_QUEUE_CONFIGS", "").split(",") if k}
    for config in configs(scale):
        if only and config.key not in only:
            continue
        client.flushdb()
        template = template_message(app, client, config.publish)
        enqueue(client, template, config.tasks)
        log(f"queue: {config.key}: {config.tasks} pings queued, starting worker-low")
        worker = Worker(
            "worker-low", workdir, f"queue-{config.key}", WORKER_CONCURRENCY="2", **config.env
        )
        try:
            worker.wait_ready()
            figures = drain(client, config.tasks, worker, server, timeout=600)
            if not config.publish.get("ignore_result"):
                figures["latency"] = latency(app, latency_samples, config.publish)
        finally:
            worker.stop()
        figures["label"] = config.label
        figures["tasks"] = config.tasks
        figures["worker_start_s"] = worker.start_seconds
        figures["children"] = child_lives(worker.probe())
        lat = figures.get("latency", {})
        log(
            f"queue: {config.key}: {figures['per_second']:.0f}/s, "
            f"p50 {lat.get('p50_ms', float('nan')):.1f} ms p99 "
            f"{lat.get('p99_ms', float('nan')):.1f} ms; children {figures['children']}"
        )
        results["configs"][config.key] = figures
    client.flushdb()
    client.close()
    return results
