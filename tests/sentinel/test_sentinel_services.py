"""Flower, the exporter and the CLI in Sentinel mode, before and after a failover.

They are started by their own run scripts with only the Sentinel settings (no REDIS_URL):
Flower reads the app's configuration, the exporter gets its broker URL and transport options
from `python -m tasks.redis_conn`. Five tasks wait in a queue no worker consumes; the master is
SIGKILLed; five more are sent; both must report ten, and both see the task a worker ran after
the failover (events), without being restarted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "observability"))
from cluster import SentinelCluster
from obs_helpers import ensure_exporter_venv

from conftest import VENV_BIN, free_port

AUTH = "ops:flower-pass-1"


@pytest.fixture
def cluster() -> Any:
    c = SentinelCluster().start()
    yield c
    c.close()


def get(url: str, auth: str | None = None) -> str:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def queue_length(metrics: str, queue: str) -> float | None:
    found = re.search(
        rf'^celery_queue_length{{[^}}]*queue_name="{queue}"[^}}]*}} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else None


def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # not up yet, or failing over
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.mark.slow
def test_flower_exporter_and_cli_follow_the_failover(
    cluster: SentinelCluster, migrated_db: str, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.celery_app import create_app
    from tasks.settings import Settings

    monkeypatch.delenv("REDIS_URL", raising=False)
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    client = create_app(Settings())
    exporter_port, flower_port = free_port(), free_port()
    start_service(
        "worker-high", WORKER_QUEUES="high_priority,default", WORKER_CONCURRENCY="1"
    ).wait_ready()
    exporter = start_service(
        "exporter",
        EXPORTER_PORT=str(exporter_port),
        EXPORTER_ADDRESS="127.0.0.1",
        EXPORTER_VENV=str(ensure_exporter_venv()),
    )
    flower = start_service(
        "flower", FLOWER_PORT=str(flower_port), FLOWER_ADDRESS="127.0.0.1", FLOWER_BASIC_AUTH=AUTH
    )
    metrics_url = f"http://127.0.0.1:{exporter_port}/metrics"
    flower_url = f"http://127.0.0.1:{flower_port}"

    def both_count(n: int) -> bool:
        return queue_length(get(metrics_url), "low_priority") == n

    def flower_sees_a_new_task() -> bool:
        """A ping sent now is shown by Flower as done (its events reach Flower)."""
        task_id = client.send_task("ping").id
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tasks = json.loads(get(f"{flower_url}/api/tasks", AUTH))
            if tasks.get(task_id, {}).get("state") == "SUCCESS":
                return True
            time.sleep(0.5)
        return False

    for _ in range(5):
        client.send_task("ping", queue="low_priority")
    until(lambda: both_count(5), 60, "the exporter to count 5 queued")
    until(flower_sees_a_new_task, 60, "Flower to see a task done")
    # Flower's broker view (queue lengths) goes through the Sentinel too.
    assert "active_queues" in json.loads(get(f"{flower_url}/api/queues/length", AUTH))

    old = cluster.master_port()
    assert old is not None
    cluster.kill(old)
    until(lambda: cluster.master_port() not in (None, old), 60, "a new master")
    for _ in range(5):
        until(lambda: client.send_task("ping", queue="low_priority"), 30, "a send to succeed")
    until(lambda: both_count(10), 90, "the exporter to count 10 queued after the failover")
    until(flower_sees_a_new_task, 90, "Flower to see a task done after the failover")
    assert "active_queues" in json.loads(get(f"{flower_url}/api/queues/length", AUTH))
    # The CLI's queue view (kombu through the Sentinels) counts the same, and sees the worker.
    cli = subprocess.run(
        [str(VENV_BIN / "waardhaven-tasks"), "inspect"],
        env=exporter.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert re.search(r"low_priority\s*│\s*10\b", cli.stdout), cli.stdout
    assert "no worker replied" not in cli.stdout
    assert exporter.proc.poll() is None and flower.proc.poll() is None
    # No password on a command line that `ps` shows.
    for proc in (exporter.proc, flower.proc):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for pid in [proc.pid, *map(int, children)]:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert cluster.password not in cmdline
            assert cluster.sentinel_password not in cmdline
