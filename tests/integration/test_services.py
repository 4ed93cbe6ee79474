"""The service commands as real processes: Flower's auth, beat, health checks, `make run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, VENV_BIN, free_port, http_status, service_env


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def test_flower_requires_credentials(start_service: Any, migrated_db: str) -> None:
    port = free_port()
    flower = start_service(
        "flower",
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH="ops:s3cret-pass",
        FLOWER_ADDRESS="127.0.0.1",
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthcheck")
    assert http_status(base + "/") == 401
    assert http_status(base + "/", "ops:wrong") == 401
    assert http_status(base + "/", "ops:s3cret-pass") == 200
    assert http_status(base + "/api/workers", "ops:s3cret-pass") == 200
    # Its broker view (queue lengths) knows the broker's transport (services/flower/guard.py).
    assert http_status(base + "/api/queues/length", "ops:s3cret-pass") == 200
    # Every path needs the credentials (services/flower/guard.py), the probes' too.
    for path in ("/healthcheck", "/metrics", "/static/css/bootstrap.min.css"):
        assert http_status(base + path) == 401, path
    assert http_status(base + "/healthcheck", "ops:s3cret-pass") == 200
    healthcheck = subprocess.run(
        [str(REPO / "services/flower/healthcheck")], env=flower.env, capture_output=True
    )
    assert healthcheck.returncode == 0
    assert "s3cret-pass" not in flower.output


@pytest.mark.parametrize("auth", [None, "", "admin", "admin:"])
def test_flower_refuses_to_start_without_a_password(
    start_service: Any, auth: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    env = {"FLOWER_PORT": str(free_port())}
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth
    flower = start_service("flower", **env)
    assert flower.proc.wait(timeout=30) == 64
    assert "FLOWER_BASIC_AUTH must be set" in flower.output


def test_worker_health_checks(worker: Any) -> None:
    check = REPO / "services/worker-high/healthcheck"
    assert subprocess.run([str(check)], env=worker.env).returncode == 0
    assert subprocess.run([str(check), "ready"], env=worker.env).returncode == 0
    heartbeat = Path(worker.env["HEALTH_DIR"]) / "worker-heartbeat"
    os.utime(heartbeat, (time.time() - 600, time.time() - 600))  # a hung event loop
    stale = subprocess.run([str(check)], env=worker.env, capture_output=True, text=True)
    assert stale.returncode == 1 and "old" in stale.stderr
    worker.stop()
    assert subprocess.run([str(check), "ready"], env=worker.env).returncode == 1


def test_beat_loads_the_schedule_into_redis_and_beats(
    start_service: Any, redis_client: Any
) -> None:
    redis_client.flushdb()
    beat = start_service("beat")
    heartbeat = Path(beat.env["HEALTH_DIR"]) / "beat-heartbeat"
    deadline = time.monotonic() + 60
    while not heartbeat.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert heartbeat.exists(), beat.output
    keys = {k.decode() for k in redis_client.keys("waardhaven:redbeat:*")}
    for entry in ("refresh-market-data-daily", "compute-index-hourly", "cleanup-old-data-weekly"):
        assert f"waardhaven:redbeat:{entry}" in keys
    assert "waardhaven:redbeat::lock" in keys  # this beat holds the lock
    check = subprocess.run([str(REPO / "services/beat/healthcheck")], env=beat.env)
    assert check.returncode == 0


def test_make_run_stack_end_to_end(tmp_path: Path) -> None:
    """What `make run` starts: own Redis, SQLite, services; the CLI drives it; Ctrl-C stops it."""
    env = service_env("dev", tmp_path, WAARDHAVEN_STATE_DIR=str(tmp_path / "var"))
    for name in ("REDIS_URL", "DATABASE_URL", "FLOWER_BASIC_AUTH", "METRICS_PORT"):
        env.pop(name, None)
    log = (tmp_path / "dev.log").open("w+")
    stack = subprocess.Popen(
        [str(VENV_BIN / "waardhaven-tasks"), "dev"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        banner = None
        while time.monotonic() < deadline and stack.poll() is None:
            text = Path(log.name).read_text()
            banner = re.search(r"Flower:\s+(http://\S+)\s+user (\S+)\s+password (\S+)", text)
            if banner and "worker-low" in text and "ready" in text:
                break
            time.sleep(0.5)
        assert banner, Path(log.name).read_text()[-4000:]
        url, user, password = banner.groups()
        assert http_status(url) == 401
        assert http_status(url, f"{user}:{password}") == 200
        cli = [str(VENV_BIN / "waardhaven-tasks"), "submit"]
        for task, args in (
            ("refresh_market_data", []),
            ("compute_index", []),
            ("generate_report", ["--arg", "report_type=performance"]),
        ):
            done = subprocess.run(
                [*cli, task, *args, "--wait", "--timeout", "180"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:] + Path(log.name).read_text()[-3000:]
            assert "SUCCESS" in done.stderr
        import sqlite3

        db = sqlite3.connect(tmp_path / "var" / "waardhaven.db")
        assert db.execute("select count(*) from prices").fetchone()[0] > 1000
        assert db.execute("select count(*) from index_values").fetchone()[0] > 100
        assert db.execute("select count(*) from reports").fetchone()[0] == 1
        db.close()
    finally:
        stack.send_signal(signal.SIGINT)
        code = stack.wait(timeout=120)
        log.close()
    assert code == 0
    assert not (tmp_path / "var" / "dev.env").exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "var")], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == [], "processes left running"


def test_cli_rejects_unknown_tasks_and_bad_args() -> None:
    cli = [sys.executable, "-m", "tasks.cli", "submit"]
    unknown = subprocess.run([*cli, "refresh_everything"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown task 'refresh_everything'" in unknown.stderr
    bad = subprocess.run([*cli, "compute_index", "--arg", "start"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected key=value" in bad.stderr
