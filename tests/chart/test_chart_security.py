"""Policies every value set must keep: hardened pods, limits, probes, no secret in plain sight."""

from __future__ import annotations

import base64
import functools
import json
import re
from typing import Any

import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    DB_URL,
    MINIMAL,
    by_kind,
    get,
    merge,
    pod_spec,
    render_chart,
    render_templates,
    workloads,
)
from value_sets import VALUE_SETS

APP_VERSION = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
SETS = sorted(VALUE_SETS)


@functools.cache
def rendered(value_set: str) -> list[dict[str, Any]]:
    return render_chart(VALUE_SETS[value_set], validate=False)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    found: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    return found


@pytest.mark.parametrize("value_set", SETS)
def test_every_pod_and_container_is_hardened(value_set: str) -> None:
    for obj in workloads(rendered(value_set)):
        spec = pod_spec(obj)
        name = obj["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            # A read-only root needs a writable /tmp (health files, metrics).
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], name


@pytest.mark.parametrize("value_set", SETS)
def test_every_container_has_requests_limits_and_probes(value_set: str) -> None:
    for obj in workloads(rendered(value_set)):
        for c in containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            if obj["kind"] in {"Job", "Pod"} or c in pod_spec(obj).get("initContainers", []):
                continue  # run-to-completion: nothing to probe (init containers cannot be)
            assert "livenessProbe" in c and "readinessProbe" in c, where


@pytest.mark.parametrize("value_set", SETS)
def test_images_are_pinned_never_latest(value_set: str) -> None:
    for obj in workloads(rendered(value_set)):
        for c in containers(obj):
            image = c["image"]
            assert not image.endswith(":latest") and (
                ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image
            )
    default = get(rendered("default"), "Deployment", "worker-high")
    assert containers(default)[0]["image"].endswith(f":{APP_VERSION}")


def test_latest_is_refused() -> None:
    with pytest.raises(Exception, match="image/tag"):
        render_chart({"image": {"tag": "latest"}})


# Secret values handed to the chart in these tests: none may appear outside a Secret.
SECRET_VALUES = {
    DB_URL,
    "db-secret-Xy7",
    "td-key-0123456789",
    "ext-redis-pw-123456",
}


@pytest.mark.parametrize("value_set", SETS)
def test_no_secret_value_outside_secrets(value_set: str) -> None:
    objects = rendered(value_set)
    secrets = {
        base64.b64decode(v).decode()
        for s in by_kind(objects, "Secret")
        for v in s.get("data", {}).values()
    }
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        for value in SECRET_VALUES | {s for s in secrets if len(s) >= 8}:
            if value in {"admin", "DATABASE_URL"}:
                continue
            assert value not in text, (
                f"{obj['kind']}/{obj['metadata']['name']} holds a secret value"
            )


@pytest.mark.parametrize("value_set", SETS)
def test_configmaps_hold_no_credentials(value_set: str) -> None:
    for cm in by_kind(rendered(value_set), "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)", key), key
            assert not re.search(r"://[^/@\s]*:[^/@\s]+@", value), f"{cm['metadata']['name']}/{key}"


def test_generated_passwords_differ_between_installs_so_none_is_a_default() -> None:
    """Offline, `lookup` finds nothing: each render is a new install with new passwords."""

    def passwords() -> dict[str, str]:
        objects = render_chart()
        out = {}
        for s in by_kind(objects, "Secret"):
            for key, value in s.get("data", {}).items():
                out[f"{s['metadata']['name']}/{key}"] = base64.b64decode(value).decode()
        return out

    first, second = passwords(), passwords()
    generated = {k for k in first if k.endswith(("redis-password", "/password"))}
    assert generated == {
        "waardhaven-tasks-redis/redis-password",
        "waardhaven-tasks-flower-auth/password",
    }
    for key in generated:
        assert first[key] != second[key], key
        assert len(first[key]) >= 20


def test_no_password_literal_in_the_chart_sources() -> None:
    for path in CHART_DIR.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".tpl", ".json", ".txt"}:
            text = path.read_text()
            assert not re.search(r"(?i)password:\s*[\"']?[A-Za-z0-9]{4,}", text), path


def test_network_policies_fence_redis_flower_and_workers() -> None:
    objects = rendered("default")
    redis = get(objects, "NetworkPolicy", "redis")
    peers = redis["spec"]["ingress"][0]["from"]
    assert peers == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "waardhaven-tasks",
                    "app.kubernetes.io/instance": "waardhaven-tasks",
                }
            }
        }
    ]
    assert redis["spec"]["ingress"][0]["ports"] == [{"port": 6379, "protocol": "TCP"}]
    flower = get(objects, "NetworkPolicy", "flower")
    assert len(flower["spec"]["ingress"][0]["from"]) == 2  # ingress controller + Prometheus
    workers = get(objects, "NetworkPolicy", "workers")
    assert workers["spec"]["ingress"][0]["ports"] == [{"port": 9808, "protocol": "TCP"}]
    assert get(objects, "NetworkPolicy", "beat")["spec"]["ingress"] == []


def test_an_empty_peer_list_denies_instead_of_allowing_all() -> None:
    values: dict[str, Any] = {"networkPolicy": {"ingressControllerFrom": [], "prometheusFrom": []}}
    for np in by_kind(render_chart(values), "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            assert rule.get("from"), f"{np['metadata']['name']}: a rule without peers allows all"


def test_service_links_off_so_no_flower_port_clash() -> None:
    for obj in workloads(rendered("default")):
        assert pod_spec(obj)["enableServiceLinks"] is False


def test_notes_and_templates_contain_no_secret() -> None:
    values: dict[str, Any] = merge(
        MINIMAL, {"flower": {"auth": {"password": "given-flower-password"}}}
    )
    notes = render_templates(values)["templates/NOTES.txt"]
    assert "given-flower-password" not in notes and "db-secret-Xy7" not in notes
