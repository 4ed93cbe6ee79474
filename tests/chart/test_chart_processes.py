"""The rendered containers' real commands, run as local processes against real Redis/PostgreSQL.

The chart is rendered with an external Redis (a password-protected redis-server of this module)
and a fresh PostgreSQL database, so REDIS_URL and DATABASE_URL are composed exactly as in a pod
(`$(REDIS_PASSWORD)` expanded from the Secret the chart rendered). Each test takes one
container's args, env and probes and runs them from the repository root, as the image runs them
from /app. Only ports and the health-file directory are moved, so that tests do not collide.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_helpers import REPO, container, external_redis, get, merge, pod_spec, render_chart
from pod_runner import LocalPod, argv_of, container_env, local_mounts, process_env, relocate
from value_sets import VALUE_SETS

from conftest import RedisServer, create_database, free_port, http_status

SERVICES = ["worker-high", "worker-low", "beat", "flower"]
# The values under test: everything else is the chart's defaults.
SCHEDULE = "* * * * *"  # crontab cannot go faster than a minute
SOFT_SHUTDOWN = "2"


def require_services() -> None:
    missing = [s for s in SERVICES if not (REPO / "services" / s / "run").exists()]
    if missing or not (REPO / "shared" / "tasks" / "celery_app.py").exists():
        pytest.fail(
            f"the services' commands do not exist yet: services/{missing}/run, tasks.celery_app"
        )


_database: list[str] = []


def process_values(broker: RedisServer) -> dict[str, Any]:
    """The chart's values for these tests: external Redis = our redis-server, a fresh database."""
    require_services()
    if not _database:
        _database.append(create_database())
    return {
        **external_redis(broker),
        "database": {"url": _database[0]},
        "config": {
            "SCHEDULE_COMPUTE_INDEX": SCHEDULE,
            "WORKER_SOFT_SHUTDOWN_TIMEOUT": SOFT_SHUTDOWN,
        },
    }


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(12)).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def objects(broker: RedisServer) -> list[dict[str, Any]]:
    require_services()
    values = {
        **external_redis(broker),
        "database": {"url": create_database()},
        "config": {
            "SCHEDULE_COMPUTE_INDEX": SCHEDULE,
            "WORKER_SOFT_SHUTDOWN_TIMEOUT": SOFT_SHUTDOWN,
        },
    }
    return render_chart(values)


@pytest.fixture(scope="module", autouse=True)
def early_beat(
    objects: list[dict[str, Any]], broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalPod]:
    """beat from its rendered Deployment, started with the module (its first send is up to a
    minute away), on Redis database 1 so that the workers of the other tests see none of it."""
    beat_objects = render_chart(merge(process_values(broker), {"externalRedis": {"db": 1}}))
    tmp = tmp_path_factory.mktemp("beat")
    beat = container(get(beat_objects, "Deployment", "beat"))
    pod = LocalPod(
        beat_objects,
        beat,
        tmp / "beat.log",
        pod_spec(get(beat_objects, "Deployment", "beat")),
        HEALTH_DIR=str(tmp / "health"),
    )
    yield pod
    pod.stop(signal.SIGKILL)


@pytest.fixture
def redis(broker: RedisServer) -> Iterator[Any]:
    import redis as redis_py

    client = redis_py.Redis.from_url(broker.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def celery_client(
    broker: RedisServer, objects: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """A Celery app of our own on the module's broker (the test process submits with it),
    signing with the key the chart generated, as every sender in the release does."""
    from tasks.celery_app import create_app
    from tasks.settings import Settings

    worker = get(objects, "Deployment", "worker-high")
    mounts = local_mounts(
        objects, pod_spec(worker), container(worker), tmp_path_factory.mktemp("signing")
    )
    env = container_env(objects, container(worker))
    signing = {
        k.lower(): relocate(env[k], mounts)
        for k in ("TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE")
    }
    return create_app(Settings(redis_url=broker.url, task_signing=True, **signing))


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Any]:
    started: list[LocalPod] = []

    def start(objects: list[dict[str, Any]], kind: str, name: str, **overrides: str) -> LocalPod:
        obj = get(objects, kind, name)
        c = container(obj)
        overrides.setdefault("HEALTH_DIR", str(tmp_path / "health" / name))
        pod = LocalPod(objects, c, tmp_path / f"{name}.log", pod_spec(obj), **overrides)
        started.append(pod)
        return pod

    yield start
    for pod in started:
        pod.stop(signal.SIGKILL)


def run_helm_test(
    objects: list[dict[str, Any]], pods: Any, root: Path, **overrides: str
) -> subprocess.CompletedProcess[str]:
    """The `helm test` pod, with the API it calls (its rendered Deployment) started first;
    the test pod's mounts (signing key, the helm-test token) are written under root."""
    port = free_port()
    pods(objects, "Deployment", "api", API_PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while http_status(url + "/healthz") != 200:
        assert time.monotonic() < deadline, "the API never answered /healthz"
        time.sleep(0.3)
    test_pod = get(objects, "Pod", "test-ping")
    c = container(test_pod)
    mounts = local_mounts(objects, pod_spec(test_pod), c, root)
    env = {k: relocate(v, mounts) for k, v in container_env(objects, c).items()}
    env = process_env(env, API_URL=url, **overrides)
    argv = [relocate(a, mounts) for a in argv_of(c, env)]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def queued_tasks(redis: Any, queue: str) -> list[str]:
    """Task names of the messages waiting in a kombu Redis queue."""
    return [json.loads(raw)["headers"]["task"] for raw in redis.lrange(queue, 0, -1)]


def test_redis_url_is_composed_from_the_secret(
    objects: list[dict[str, Any]], broker: RedisServer
) -> None:
    env = container_env(objects, container(get(objects, "Deployment", "worker-high")))
    assert env["REDIS_URL"] == broker.url
    worker = container(get(objects, "Deployment", "worker-high"))
    assert "$(REDIS_PASSWORD)" in next(
        e["value"] for e in worker["env"] if e["name"] == "REDIS_URL"
    )


def test_migrations_run_first_and_twice_without_harm(broker: RedisServer) -> None:
    """The wait-for-migrations init container of workers and beat holds them while the schema
    is old; the migrate Job brings it to head, and running it again changes nothing."""
    from sqlalchemy import create_engine, inspect, text

    values = merge(
        process_values(broker),
        {"database": {"url": create_database(), "migrate": {"waitTimeout": 10}}},
    )
    objects = render_chart(values)
    init = pod_spec(get(objects, "Deployment", "worker-high"))["initContainers"][0]
    job = container(get(objects, "Job", "migrate-1"))

    def run(c: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        env = process_env(container_env(objects, c))
        return subprocess.run(
            argv_of(c, env), cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )

    held = run(init)
    assert held.returncode != 0 and "schema not migrated" in held.stdout + held.stderr
    for attempt in (1, 2):
        done = run(job)
        assert done.returncode == 0, f"migrate run {attempt}: {done.stdout}{done.stderr}"
    released = run(init)
    assert released.returncode == 0, released.stdout + released.stderr

    engine = create_engine(container_env(objects, job)["DATABASE_URL"])
    try:
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            versions = conn.execute(text("select count(*) from alembic_version")).scalar()
    finally:
        engine.dispose()
    assert {"alembic_version", "assets", "prices"} <= tables
    assert versions == 1


@pytest.mark.parametrize(
    ("worker", "own", "other"),
    [("high", "high_priority", "low_priority"), ("low", "low_priority", "high_priority")],
)
def test_worker_consumes_only_its_queues(
    objects: list[dict[str, Any]],
    pods: Any,
    redis: Any,
    celery_client: Any,
    worker: str,
    own: str,
    other: str,
) -> None:
    deployment = get(objects, "Deployment", f"worker-{worker}")
    pod = pods(objects, "Deployment", f"worker-{worker}", METRICS_PORT=str(free_port()))
    pod.wait_probe("startupProbe", timeout=90)
    assert pod.exec_probe("readinessProbe").returncode == 0
    assert pod.exec_probe("livenessProbe").returncode == 0

    foreign = celery_client.send_task("ping", queue=other)
    mine = celery_client.send_task("ping", queue=own)
    assert mine.get(timeout=30) == "pong"
    time.sleep(2)  # time enough to (wrongly) take the other one too
    assert queued_tasks(redis, other) == ["ping"], f"worker-{worker} consumed from {other}"
    assert foreign.id not in pod.output
    assert f"{worker}@" in pod.output  # the pod's --hostname

    # SIGTERM as the kubelet sends it: dumb-init forwards it to celery only; REMAP_SIGTERM makes
    # it a soft shutdown that ends well inside the pod's grace period.
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    started = time.monotonic()
    code = pod.stop(signal.SIGTERM, timeout=grace)
    assert code is not None, f"worker-{worker} outlived its grace period of {grace}s"
    assert time.monotonic() - started < grace
    assert "soft shutdown" in pod.output.lower(), pod.output[-2000:]


def test_worker_serves_metrics_on_its_metrics_port(
    objects: list[dict[str, Any]], pods: Any, redis: Any
) -> None:
    deployment = get(objects, "Deployment", "worker-high")
    c = container(deployment)
    port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert container_env(objects, c)["METRICS_PORT"] == str(port)
    local = free_port()  # the pod's port, moved so that tests do not collide
    pod = pods(objects, "Deployment", "worker-high", METRICS_PORT=str(local))
    pod.wait_probe("startupProbe", timeout=90)
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/metrics", timeout=5) as r:
                assert r.status == 200
                break
        except urllib.error.URLError as exc:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the worker serves no /metrics on METRICS_PORT ({exc}): tasks.metrics.install"
                )
            time.sleep(0.5)


def test_helm_test_pod_gets_pong_from_a_worker(
    objects: list[dict[str, Any]], pods: Any, redis: Any, tmp_path: Path
) -> None:
    pods(objects, "Deployment", "worker-low", METRICS_PORT="0").wait_probe("startupProbe", 90)
    # As in the cluster: the migrate Job has run before `helm test` (it checks the schema).
    job = container(get(objects, "Job", "migrate-1"))
    job_env = process_env(container_env(objects, job))
    migrated = subprocess.run(
        argv_of(job, job_env), cwd=REPO, env=job_env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    test_pod = get(objects, "Pod", "test-ping")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    done = run_helm_test(objects, pods, tmp_path / "helm-test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"pong"' in done.stdout
    # ...and through the API with the helm-test token: POST /v1/tasks/ping, GET until SUCCESS.
    assert "api: ping" in done.stdout and "SUCCESS pong" in done.stdout, done.stdout
    assert "redis: PONG" in done.stdout and "schema at" in done.stdout + done.stderr


def test_beat_sends_the_schedule(early_beat: LocalPod, broker: RedisServer) -> None:
    import redis as redis_py

    early_beat.wait_probe("startupProbe", timeout=60)
    assert early_beat.exec_probe("livenessProbe").returncode == 0
    client = redis_py.Redis.from_url(early_beat.env["REDIS_URL"])
    try:
        # The crontab RedBeat keeps in Redis is the one from the chart's ConfigMap.
        definition = client.hget("waardhaven:redbeat:compute-index-hourly", "definition")
        assert definition, client.keys("waardhaven:redbeat:*")
        assert json.loads(definition)["schedule"]["minute"] == SCHEDULE.split()[0]
        # "* * * * *": sent at the next minute boundary (beat started with the module).
        deadline = time.monotonic() + 75
        while "compute_index" not in queued_tasks(client, "high_priority"):
            assert time.monotonic() < deadline, early_beat.output[-3000:]
            time.sleep(0.5)
        assert "Sending due task compute-index-hourly" in early_beat.output
    finally:
        client.close()
    assert early_beat.stop(signal.SIGTERM, timeout=30) is not None


def flower_paths() -> list[str]:
    """One concrete path per route of Flower's URL table (what a Prefix rule exposes)."""
    from flower import urls
    from tornado.web import URLSpec

    out = []
    for entry in urls.handlers:
        pattern = entry.regex.pattern if isinstance(entry, URLSpec) else entry[0]
        pattern = pattern.rstrip("$")
        path = pattern.replace("(.+)", "x").replace("(.*)", "x").replace("/?", "")
        out.append("/no-such-page" if path == ".*" else path)
    return out


def test_flower_guards_every_path_the_ingress_and_the_route_expose(
    objects: list[dict[str, Any]], pods: Any, broker: RedisServer
) -> None:
    """Flower started as services/flower/run starts it: every path under the prefix that the
    Ingress or the HTTPRoute sends to Flower answers 401 without credentials, whatever the
    controller in front (Flower 2.2 alone leaves /metrics, /healthcheck, /static open)."""
    flower = pods(objects, "Deployment", "flower", FLOWER_PORT=str(free_port()))
    base = f"http://127.0.0.1:{flower.env['FLOWER_PORT']}"
    flower.wait_probe("livenessProbe", timeout=60)
    assert flower.exec_probe("readinessProbe").returncode == 0

    route_values = merge(process_values(broker), VALUE_SETS["gateway-api"])
    route = get(render_chart(route_values), "HTTPRoute", "flower")
    ingress = get(objects, "Ingress", "flower")
    prefixes = {
        ingress["spec"]["rules"][0]["http"]["paths"][0]["path"],
        route["spec"]["rules"][0]["matches"][0]["path"]["value"],
    }
    assert prefixes == {"/flower"}
    secret = get(objects, "Secret", "flower-auth")
    user_password = base64.b64decode(secret["data"]["basic-auth"]).decode()
    user, password = user_password.split(":", 1)
    assert user == "admin" and len(password) >= 20

    paths = flower_paths()
    assert {"/metrics", "/healthcheck", "/static/x", "/login", "/api/workers"} <= set(paths)
    for prefix in prefixes:
        for path in paths:
            url = f"{base}{prefix}{path}"
            assert http_status(url) == 401, f"{url} answers without credentials"
            assert http_status(url, f"{user}:wrong-password") == 401, url
            assert http_status(url, user_password) != 401, f"{url} refuses the right password"
        for path in ("/", "/workers", "/tasks", "/metrics", "/healthcheck", "/api/workers"):
            assert http_status(f"{base}{prefix}{path}", user_password) == 200, path
    # The probes authenticate; with a wrong password they fail.
    flower.env["FLOWER_BASIC_AUTH"] = f"{user}:not-the-password"
    assert flower.exec_probe("readinessProbe").returncode != 0
    assert flower.exec_probe("livenessProbe").returncode != 0


def test_evaluation_install_helm_test_passes_against_the_in_chart_postgresql_wiring(
    broker: RedisServer, pods: Any, tmp_path: Path
) -> None:
    """No database given: the pods reach the chart's PostgreSQL with the generated password
    (DATABASE_URL composed from $(DATABASE_PASSWORD)), the rendered probe commands pass, the
    migrate Job migrates and the `helm test` pod passes. The server is the machine's
    PostgreSQL (not the official image, which needs a container runtime) under a role and
    database of the rendered names; only the Service's host name is moved to 127.0.0.1."""
    from sqlalchemy import create_engine, text

    from conftest import ADMIN_PG_URL

    name = f"wh_eval_{secrets.token_hex(4)}"
    values = merge(
        process_values(broker),
        {"database": {"url": ""}, "postgresql": {"auth": {"username": name, "database": name}}},
    )
    objects = render_chart(values)
    sts = get(objects, "StatefulSet", "postgresql")
    pg = container(sts)
    password = base64.b64decode(get(objects, "Secret", "postgresql")["data"]["postgres-password"])
    admin = create_engine(ADMIN_PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN PASSWORD '{password.decode()}'"))
        conn.execute(text(f"CREATE DATABASE {name} OWNER {name}"))
    try:
        pg_env = process_env(container_env(objects, pg))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            done = subprocess.run(
                pg[probe]["exec"]["command"], env=pg_env, capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, (probe, done.stdout, done.stderr)
            down = subprocess.run(
                pg[probe]["exec"]["command"],
                env={**pg_env, "PGPORT": str(free_port())},  # nothing listens there
                capture_output=True,
                timeout=30,
            )
            assert down.returncode != 0, probe

        def moved(c: dict[str, Any]) -> dict[str, str]:
            env = container_env(objects, c)
            assert (
                f":{password.decode()}@waardhaven-tasks-postgresql:5432/{name}"
                in (env["DATABASE_URL"])
            )
            return {
                "DATABASE_URL": env["DATABASE_URL"].replace(
                    "@waardhaven-tasks-postgresql:", "@127.0.0.1:"
                )
            }

        job = container(get(objects, "Job", "migrate-1"))
        job_env = process_env(container_env(objects, job), **moved(job))
        migrated = subprocess.run(
            argv_of(job, job_env),
            cwd=REPO,
            env=job_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr

        worker = container(get(objects, "Deployment", "worker-low"))
        pods(objects, "Deployment", "worker-low", METRICS_PORT="0", **moved(worker)).wait_probe(
            "startupProbe", 90
        )
        test_pod = container(get(objects, "Pod", "test-ping"))
        done = run_helm_test(objects, pods, tmp_path / "helm-test", **moved(test_pod))
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"pong"' in done.stdout
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()
