"""Redis Sentinel, the chart part (issue 13 point 2): what it renders, and the rendered start
scripts, config files and probes run as real redis-server and Sentinel processes.

Locally every pod gets its own loopback address (127.0.1.1..3) so that the rendered ports
(6379, 26379) stay as they are; the only rewrites are addresses (pod host names, `bind`) and
paths (/etc/redis, /conf, /data), and `-h` for redis-cli in the probes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_helpers import by_kind, container, env_of, get, pod_spec, render_chart
from pod_runner import container_env, process_env
from value_sets import VALUE_SETS

FULL = "waardhaven-tasks-redis"
HEADLESS = f"{FULL}-headless.waardhaven.svc.cluster.local"


def test_clients_get_sentinels_and_no_redis_url() -> None:
    objects = render_chart(VALUE_SETS["sentinel"])
    for obj in objects:
        if obj["kind"] not in {"Deployment", "Pod", "Job"} or obj["metadata"]["name"].endswith(
            "-redis"
        ):
            continue
        env = env_of(container(obj, pod_spec(obj)["containers"][0]["name"]))
        assert "REDIS_URL" not in env and "RESULT_BACKEND_URL" not in env
        assert env["REDIS_SENTINELS"] == ",".join(f"{FULL}-{i}.{HEADLESS}:26379" for i in range(3))
        assert env["REDIS_SENTINEL_MASTER"] == "mymaster"
        assert env["REDIS_PASSWORD"]["secretKeyRef"]["name"] == FULL
        assert env["REDIS_SENTINEL_PASSWORD"]["secretKeyRef"] == {
            "name": f"{FULL}-sentinel",
            "key": "sentinel-password",
        }
    # The settings accept exactly this environment (a clean process, as in the pod).
    worker = container(get(objects, "Deployment", "worker-high"))
    env = {k: v for k, v in container_env(objects, worker).items() if not k.startswith("TASK_")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tasks.settings import load_settings; "
            "print(load_settings().redis_sentinels.count(':26379'))",
        ],
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stdout + done.stderr


def test_statefulset_pdb_antiaffinity_and_no_single_redis_objects() -> None:
    objects = render_chart(VALUE_SETS["sentinel"])
    sts = get(objects, "StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 3
    assert [c["name"] for c in pod_spec(sts)["containers"]] == ["redis", "sentinel"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert pod_spec(sts)["affinity"]["podAntiAffinity"]
    assert get(objects, "PodDisruptionBudget", "redis")["spec"]["minAvailable"] == 2
    services = {o["metadata"]["name"] for o in by_kind(objects, "Service")}
    assert FULL not in services  # a Service to "any Redis pod" would reach replicas
    headless = get(objects, "Service", "redis-headless")
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 26379}
    config = get(objects, "ConfigMap", "redis-sentinel")["data"]
    for line in (
        "appendonly yes",
        "min-replicas-to-write 1",
        "min-replicas-max-lag 10",
        "maxmemory-policy noeviction",
    ):
        assert line in config["redis.conf"]
    assert "sentinel resolve-hostnames yes" in config["sentinel.conf"]
    assert "sentinel announce-hostnames yes" in config["sentinel.conf"]
    assert "PASSWORD" not in config["redis.conf"] + config["sentinel.conf"]


def test_keda_and_network_policies_follow() -> None:
    objects = render_chart(VALUE_SETS["sentinel-keda"])
    for so in by_kind(objects, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "redis-sentinel"
            assert trigger["metadata"]["addresses"].count(":26379") == 3
            assert trigger["metadata"]["sentinelMaster"] == "mymaster"
    auth = by_kind(objects, "TriggerAuthentication")[0]["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"]) for a in auth} == {
        ("password", FULL),
        ("sentinelPassword", "wh-sentinel"),
    }
    policy = get(objects, "NetworkPolicy", "redis")["spec"]["ingress"]
    for rule in policy:  # the release's pods (Sentinels, replicas, clients) and KEDA
        assert {p["port"] for p in rule["ports"]} == {6379, 26379}
    external = render_chart(VALUE_SETS["external-sentinel"])
    env = env_of(container(get(external, "Deployment", "worker-low")))
    assert env["REDIS_SENTINELS"].startswith("redis-node-0.redis-headless.data:26379,")
    assert env["REDIS_SENTINEL_MASTER"] == "prod"
    api_egress = get(external, "NetworkPolicy", "api")["spec"]["egress"][1]["ports"]
    assert {p["port"] for p in api_egress} == {6379, 26379}


# --- the rendered Sentinel pods, run ----------------------------------------------------


class LocalRedisPod:
    """Pod i of the rendered StatefulSet: its redis and sentinel containers as processes."""

    def __init__(self, objects: list[dict[str, Any]], i: int, root: Path) -> None:
        self.i, self.ip = i, f"127.0.1.{i + 1}"
        self.objects = objects
        self.sts = get(objects, "StatefulSet", "redis")
        self.root = root / f"pod-{i}"
        self.config = self.root / "etc-redis"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        addresses = {f"{FULL}-{n}.{HEADLESS}": f"127.0.1.{n + 1}" for n in range(3)}
        self.config.mkdir(parents=True)
        for name, text in get(objects, "ConfigMap", "redis-sentinel")["data"].items():
            for host, ip in addresses.items():
                text = text.replace(host, ip)
            text = text.replace('self="$(hostname).$HEADLESS"', f'self="{self.ip}"')
            text = text.replace("bind * -::*", f"bind {self.ip}")
            text = text.replace("/etc/redis/", f"{self.config}/").replace("dir /tmp", "dir /tmp")
            text = text.replace("dir /data", f"dir {self.root / 'data'}")
            (self.config / name).write_text(text)
        (self.root / "data").mkdir()
        self.addresses = addresses

    def env(self, role: str) -> dict[str, str]:
        env = container_env(self.objects, container(self.sts, role))
        for key in ("SENTINELS", "POD0"):
            for host, ip in self.addresses.items():
                env[key] = env[key].replace(host, ip)
        return process_env(env, HOSTNAME=f"{FULL}-{self.i}")

    def start(self, role: str) -> None:
        conf = self.root / f"conf-{role}"
        conf.mkdir(exist_ok=True)
        script = (self.config / f"{role}-start.sh").read_text().replace("/conf/", f"{conf}/")
        log = (self.root / f"{role}.log").open("ab")
        self.procs[role] = subprocess.Popen(
            ["sh", "-c", script],
            env=self.env(role),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def probe(self, role: str, probe: str, **env: str) -> subprocess.CompletedProcess[str]:
        command = [
            part.replace("redis-cli ", f"redis-cli -h {self.ip} ")
            for part in container(self.sts, role)[probe]["exec"]["command"]
        ]
        return subprocess.run(
            command, env={**self.env(role), **env}, capture_output=True, text=True, timeout=15
        )

    def wait(self, role: str, probe: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (done := self.probe(role, probe)).returncode != 0:
            assert time.monotonic() < deadline, (self.i, role, probe, done.stdout, self.log(role))
            time.sleep(0.3)

    def log(self, role: str) -> str:
        return (self.root / f"{role}.log").read_text(errors="replace")

    def kill(self, role: str) -> None:
        proc = self.procs.pop(role, None)
        if proc and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[LocalRedisPod]]:
    values = {
        "redis": {
            "auth": {"password": "redis-" + secrets.token_hex(8)},
            "sentinel": {"enabled": True, "downAfterMilliseconds": 1500, "failoverTimeout": 6000},
        }
    }
    objects = render_chart(values)
    pods = [LocalRedisPod(objects, i, tmp_path) for i in range(3)]
    yield pods
    for pod in pods:
        for role in list(pod.procs):
            pod.kill(role)


def _master(pod: LocalRedisPod) -> str:
    env = pod.env("sentinel")
    out = subprocess.run(
        [
            "redis-cli",
            "-h",
            pod.ip,
            "-p",
            "26379",
            "--raw",
            "sentinel",
            "get-master-addr-by-name",
            "mymaster",
        ],
        env={**env, "REDISCLI_AUTH": env["SENTINEL_PASSWORD"]},
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.split("\n")[0]


def test_rendered_pods_bootstrap_pass_their_probes_and_fail_over(
    cluster: list[LocalRedisPod],
) -> None:
    # OrderedReady: each pod starts once the one before it is ready.
    for pod in cluster:
        pod.start("redis")
        pod.start("sentinel")
        pod.wait("redis", "startupProbe")
        pod.wait("redis", "readinessProbe")  # master: role:master; replica: link up
        pod.wait("sentinel", "readinessProbe")
    assert "master 127.0.1.1" in cluster[2].log("redis")
    assert cluster[0].probe("redis", "livenessProbe").returncode == 0
    # Unauthenticated: every probe fails.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert cluster[1].probe("redis", probe, REDISCLI_AUTH="wrong").returncode != 0, probe
    assert cluster[1].probe("sentinel", "readinessProbe", REDISCLI_AUTH="wrong").returncode != 0
    # A replica whose master is gone is not ready (its link is down), but alive.
    assert all(_master(p) == "127.0.1.1" for p in cluster)
    cluster[0].kill("redis")
    deadline = time.monotonic() + 40
    while _master(cluster[1]) == "127.0.1.1":
        assert time.monotonic() < deadline, cluster[1].log("sentinel")
        time.sleep(0.5)
    new = _master(cluster[1])
    assert new in {"127.0.1.2", "127.0.1.3"}
    promoted = cluster[1] if new == "127.0.1.2" else cluster[2]
    promoted.wait("redis", "readinessProbe")
    # Pod 0 comes back: its start script asks the Sentinels and rejoins as a replica.
    cluster[0].start("redis")
    cluster[0].wait("redis", "readinessProbe")
    assert f"master {new}" in cluster[0].log("redis").splitlines()[-1] or (
        f"master {new}" in cluster[0].log("redis")
    )
    replication = subprocess.run(
        ["redis-cli", "-h", "127.0.1.1", "info", "replication"],
        env=cluster[0].env("redis"),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    assert "role:slave" in replication and f"master_host:{new}" in replication
