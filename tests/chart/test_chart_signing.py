"""Signed task messages, the chart part (issue 11 point 3): the generated key, its mounts, and a
worker from the rendered Deployment that runs a signed task and refuses an unsigned one."""

from __future__ import annotations

import datetime as dt
import secrets
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_helpers import (
    container,
    env_of,
    external_redis,
    get,
    merge,
    names,
    pod_spec,
    render_chart,
    secret_data,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from helm_python import HelmError
from pod_runner import LocalPod, container_env, local_mounts, relocate
from value_sets import VALUE_SETS

from conftest import RedisServer, create_database

SENDERS = [
    ("Deployment", "worker-high"),
    ("Deployment", "worker-low"),
    ("Deployment", "beat"),
    ("Deployment", "flower"),
    ("Deployment", "api"),
    ("Pod", "test-ping"),
]


def test_generated_key_is_rsa_and_the_certificate_is_its_own_and_long_lived() -> None:
    objects = render_chart({"signing": {"validityDays": 1000}})
    data = secret_data(objects, "signing")
    key = serialization.load_pem_private_key(data["signing.key"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)  # Celery's `auth` serializer takes RSA only
    cert = x509.load_pem_x509_certificate(data["signing.crt"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    assert 998 <= days <= 1000
    secret = get(objects, "Secret", "signing")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(("kind", "name"), SENDERS)
def test_every_sender_signs_with_the_key_and_trusts_a_store_of_certificates_only(
    kind: str, name: str
) -> None:
    objects = render_chart(
        {"signing": {"extraCertificates": {"next": "-----BEGIN CERTIFICATE-----\nx\n"}}}
    )
    obj = get(objects, kind, name)
    c = container(obj)
    env = env_of(c)
    assert env["TASK_SIGNING"] == "true"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[env["TASK_SIGNING_CERT_STORE"]] == "signing-certs"
    assert env["TASK_SIGNING_KEY"].rsplit("/", 1)[0] in mounts
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    store = volumes["signing-certs"]["projected"]["sources"]
    assert store[0]["secret"]["items"] == [{"key": "signing.crt", "path": "signing.crt"}]
    assert store[1]["configMap"]["name"] == "waardhaven-tasks-signing-certs"
    certs = get(objects, "ConfigMap", "signing-certs")["data"]
    assert list(certs) == ["next.crt"]
    if kind == "Deployment":
        assert "checksum/signing" in obj["spec"]["template"]["metadata"]["annotations"]


def test_pods_roll_when_the_trusted_certificates_change() -> None:
    def checksum(values: dict[str, Any]) -> str:
        beat = get(render_chart(values), "Deployment", "beat")
        return str(beat["spec"]["template"]["metadata"]["annotations"]["checksum/signing"])

    base = VALUE_SETS["api-existing-secrets"]
    more = merge(base, {"signing": {"extraCertificates": {"next": "-----BEGIN CERTIFICATE-----"}}})
    assert checksum(base) == checksum(base)
    assert checksum(base) != checksum(more)


def test_existing_secret_and_off() -> None:
    objects = render_chart(VALUE_SETS["api-existing-secrets"])
    assert "waardhaven-tasks-signing" not in names(objects, "Secret")
    volume = next(
        v
        for v in pod_spec(get(objects, "Deployment", "worker-low"))["volumes"]
        if v["name"] == "signing"
    )
    assert volume["secret"]["secretName"] == "wh-signing"
    off = render_chart(VALUE_SETS["api-off-signing-off"])
    for obj in off:
        if obj["kind"] in {"Deployment", "Pod"}:
            assert "TASK_SIGNING" not in env_of(
                container(obj, pod_spec(obj)["containers"][0]["name"])
            )
    assert "waardhaven-tasks-signing" not in names(off, "Secret")


def test_an_upgrade_that_cannot_read_the_key_back_fails_naming_the_value() -> None:
    values = merge(VALUE_SETS["gitops"], {"signing": {"existingSecret": ""}})
    with pytest.raises(HelmError, match=r"set signing\.existingSecret"):
        render_chart(values, is_upgrade=True)


# --- a worker from the rendered Deployment, run -----------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(12)).start()
    yield server
    server.close()


def test_rendered_worker_runs_a_signed_task_and_refuses_an_unsigned_one(
    broker: RedisServer, tmp_path: Path
) -> None:
    from celery.result import AsyncResult

    from tasks.celery_app import create_app
    from tasks.settings import Settings

    objects = render_chart({**external_redis(broker), "database": {"url": create_database()}})
    deployment = get(objects, "Deployment", "worker-low")
    worker = LocalPod(
        objects,
        container(deployment),
        tmp_path / "worker.log",
        pod_spec(deployment),
        HEALTH_DIR=str(tmp_path / "health"),
        METRICS_PORT="0",
    )
    try:
        worker.wait_probe("startupProbe", 90)
        # A sender with the rendered key (as beat, the API, the test pod), and one without.
        mounts = local_mounts(objects, pod_spec(deployment), container(deployment), tmp_path / "k")
        env = container_env(objects, container(deployment))
        keys = {
            k.lower(): relocate(env[k], mounts)
            for k in ("TASK_SIGNING_KEY", "TASK_SIGNING_CERT", "TASK_SIGNING_CERT_STORE")
        }
        signed = create_app(Settings(redis_url=broker.url, task_signing=True, **keys))
        plain = create_app(Settings(redis_url=broker.url))
        ok = signed.send_task("ping", queue="default")
        assert ok.get(timeout=60) == "pong"
        task_id = str(uuid.uuid4())
        plain.send_task("ping", task_id=task_id, queue="default")
        result = AsyncResult(task_id, app=plain)
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE"
        assert f"Refused task message ping[{task_id}]" in worker.output
        assert "content type 'application/json' is not accepted" in worker.output
        assert worker.proc.poll() is None  # refused, not crashed
        assert signed.send_task("ping", queue="default").get(timeout=60) == "pong"
    finally:
        worker.stop(signal.SIGTERM, timeout=30)
