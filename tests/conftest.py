"""Test infrastructure: real Redis, real PostgreSQL, real worker processes.

`tests/unit/` is the fast tier: pure tests, no server (`make test-fast`). Any other test in
the run makes the session get, before collection (so that `tasks.settings` reads them):
- REDIS_URL: a private password-protected `redis-server` on a free port, unless REDIS_URL is
  set; tests never share queues with a developer's stack or another test run;
- DATABASE_URL: a fresh database on the PostgreSQL at TEST_POSTGRES_URL (default the local
  server, database `test` for the admin connection), dropped at the end.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN_PG_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
_cleanup: list[Any] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, auth: str | None = None) -> int:
    """The HTTP status of a GET, with optional basic auth "user:password"; 0 if nothing listens."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0


def redis_server_binary() -> str:
    from tasks.devstack import redis_server_binary as find

    return find()


class RedisServer:
    """A redis-server of our own: tests may stop, restart or reconfigure it."""

    def __init__(self, password: str | None = None, appendonly: bool = False) -> None:
        self.port = free_port()
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="wh-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--maxmemory-policy", "noeviction",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def create_database() -> str:
    from sqlalchemy import create_engine, text

    name = f"wh_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    _cleanup.append(drop)
    return ADMIN_PG_URL.rsplit("/", 1)[0] + f"/{name}"


UNIT = REPO / "tests" / "unit"
_servers_started: list[bool] = []


def require_servers() -> None:
    if not _servers_started:
        pytest.fail("tests/unit is the pure tier (no Redis, no PostgreSQL): move this test out")


def needs_servers(config: pytest.Config) -> bool:
    """False when every path of the run lies in tests/unit (pure tests start no server)."""
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if not path.is_relative_to(UNIT):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    if not needs_servers(config):
        return
    _servers_started.append(True)
    if "REDIS_URL" not in os.environ:
        server = RedisServer(password=secrets.token_hex(8)).start()
        _cleanup.append(server.close)
        os.environ["REDIS_URL"] = server.url
    if "DATABASE_URL" not in os.environ:
        os.environ["DATABASE_URL"] = create_database()
    os.environ.setdefault("METRICS_PORT", "0")
    os.environ.setdefault("PROGRESS_INTERVAL", "0")
    # Soft shutdown waits this long even when idle (worker_enable_soft_shutdown_on_idle): keep
    # test workers quick to stop; the reliability tests set their own.
    os.environ.setdefault("WORKER_SOFT_SHUTDOWN_TIMEOUT", "2")


def pytest_unconfigure(config: pytest.Config) -> None:
    from tasks.db import dispose_engine

    dispose_engine()
    while _cleanup:
        _cleanup.pop()()


@pytest.fixture(scope="session")
def migrated_db() -> str:
    from tasks.migrate import upgrade

    require_servers()
    upgrade()
    return os.environ["DATABASE_URL"]


def reset_database() -> None:
    """Empty tables, then the seed universe."""
    from sqlalchemy import text

    from tasks import store
    from tasks.db import get_engine, session_scope

    with get_engine().begin() as conn:
        conn.execute(
            text(
                "TRUNCATE allocations, index_values, prices, risk_metrics, reports, task_runs,"
                " strategy_config, assets RESTART IDENTITY CASCADE"
            )
        )
    with session_scope() as session:
        store.seed_assets(session)


@pytest.fixture
def clean_db(migrated_db: str) -> Iterator[str]:
    """Empty tables, then the seed universe."""
    reset_database()
    yield migrated_db


@pytest.fixture
def redis_client() -> Any:
    import redis

    require_servers()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    yield client
    client.close()


def service_env(name: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HEALTH_DIR"] = str(tmp / "health" / name)
    env.update(extra)
    return env


class Service:
    """One of services/*/run as a real process, output kept in a log file."""

    def __init__(self, name: str, tmp: Path, args: list[str] | None = None, **env: str) -> None:
        self.name = name
        self.env = service_env(name, tmp, **env)
        self.log_path = tmp / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(REPO / "services" / name / "run"), *(args or [])],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> Service:
        ready = Path(self.env["HEALTH_DIR"]) / "worker-ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.output[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Any]:
    started: list[Service] = []

    def start(name: str, *args: str, **env: str) -> Service:
        service = Service(name, tmp_path, list(args), **env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def worker(start_service: Any, clean_db: str, redis_client: Any) -> Service:
    """worker-high and worker-low in one process (all queues), on an emptied broker."""
    redis_client.flushdb()
    return start_service(
        "worker-high",
        WORKER_QUEUES="high_priority,low_priority,default",
        WORKER_CONCURRENCY="2",
    ).wait_ready()


sys.path.insert(0, str(REPO / "tests" / "support"))  # fakes and test-only task modules
