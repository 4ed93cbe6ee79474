"""A Redis Sentinel deployment on loopback: three redis-servers (a master, two replicas) and
three Sentinels (`redis-server --sentinel`), passwords on both, on free ports.

The settings are the ones docs/sentinel.md recommends and reports the figures for: AOF
`everysec` on every server (a replica promoted after a crash has what it received),
`min-replicas-to-write 1` / `min-replicas-max-lag 10` (a master cut off from every replica
refuses writes instead of acknowledging what would be lost), quorum 2 of 3 Sentinels, and a
short `down-after-milliseconds` so a test fails over in seconds (production: 5000 to 30000).

Used by tests/sentinel and bench/sentinel_bench.py.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 10000
MIN_REPLICAS_TO_WRITE = 1
MIN_REPLICAS_MAX_LAG = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from tasks.devstack import redis_server_binary

    return redis_server_binary()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class SentinelCluster:
    def __init__(self, replicas: int = 2, sentinels: int = 3) -> None:
        self.password = secrets.token_hex(12)
        self.sentinel_password = secrets.token_hex(12)
        self.dir = Path(tempfile.mkdtemp(prefix="wh-sentinel-"))
        self.redis_ports = [_free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [_free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # --- what clients are given -----------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The settings of a service in Sentinel mode (tasks.settings)."""
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
            "REDIS_PASSWORD": self.password,
            "REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=5)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=2)

    # --- start and stop -------------------------------------------------------------------

    def _server_args(self, port: int) -> list[str]:
        data = self.dir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        return [
            _binary(),
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--requirepass", self.password, "--masterauth", self.password,
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--min-replicas-to-write", str(MIN_REPLICAS_TO_WRITE),
            "--min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG),
        ]  # fmt: skip

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        args = self._server_args(port)
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(port, self.procs[port])

    def start_sentinel(self, port: int, master_port: int) -> None:
        # Sentinel rewrites its configuration file (it records what it learns): one per process.
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"requirepass {self.sentinel_password}\n"
            f"sentinel sentinel-pass {self.sentinel_password}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel auth-pass {MASTER_NAME} {self.password}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        log = self.dir / f"sentinel-{port}.log"
        self.procs[port] = subprocess.Popen(
            [_binary(), str(conf), "--sentinel", "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(port, self.procs[port])

    def start(self, timeout: float = 30) -> SentinelCluster:
        master, *replicas = self.redis_ports
        self.start_server(master)
        for port in replicas:
            self.start_server(port, replica_of=master)
        for port in self.sentinel_ports:
            self.start_sentinel(port, master)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Every replica in sync, every Sentinel knowing every replica and the other Sentinels
        (until then a failover could not reach its quorum or would miss a replica)."""
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            problem = self._not_ready()
            if not problem:
                return
            time.sleep(0.2)
        raise RuntimeError(f"Sentinel cluster not ready after {timeout}s: {problem}")

    def _not_ready(self) -> str:
        master = self.master_port()
        if master is None:
            return "no master known"
        try:
            info = self.server(master).info("replication")
        except redis.RedisError as exc:
            return f"master {master}: {exc}"
        want = len(self.redis_ports) - 1
        online = [k for k, v in info.items() if k.startswith("slave") and "online" in str(v)]
        if len(online) < want:
            return f"{len(online)}/{want} replicas online"
        for port in self.sentinel_ports:
            try:
                s = self.sentinel(port)
                replicas = s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                others = s.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
            except redis.RedisError as exc:
                return f"sentinel {port}: {exc}"
            if len(replicas) < want or len(others) < len(self.sentinel_ports) - 1:
                return f"sentinel {port}: {len(replicas)} replicas, {len(others)} sentinels"
        return ""

    def master_port(self) -> int | None:
        """The master's port as the Sentinels' majority reports it."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                addr = self.sentinel(port).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
                )
                if addr:
                    votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best and best[1] * 2 > len(self.sentinel_ports) else None

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def replication_offsets(self) -> dict[int, int | None]:
        out: dict[int, int | None] = {}
        for port in self.redis_ports:
            try:
                info: dict[str, Any] = self.server(port).info("replication")
                key = "master_repl_offset"
                out[port] = int(info.get(key, 0))
            except redis.RedisError:
                out[port] = None
        return out

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
