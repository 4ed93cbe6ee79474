"""Servers, worker processes and small measuring helpers of the benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN_PG_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """(median seconds over `repeat` runs, the last result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


# --- processes ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0.0
    fields = _stat_fields(root)
    if fields:
        total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        fields = _stat_fields(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        stack.extend(children.get(pid, []))
    return total


class RedisServer:
    """A private redis-server on a free port (never the developer's Redis)."""

    def __init__(self) -> None:
        from tasks.devstack import redis_server_binary

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wh-bench-redis-"))
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class Database:
    """A fresh PostgreSQL database, dropped by close()."""

    def __init__(self) -> None:
        from sqlalchemy import create_engine, text

        self.name = f"wh_bench_{uuid.uuid4().hex[:10]}"
        self.admin = create_engine(ADMIN_PG_URL, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = ADMIN_PG_URL.rsplit("/", 1)[0] + f"/{self.name}"

    def close(self) -> None:
        from sqlalchemy import text

        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class Worker:
    """services/<name>/run as a real process (the one command a worker pod runs)."""

    def __init__(self, name: str, workdir: Path, label: str, **env: str) -> None:
        self.name = name
        self.label = label
        self.health = workdir / "health" / label
        self.probe_file = workdir / f"probe-{label}.jsonl"
        self.log_path = workdir / f"worker-{label}.log"
        self.env = dict(os.environ)
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = str(REPO)
        self.env["HEALTH_DIR"] = str(self.health)
        self.env["METRICS_PORT"] = str(free_port())  # as in production: /metrics served
        self.env["WAARDHAVEN_EXTRA_TASK_MODULES"] = "bench.worker_probe"
        self.env["BENCH_PROBE_FILE"] = str(self.probe_file)
        self.env["WORKER_SOFT_SHUTDOWN_TIMEOUT"] = "1"
        self.env.update(env)
        self.started = time.perf_counter()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(REPO / "services" / name / "run")],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.start_seconds = float("nan")

    def wait_ready(self, timeout: float = 90.0) -> Worker:
        ready = self.health / "worker-ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                self.start_seconds = time.perf_counter() - self.started
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.label} exited:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker {self.label} not ready after {timeout}s")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def probe(self) -> list[dict[str, Any]]:
        if not self.probe_file.exists():
            return []
        return [json.loads(line) for line in self.probe_file.read_text().splitlines() if line]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
