"""tasks.metrics without a worker: multiprocess files of recycled children folded without
losing a count, scrape time bounded however many children were recycled, label bounds, and
install() cheap in processes that are not workers (beat, Flower, the CLI)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from obs_helpers import HERE, REPO, VENV_BIN

from conftest import free_port


def _probe(children: int, tasks_per_child: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, str(HERE / "multiproc_probe.py"), str(children), str(tasks_per_child)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_recycled_children_are_folded_without_losing_a_count() -> None:
    """300 children of 5 tasks (max_tasks_per_child=5): 900 files. Raw, each scrape reads them
    all; folded, a scrape reads 6 files and the totals are the same."""
    result = _probe(300, 5)
    assert result["files_before"] >= 900
    assert result["files_after"] <= 8  # main's files, the merged and the preinit ones
    assert result["compacted"] == 300
    expected = {
        "waardhaven_tasks_total": 1500.0,
        "waardhaven_task_runtime_seconds_count": 1500.0,
        "waardhaven_task_runtime_seconds_sum": pytest.approx(4.5),
        "waardhaven_rows_upserted_total": 600.0,
        "waardhaven_task_last_success_timestamp_seconds": 1299.0,  # the most recent child's
    }
    assert result["raw"] == expected
    assert result["merged"] == expected
    # A folded scrape costs a small fraction of reading the files of 300 dead children.
    assert result["scrape_seconds"] < result["raw_seconds"] / 5, result
    assert result["scrape_seconds"] < 0.05, result
    # A child's first metric write opens its files; the pre-initialised zero series are not
    # re-opened by every child (they live in *_preinit.db, not in inherited value objects).
    assert result["child_first_write_median"] < 0.02, result


def test_install_is_cheap_outside_a_worker(tmp_path: Path) -> None:
    """Importing the app (beat, Flower, the CLI do) starts no server, creates no directory and
    does not even import prometheus_client; publishing stamps the message with its send time."""
    port = free_port()
    queue = f"obs-test-{uuid.uuid4().hex[:8]}"
    code = f"""
import json, sys, redis
from tasks.celery_app import app
from tasks.metrics import server
app.send_task("ping", queue={queue!r})
raw = redis.Redis.from_url(app.conf.broker_url).lindex({queue!r}, 0)
print(json.dumps({{
    "prometheus_client": "prometheus_client" in sys.modules,
    "worker_request": "celery.worker.request" in sys.modules,
    "server": server.state.httpd is not None,
    "sent_at": json.loads(raw)["headers"].get("sent_at"),
}}))
"""
    env = {**os.environ, "METRICS_PORT": str(port), "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        assert result["prometheus_client"] is False
        assert result["worker_request"] is False
        assert result["server"] is False
        assert isinstance(result["sent_at"], float)
        assert not list(tmp_path.iterdir())  # no multiprocess directory
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens
    finally:
        import redis

        redis.Redis.from_url(os.environ["REDIS_URL"]).delete(queue)


def test_labels_are_bounded() -> None:
    import tasks.background_tasks  # noqa: F401  (registers the tasks)
    from tasks.metrics import families as metrics

    m = metrics.get()
    names = [m.bounded("exception-test", f"Error{i}") for i in range(metrics.MAX_LABEL_VALUES + 5)]
    assert names[: metrics.MAX_LABEL_VALUES] == [
        f"Error{i}" for i in range(metrics.MAX_LABEL_VALUES)
    ]
    assert set(names[metrics.MAX_LABEL_VALUES :]) == {metrics.OTHER}
    assert m.bounded("exception-test", "Error0") == "Error0"  # known values stay
    assert m.bounded("table-test", "x{y=1}") == metrics.OTHER  # not a plain name
    assert metrics.task_label("ping") == "ping"
    assert metrics.task_label("evil.task.from.a.message") == metrics.UNKNOWN
    assert metrics.queue_label({"routing_key": "high_priority"}) == "high_priority"
    assert metrics.queue_label({"routing_key": "celeryev.123"}) == metrics.UNKNOWN


def test_nothing_runs_at_pool_child_start() -> None:
    """worker_process_init runs in every new prefork child (every 50 tasks): no receiver of
    ours there."""
    from celery import signals

    receivers = [r for _key, r in signals.worker_process_init.receivers]
    ours = [r for r in receivers if getattr(r, "__module__", "").startswith("tasks.")]
    assert not ours
