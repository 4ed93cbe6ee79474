"""Shared pieces of the fault-injection scenarios: figures, effects, processes, servers.

Every scenario runs inside `Scenario(...)`: its figures, measured from state when it ends
(also when it fails), go to the JSON file named by CHAOS_RESULTS (default:
waardhaven-chaos-results.json in the temp dir), which `scripts/chaos.py` prints as tables.
The effects of the test-only tasks (tests/support/chaos_tasks.py) live in two tables of the
database the workers use, created here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scenarios import SCENARIOS, SECURITY
from sqlalchemy import Engine, create_engine, text

from conftest import REPO, free_port

SUPPORT = REPO / "tests" / "support"
# Loads the test-only tasks (test.sleep, test.fail, chaos.*) into a worker.
CHAOS_TASKS = {
    "WAARDHAVEN_EXTRA_TASK_MODULES": "extra_tasks,chaos_tasks",
    "PYTHONPATH": str(SUPPORT),
}
# Short limits, so a redelivery after a worker's death happens within the test: the hard
# limit below the visibility timeout, the soft one below the hard one (settings check both).
VISIBILITY_TIMEOUT = 10
SHORT_LIMITS = {
    "VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    "TASK_TIME_LIMIT": "8",
    "TASK_SOFT_TIME_LIMIT": "6",
}
# kombu's sweep for messages past the visibility timeout runs every 10 s
# (`unacked_restore_interval`, with `unacked_restore_throttle` = 1 in tasks.celery_app).
RESTORE_SWEEP = 10
QUEUES = ("high_priority", "low_priority", "default")


# --- figures --------------------------------------------------------------------------------
#
# One row per scenario, measured from state (PostgreSQL, Redis, the results) in the test's
# teardown, so a failing test still writes its row (with passed = false and the error):
#   sent        tasks (messages) the scenario sent
#   completed   finished as expected (succeeded, or failed on purpose: poison, bad input)
#   reran       tasks that ran more than once (attempt counters: redeliveries, retries)
#   duplicated  effects applied more than once (two runs both committed)
#   lost        sent, not completed, and nowhere any more (not queued, not unacknowledged)
#   unfinished  not completed when the scenario ended but still in Redis (would run later)
#   recover_s   seconds from the fault until the work it affected was done again


def results_path() -> Path:
    return Path(
        os.environ.get("CHAOS_RESULTS")
        or Path(tempfile.gettempdir()) / "waardhaven-chaos-results.json"
    )


def _store(section: str, key: str, row: dict[str, Any]) -> None:
    """Add (or replace) one row of the results file (safe against concurrent writers)."""
    print(f"\nCHAOS {section} {json.dumps(row)}")
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            results = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            results = {}
        results.setdefault(section, {})[key] = row
        path.write_text(json.dumps(results, indent=2))


def _error_line(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class Scenario:
    """Context manager around a scenario: its row is written on the way out, pass or fail.

    The test sets `measure` (a function returning sent/completed/reran/duplicated/lost/
    unfinished from state) as soon as it has sent its work, `fault_at` (epoch seconds) when it
    injects the fault, and `recovered` (a function returning the epoch seconds when the work
    the fault affected was done again, None if it never was): recover_s = recovered - fault_at,
    the one meaning of "recover" in the table. `details` holds anything else worth printing;
    `differs` names the settings that are not the production ones, and why.
    """

    def __init__(self, name: str, differs: str = "") -> None:
        assert name in SCENARIOS, f"{name!r} is not in tests/reliability/scenarios.py"
        self.name = name
        self.differs = differs
        self.measure: Callable[[], dict[str, int]] | None = None
        self.recovered: Callable[[], float | None] | None = None
        self.fault_at: float | None = None
        self.details: dict[str, Any] = {}

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        row: dict[str, Any] = {"scenario": self.name, "differs": self.differs or None}
        try:
            row.update(self.measure() if self.measure else {})
        except Exception as err:  # the row says so instead of vanishing
            row["measure_error"] = _error_line(err)
        recover = None
        try:
            done = self.recovered() if self.recovered else None
            if done is not None and self.fault_at is not None:
                recover = round(done - self.fault_at, 1)
        except Exception as err:
            row["recover_error"] = _error_line(err)
        row["recover_s"] = recover
        row["passed"] = exc is None
        if exc is not None:
            row["error"] = _error_line(exc)
        row.update(self.details)
        _store("scenarios", self.name, row)


def record_security(group: str, check: str, tried: str, expected: Any, seen: Any) -> None:
    """One row of the security table: what was tried, the answer expected and the one seen."""
    assert group in SECURITY, f"{group!r} is not in tests/reliability/scenarios.py"
    row = {"group": group, "check": check, "tried": tried, "expected": expected, "seen": seen}
    row["ok"] = expected == seen
    _store("security", f"{group}: {check}", row)


def redis_leftovers(client: Any, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """task id -> 1 for every task message still in Redis: queued, or unacknowledged."""
    ids: dict[str, int] = {}
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            ids[json.loads(raw)["headers"]["id"]] = 1
    for raw in client.hvals("unacked"):
        ids[json.loads(raw)[0]["headers"]["id"]] = 1
    return ids


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# --- effects of chaos.write -----------------------------------------------------------------


class Effects:
    """The chaos_attempts / chaos_effects tables of a database."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_pre_ping=True)

    def reset(self) -> Effects:
        with self.engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS chaos_attempts, chaos_effects"))
            conn.execute(
                text(
                    "CREATE TABLE chaos_attempts (id serial PRIMARY KEY, key text NOT NULL,"
                    " pid int, at timestamptz)"
                )
            )
            conn.execute(
                text(
                    "CREATE TABLE chaos_effects (key text PRIMARY KEY, n int NOT NULL,"
                    " pid int, done_at timestamptz)"
                )
            )
        return self

    def effects(self) -> dict[str, tuple[int, int, float]]:
        """key -> (runs that committed it, pid, epoch seconds of the first commit)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT key, n, pid, extract(epoch FROM done_at) FROM chaos_effects")
            )
            return {k: (n, pid, float(at)) for k, n, pid, at in rows}

    def attempts(self) -> list[tuple[str, int, float]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT key, pid, extract(epoch FROM at) FROM chaos_attempts ORDER BY id")
            )
            return [(k, pid, float(at)) for k, pid, at in rows]

    def attempt_counts(self) -> Counter[str]:
        return Counter(k for k, _, _ in self.attempts())

    def figures(self, keys: list[str], redis_client: Any) -> dict[str, int]:
        """The row's counts for chaos.write tasks sent with task id = key (`send_write`)."""
        effects = self.effects()
        attempts = self.attempt_counts()
        done = [k for k in keys if k in effects]
        waiting = redis_leftovers(redis_client)
        unfinished = sum(1 for k in keys if k not in effects and k in waiting)
        return {
            "sent": len(keys),
            "completed": len(done),
            "reran": sum(1 for k in keys if attempts[k] > 1),
            "duplicated": sum(1 for k in done if effects[k][0] > 1),
            "lost": len(keys) - len(done) - unfinished,
            "unfinished": unfinished,
        }

    def done_at(self, keys: Any) -> float | None:
        """When the last of `keys` committed its effect (None while one is missing)."""
        effects = self.effects()
        if not all(k in effects for k in keys):
            return None
        return max((effects[k][2] for k in keys), default=None)

    def close(self) -> None:
        self.engine.dispose()


# --- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group (a pod's container: main process and its children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def send_write(
    client: Any, key: str, seconds: float = 0.0, queue: str = "default", **options: Any
) -> Any:
    """Send chaos.write(key) with task id = key, so Redis leftovers map back to keys."""
    return client.send_task("chaos.write", args=[key, seconds], task_id=key, queue=queue, **options)


class SteadyPublisher(threading.Thread):
    """Sends chaos.write(key, seconds) to `default` every `period` s, as a service keeps doing
    through a fault. `sent`: key -> when send_task returned; `refused`: key -> the error the
    sender saw (kombu gave up after its publish retries; the sender knows, nothing is lost)."""

    def __init__(
        self, client: Any, period: float, prefix: str, seconds: float = 0.0, **options: Any
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.period, self.prefix = client, period, prefix
        self.seconds, self.options = seconds, options
        self.sent: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        for i in itertools.count():
            if self.halt.wait(self.period):
                return
            key = f"{self.prefix}-{i}"
            try:
                send_write(self.client, key, self.seconds, **self.options)
                self.sent[key] = time.time()
            except Exception as exc:
                self.refused[key] = f"{type(exc).__name__}: {exc}"


@functools.cache
def producer(redis_url: str) -> Any:
    """A client app (as the CLI or an API would have) on another Redis than the session's."""
    from tasks.celery_app import create_app
    from tasks.settings import Settings

    return create_app(Settings(redis_url=redis_url))


def grace_period_seconds() -> int | None:
    """terminationGracePeriodSeconds of the chart's workers (values.yaml), if the chart exists."""
    import yaml

    values = REPO / "deploy" / "helm" / "waardhaven-tasks" / "values.yaml"
    if not values.exists():
        return None
    found: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "terminationGracePeriodSeconds" and isinstance(value, int):
                    found.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(values.read_text()))
    return min(found) if found else None


# --- PostgreSQL of our own ------------------------------------------------------------------

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresCluster:
    """initdb + pg_ctl in a temp dir on a free port (as user postgres when we are root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wh-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"])

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.as_root:
            args = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresCluster:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o",
             options, "start"]
        )  # fmt: skip
        return self

    def running(self) -> bool:
        status = [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]
        return self._run(status, check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def create_database(self, name: str) -> str:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def close(self) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"], False)
        shutil.rmtree(self.dir, ignore_errors=True)
