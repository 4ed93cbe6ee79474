"""A new queue is one entry in the chart's `workers` map plus one line in ROUTES.

In a temporary copy of the repository, `cleanup_old_data` moves to a new queue `maintenance`
(its ROUTES line) consumed by a new pool (a `workers` entry, no services folder); then the app
routes it there, the chart renders a Deployment consuming it, the exporter (services/exporter/
run, queues by default from the app) reports its length, and `make run`'s devstack starts a
worker that runs the task.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import REPO, VENV_BIN, RedisServer, free_port

sys.path[:0] = [str(REPO / "tests" / "chart"), str(REPO / "tests" / "observability")]
import chart_helpers  # noqa: E402
import helm_python as helm  # noqa: E402
from obs_helpers import ensure_exporter_venv, wait_until  # noqa: E402

QUEUE = "maintenance"
ROUTE_BEFORE = '    "cleanup_old_data": Queue.LOW,\n'
ROUTE_AFTER = f'    "cleanup_old_data": "{QUEUE}",\n'
POOL = f"""  # Cleanup, on its own.
  {QUEUE}:
    queues: [{QUEUE}]
"""


def copy_repository(dest: Path) -> None:
    """The checkout's files (tracked and new, not ignored), links kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("new-queue") / "repo"
    copy_repository(root)
    app_file = root / "shared" / "tasks" / "celery_app.py"
    text = app_file.read_text()
    assert text.count(ROUTE_BEFORE) == 1
    app_file.write_text(text.replace(ROUTE_BEFORE, ROUTE_AFTER))
    values = root / "deploy" / "helm" / "waardhaven-tasks" / "values.yaml"
    text = values.read_text()
    anchor = "\n# beat:"
    assert text.count(anchor) == 1
    values.write_text(text.replace(anchor, POOL + anchor))
    return root


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(8)).start()
    try:
        yield server
    finally:
        server.close()


def env_for(copy: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(copy / "shared"),  # the copy's tasks package, not the checkout's
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def in_copy(copy: Path, code: str, **env: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=copy,
        env=env_for(copy, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def start(argv: list[str], copy: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=copy, env=env_for(copy, **env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_app_routes_to_the_new_queue(copy: Path, broker: RedisServer) -> None:
    result = in_copy(
        copy,
        "import json; from tasks.celery_app import QUEUES, app\n"
        "route = app.amqp.router.route({}, 'cleanup_old_data')\n"
        "beat = app.conf.beat_schedule['cleanup-old-data-weekly']['options']['queue']\n"
        "print(json.dumps([QUEUES, route['queue'].name, beat, sorted(app.amqp.queues)]))",
        REDIS_URL=broker.url,
    )
    queues, routed, beat, declared = result
    assert QUEUE in queues and routed == QUEUE and beat == QUEUE
    assert sorted(queues) == declared


def test_the_chart_renders_a_worker_for_it(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chart_dir = copy / "deploy" / "helm" / "waardhaven-tasks"
    loaded = helm.Chart.load(chart_dir)  # kept alive: the native handle goes with the object
    monkeypatch.setattr(chart_helpers, "chart", lambda: loaded)
    objects = chart_helpers.render_chart()
    deployment = chart_helpers.get(objects, "Deployment", f"worker-{QUEUE}")
    worker = chart_helpers.container(deployment)
    assert chart_helpers.env_of(worker)["WORKER_QUEUES"] == QUEUE
    assert worker["args"][0] == "services/worker/run"
    assert (copy / worker["args"][0]).exists()
    exporter = chart_helpers.container(
        chart_helpers.get(objects, "Deployment", "exporter"), "exporter"
    )
    assert QUEUE in chart_helpers.env_of(exporter)["EXPORTER_QUEUES"].split(",")


def test_the_exporter_reports_its_length(copy: Path, broker: RedisServer, tmp_path: Path) -> None:
    sent = in_copy(
        copy,
        "import json; from tasks.celery_app import app\n"
        "app.loader.import_default_modules(); app.finalize()\n"
        "print(json.dumps(app.send_task('cleanup_old_data').id))",
        REDIS_URL=broker.url,
    )
    assert redis.Redis.from_url(broker.url).llen(QUEUE) == 1, sent
    port = free_port()
    exporter = start(
        [str(copy / "services" / "exporter" / "run")],
        copy,
        tmp_path / "exporter.log",
        REDIS_URL=broker.url,
        EXPORTER_PORT=str(port),
        EXPORTER_ADDRESS="127.0.0.1",
        EXPORTER_VENV=str(ensure_exporter_venv()),
    )
    sample = f'celery_queue_length{{queue_name="{QUEUE}"}} 1.0'

    def reported() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return sample in r.read().decode()

    try:
        wait_until("the exporter reports the new queue's length", reported, 90, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(tmp_path / 'exporter.log').read_text()[-3000:]}") from None
    finally:
        stop(exporter)
    redis.Redis.from_url(broker.url).delete(QUEUE)


def test_make_run_starts_a_worker_that_runs_it(
    copy: Path, broker: RedisServer, tmp_path: Path
) -> None:
    log = tmp_path / "dev.log"
    state = tmp_path / "var"
    dev = start(
        [sys.executable, "-m", "tasks.cli", "dev"],
        copy,
        log,
        REDIS_URL=broker.url,
        WAARDHAVEN_STATE_DIR=str(state),
        FLOWER_PORT=str(free_port()),
    )
    try:
        wait_until("the stack's banner", lambda: "is running" in log.read_text(), 120, interval=1)
        # Sent as the CLI would: with the stack's settings (var/dev.env), its signing key too.
        stack_env = dict(
            line.split("=", 1) for line in (state / "dev.env").read_text().splitlines() if line
        )
        task_id = in_copy(
            copy,
            "import json; from tasks.celery_app import app\n"
            "app.loader.import_default_modules(); app.finalize()\n"
            "print(json.dumps(app.send_task('cleanup_old_data', kwargs={'days_to_keep': 30}).id))",
            **stack_env,
        )
        client = redis.Redis.from_url(broker.url)

        def done() -> Any:
            raw = client.get(f"celery-task-meta-{task_id}")
            return raw and json.loads(raw)["status"] in ("SUCCESS", "FAILURE") and json.loads(raw)

        meta = wait_until("the cleanup task's result", done, 90, interval=0.5)
        assert meta["status"] == "SUCCESS", meta
        text = log.read_text()
        assert f"worker-{QUEUE} |" in text
        assert f".> {QUEUE}" in text  # the worker's banner lists the queue it consumes
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-4000:]}") from None
    finally:
        stop(dev)
