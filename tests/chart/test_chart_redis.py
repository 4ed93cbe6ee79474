"""Redis: StatefulSet with AOF and a kept password; existing Secret; external Redis."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from chart_helpers import by_kind, container, env_of, get, render_chart, secret_data
from pod_runner import container_env, expand
from value_sets import VALUE_SETS

from conftest import RedisServer, free_port, redis_server_binary

REDIS = [
    "templates/redis/redis-statefulset.yaml",
    "templates/redis/redis-service.yaml",
    "templates/redis/redis-headless-service.yaml",
    "templates/redis/redis-secret.yaml",
    "templates/redis/redis-configmap.yaml",
]
WORKER = ["templates/workers/worker-deployment.yaml"]


class TestRedisStatefulSet:
    def test_statefulset_with_headless_service_and_a_claim(self) -> None:
        objects = render_chart(show_only=REDIS)
        sts = get(objects, "StatefulSet", "redis")
        assert sts["spec"]["serviceName"] == "waardhaven-tasks-redis-headless"
        assert get(objects, "Service", "redis-headless")["spec"]["clusterIP"] == "None"
        claim = sts["spec"]["volumeClaimTemplates"][0]
        assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
        c = container(sts)
        assert c["args"] == ["/etc/redis/redis.conf", "--requirepass", "$(REDIS_PASSWORD)"]

    def test_no_claim_without_persistence(self) -> None:
        sts = get(
            render_chart({"redis": {"persistence": {"enabled": False}}}, show_only=REDIS),
            "StatefulSet",
            "redis",
        )
        assert "volumeClaimTemplates" not in sts["spec"]
        assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]

    def test_config_append_only_no_eviction(self) -> None:
        conf = get(render_chart(show_only=REDIS), "ConfigMap", "redis")["data"]["redis.conf"]
        lines = {line.strip() for line in conf.splitlines()}
        assert {"appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"} <= lines
        assert not [line for line in lines if line.startswith("requirepass")]


class TestRedisPassword:
    def test_generated_once_kept_and_never_fixed(self) -> None:
        first = get(render_chart(show_only=REDIS), "Secret", "redis")
        second = get(render_chart(show_only=REDIS), "Secret", "redis")
        assert first["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert first["data"]["redis-password"] != second["data"]["redis-password"]
        assert len(secret_data([first], "redis")["redis-password"]) == 32

    def test_clients_compose_redis_url_from_the_secret(self) -> None:
        env = env_of(container(get(render_chart(show_only=WORKER), "Deployment", "worker-high")))
        assert env["REDIS_PASSWORD"]["secretKeyRef"] == {
            "name": "waardhaven-tasks-redis",
            "key": "redis-password",
        }
        assert env["REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@waardhaven-tasks-redis:6379/0"

    def test_existing_secret(self) -> None:
        objects = render_chart(VALUE_SETS["existing-secrets"], show_only=REDIS + WORKER)
        assert not by_kind(objects, "Secret")
        sts_env = env_of(container(get(objects, "StatefulSet", "redis")))
        worker_env = env_of(container(get(objects, "Deployment", "worker-low")))
        for env in (sts_env, worker_env):
            assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": "wh-secrets", "key": "redis"}


class TestExternalRedis:
    def test_no_redis_objects_and_a_tls_url(self) -> None:
        objects = render_chart(VALUE_SETS["external-redis"])
        assert not [
            o
            for o in objects
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"
        ]
        env = env_of(container(get(objects, "Deployment", "worker-high")))
        assert env["REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
        assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": "managed-redis", "key": "password"}

    def test_password_in_values_goes_to_the_charts_secret(self) -> None:
        objects = render_chart(VALUE_SETS["external-redis-password"])
        c = container(get(objects, "Deployment", "worker-low"))
        assert (
            container_env(objects, c)["REDIS_URL"] == "redis://:ext-redis-pw-123456@10.0.0.5:6379/0"
        )

    def test_without_password(self) -> None:
        objects = render_chart({"redis": {"enabled": False}, "externalRedis": {"host": "r"}})
        env = env_of(container(get(objects, "Deployment", "worker-low")))
        assert "REDIS_PASSWORD" not in env
        assert env["REDIS_URL"] == "redis://r:6379/0"

    def test_host_is_required(self) -> None:
        with pytest.raises(Exception, match=r"externalRedis\.host"):
            render_chart({"redis": {"enabled": False}})


def test_rendered_redis_config_runs_and_requires_the_password(tmp_path: Path) -> None:
    """The StatefulSet's command with its ConfigMap, run by a local redis-server."""
    import redis as redis_py

    objects = render_chart(show_only=REDIS)
    sts = get(objects, "StatefulSet", "redis")
    c = container(sts)
    password = secret_data(objects, "redis")["redis-password"]
    conf = get(objects, "ConfigMap", "redis")["data"]["redis.conf"]
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="wh-chart-redis-"))
    # Only the port, address and data directory move (they are the pod's).
    (tmp_path / "redis.conf").write_text(
        conf.replace("dir /data", f"dir {data}") + f"\nport {port}\nbind 127.0.0.1\n"
    )
    env = {"REDIS_PASSWORD": password}
    args = [expand(a, env) for a in c["args"]]
    args[0] = str(tmp_path / "redis.conf")
    proc = subprocess.Popen(
        [redis_server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        anonymous = redis_py.Redis(port=port)
        client = redis_py.Redis(port=port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_py.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with pytest.raises(redis_py.AuthenticationError):
            anonymous.ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.lpush("default", "x")
        assert (data / "appendonlydir").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


class TestRedisProbes:
    """The RENDERED probe commands, run against a real redis-server that is healthy, loading
    its data, or refusing the password. `redis-cli ping` exits 0 on an error reply, so a probe
    that trusts the exit code passes on a Redis nobody can use."""

    @pytest.fixture
    def pod(self) -> dict[str, Any]:
        objects = render_chart(show_only=REDIS)
        c = container(get(objects, "StatefulSet", "redis"))
        password = secret_data(objects, "redis")["redis-password"]
        env = {"REDIS_PASSWORD": password}
        return {
            "container": c,
            "password": password,
            "REDISCLI_AUTH": expand(env_of(c)["REDISCLI_AUTH"], env),
        }

    @staticmethod
    def run(pod: dict[str, Any], probe: str, port: int, shim: Path, auth: str | None = None) -> Any:
        """The probe's command as the kubelet runs it in the pod; only the port is moved, by a
        redis-cli on PATH that adds -p (the pod's Redis listens on the default 6379)."""
        return subprocess.run(
            pod["container"][probe]["exec"]["command"],
            env={
                "PATH": f"{shim}:{os.environ['PATH']}",
                "REDISCLI_AUTH": auth or pod["REDISCLI_AUTH"],
                "REDIS_PORT": str(port),
            },
            capture_output=True,
            text=True,
            timeout=15,
        )

    @pytest.fixture
    def shim(self, tmp_path: Path) -> Path:
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is needed (apt-get install redis-tools)"
        folder = tmp_path / "bin"
        folder.mkdir()
        (folder / "redis-cli").write_text(f'#!/bin/sh\nexec {cli} -p "$REDIS_PORT" "$@"\n')
        (folder / "redis-cli").chmod(0o755)
        return folder

    def test_probes_pass_on_a_healthy_redis_and_fail_on_a_refused_password(
        self, pod: dict[str, Any], shim: Path
    ) -> None:
        server = RedisServer(password=pod["password"]).start()
        try:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                ok = self.run(pod, probe, server.port, shim)
                assert ok.returncode == 0, (probe, ok.stdout, ok.stderr)
                refused = self.run(pod, probe, server.port, shim, auth="not-the-password")
                assert refused.returncode != 0, (probe, refused.stdout)
                assert "WRONGPASS" in refused.stdout or "NOAUTH" in refused.stdout
        finally:
            server.close()

    def test_while_loading_readiness_fails_and_liveness_waits(
        self, pod: dict[str, Any], shim: Path, tmp_path: Path
    ) -> None:
        """A Redis loading its data answers LOADING to everything: not ready (no traffic), but
        alive, or a long load would be killed and restarted forever. key-load-delay (a
        redis-server setting for exactly this) makes the load of 40000 keys last seconds."""
        import redis as redis_py

        data = tmp_path / "data"
        data.mkdir()
        port = free_port()
        base = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
        ]
        base += ["--requirepass", pod["password"], "--appendonly", "no", "--save", ""]
        first = subprocess.Popen(base, stdout=subprocess.DEVNULL)
        client = redis_py.Redis(port=port, password=pod["password"])
        try:
            wait_for(client)
            pipe = client.pipeline(transaction=False)
            for i in range(40_000):
                pipe.set(f"k{i}", "v")
            pipe.execute()
            client.save()
        finally:
            first.terminate()
            first.wait(timeout=10)
        loading = subprocess.Popen(
            [*base, "--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024"],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:  # until the server answers at all (it may still be starting)
                reply = self.run(pod, "readinessProbe", port, shim)
                if "LOADING" in reply.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert "LOADING" in reply.stdout and reply.returncode != 0, reply.stdout
            assert self.run(pod, "livenessProbe", port, shim).returncode == 0
            assert self.run(pod, "startupProbe", port, shim).returncode == 0
            # ...and with a wrong password even a loading Redis fails every probe.
            for probe in ("livenessProbe", "readinessProbe"):
                assert self.run(pod, probe, port, shim, auth="not-the-password").returncode != 0
            # Once loaded, ready.
            deadline = time.monotonic() + 60
            while self.run(pod, "readinessProbe", port, shim).returncode != 0:
                assert time.monotonic() < deadline, "still not ready after the load"
                time.sleep(0.5)
        finally:
            loading.terminate()
            loading.wait(timeout=10)
            client.close()


def wait_for(client: Any) -> None:
    import redis as redis_py

    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis_py.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
