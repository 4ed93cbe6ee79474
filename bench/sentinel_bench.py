"""Section "sentinel": no-op task throughput and latency through Redis Sentinel against a single
Redis, in the same run (docs/sentinel.md).

Both sides run the same settings except the topology: password, AOF `everysec` (the chart's
single Redis); the Sentinel side is tests/sentinel/cluster.py (a master with two replicas,
`min-replicas-to-write 1`, three Sentinels). The worker is `services/worker-low/run` with the
production settings, `-c 2`; the app and the worker find the master through the Sentinels
(REDIS_SENTINELS). The sides alternate, ROUNDS times, and the medians are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from bench.common import REPO, Worker, log, median, tree_cpu_seconds
from bench.queue_bench import QUEUE, drain, enqueue, latency, raw_baseline, template_message

sys.path.insert(0, str(REPO / "tests" / "sentinel"))
from cluster import SentinelCluster

ROUNDS = 2
REDIS_SETTINGS = (
    "REDIS_URL",
    "RESULT_BACKEND_URL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
)


class Master:
    """What queue_bench.drain needs of a server: the CPU seconds of the process taking writes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """The process environment of one side (the app's Settings and the worker read it)."""
    saved = dict(os.environ)
    for name in REDIS_SETTINGS:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def single_redis() -> tuple[SentinelCluster, dict[str, str]]:
    """A standalone redis-server with the cluster's server settings minus replication."""
    single = SentinelCluster(replicas=0, sentinels=0)
    port = single.redis_ports[0]
    args = single._server_args(port)
    # min-replicas-to-write would refuse every write of a Redis without replicas.
    i = args.index("--min-replicas-to-write")
    del args[i : i + 4]
    single.procs[port] = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if single.server(port).ping():
                break
        time.sleep(0.05)
    return single, {"REDIS_URL": f"redis://:{single.password}@127.0.0.1:{port}/0"}


def measure(
    side: str, env: dict[str, str], master_pid: int, workdir: Path, tasks: int, samples: int
) -> dict[str, Any]:
    from tasks import redis_conn
    from tasks.celery_app import create_app
    from tasks.settings import load_settings

    with environment(env):
        settings = load_settings()
        app = create_app(settings)
        client = redis_conn.client(settings)
        client.delete(QUEUE, "unacked", "unacked_index")
        template = template_message(app, client, {})
        size = len(json.dumps(template))
        raw = raw_baseline(client, size, max(500, tasks // 2))
        enqueue(client, template, tasks)
        worker = Worker("worker-low", workdir, f"sentinel-{side}-{time.time():.0f}",
                        WORKER_CONCURRENCY="2")  # fmt: skip
        try:
            worker.wait_ready()
            figures = drain(client, tasks, worker, Master(master_pid), timeout=600)  # type: ignore[arg-type]
            figures["latency"] = latency(app, samples, {})
        finally:
            worker.stop()
            app.close()
            client.close()
    figures["raw"] = raw
    figures["message_bytes"] = size
    return figures


def run(workdir: Path, scale: float) -> dict[str, Any]:
    tasks = max(500, int(5_000 * scale))
    samples = max(100, int(300 * scale))
    rounds: dict[str, list[dict[str, Any]]] = {"single": [], "sentinel": []}
    single, single_env = single_redis()
    cluster = SentinelCluster().start()
    try:
        master = cluster.master_port()
        assert master is not None
        sides = {
            "single": (single_env, single.procs[single.redis_ports[0]].pid),
            "sentinel": (cluster.env, cluster.procs[master].pid),
        }
        for r in range(ROUNDS):
            order = list(sides.items())
            for side, (env, pid) in order if r % 2 == 0 else order[::-1]:  # neither always first
                log(f"sentinel: round {r + 1}/{ROUNDS}, {side}: {tasks} pings")
                figures = measure(side, env, pid, workdir, tasks, samples)
                rounds[side].append(figures)
                lat = figures["latency"]
                log(
                    f"sentinel: {side}: {figures['per_second']:.0f}/s, "
                    f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
                )
    finally:
        cluster.close()
        single.close()
    summary = {side: summarize(runs) for side, runs in rounds.items()}
    return {"tasks": tasks, "samples": samples, "rounds": rounds, "summary": summary,
            "rows": rows(summary, tasks)}  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "per_second": median(r["per_second"] for r in runs),
        "p50_ms": median(r["latency"]["p50_ms"] for r in runs),
        "p99_ms": median(r["latency"]["p99_ms"] for r in runs),
        "raw_per_second": median(r["raw"]["per_second"] for r in runs),
        "redis_cpu_ms_per_task": median(r["redis_cpu_ms_per_task"] for r in runs),
        "worker_cpu_ms_per_task": median(r["worker_cpu_ms_per_task"] for r in runs),
    }


def rows(summary: dict[str, dict[str, float]], tasks: int) -> list[list[str]]:
    """Rows in the form of the bench table (#, measure, result, baseline, ratio, target)."""
    one, sen = summary["single"], summary["sentinel"]
    return [
        [
            "6",
            f"no-op pings through Redis Sentinel (master + 2 replicas, 3 Sentinels), {tasks:,} "
            f"pings, 1 pod -c 2, median of {ROUNDS}",
            f"{sen['per_second']:,.0f}/s; p50 {sen['p50_ms']:.1f} ms, p99 {sen['p99_ms']:.1f} ms; "
            f"master CPU {sen['redis_cpu_ms_per_task']:.2f} ms/task; "
            f"raw LPUSH+BRPOP {sen['raw_per_second']:,.0f}/s",
            f"single Redis (AOF, password) {one['per_second']:,.0f}/s; p50 {one['p50_ms']:.1f} ms, "
            f"p99 {one['p99_ms']:.1f} ms; Redis CPU {one['redis_cpu_ms_per_task']:.2f} ms/task; "
            f"raw {one['raw_per_second']:,.0f}/s",
            f"{sen['per_second'] / one['per_second']:.2f}x",
            "",
        ]
    ]


def table(result: dict[str, Any]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in result["rows"])
