"""Every value set renders, and every object validates strictly for Kubernetes 1.29..newest."""

from __future__ import annotations

from typing import Any

import pytest
from chart_helpers import KUBE_VERSIONS, MONITORING_API, by_kind, names, render_chart
from value_sets import VALUE_SETS


def kinds(objects: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for obj in objects:
        out[obj["kind"]] = out.get(obj["kind"], 0) + 1
    return out


def test_validated_against_every_kubernetes_version_from_1_29() -> None:
    assert KUBE_VERSIONS[0] == "1.29.0"
    assert len(KUBE_VERSIONS) >= 8, KUBE_VERSIONS


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_value_set_renders_valid_objects(value_set: str) -> None:
    objects = render_chart(VALUE_SETS[value_set])  # validates each object, every version
    assert objects
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "two objects with the same kind and name"


# value set -> (kind, expected count); the shape each set must produce.
EXPECTED = {
    "default": {
        "Deployment": 6,  # worker-high, worker-low, beat, flower, exporter, api
        "HorizontalPodAutoscaler": 3,
        "PodDisruptionBudget": 3,
        "StatefulSet": 1,
        "Ingress": 1,
        # chart (DATABASE_URL), redis password, flower auth, signing key, API tokens file,
        # API admin token, helm-test token
        "Secret": 7,
        "NetworkPolicy": 7,  # redis, flower, workers, beat, exporter, migrate, api
        "Job": 1,
        "Pod": 1,
    },
    "external-redis": {"StatefulSet": 0, "Secret": 6, "NetworkPolicy": 6},
    "keda": {
        "HorizontalPodAutoscaler": 1,
        "ScaledObject": 2,
        "TriggerAuthentication": 1,
    },  # the API HPA
    "keda-external-redis": {"ScaledObject": 2, "TriggerAuthentication": 1, "StatefulSet": 0},
    "evaluation-postgresql": {"StatefulSet": 2, "Secret": 7, "NetworkPolicy": 8},
    "gateway-api": {"Ingress": 0, "HTTPRoute": 1},
    "other-ingress-class": {"Ingress": 1},
    "flower-off": {"Deployment": 5, "Ingress": 0, "Secret": 6},
    "third-queue": {"Deployment": 7, "HorizontalPodAutoscaler": 4, "PodDisruptionBudget": 4},
    "existing-secrets": {"Secret": 0},
    "no-autoscaling": {"HorizontalPodAutoscaler": 1, "ScaledObject": 0},  # the API's
    "monitoring-forced": {"PodMonitor": 1, "ServiceMonitor": 2, "PrometheusRule": 1},
    "minimal-features": {
        "NetworkPolicy": 0,
        "ServiceAccount": 0,
        "Job": 0,
        "Pod": 0,
        "Deployment": 4,
    },
    "sentinel": {"StatefulSet": 1, "PodDisruptionBudget": 4, "Secret": 8, "Service": 4},
    "api-existing-secrets": {"Secret": 3},
    "api-off-signing-off": {"Deployment": 5, "Secret": 3, "HorizontalPodAutoscaler": 2},
    "api-gateway": {"HTTPRoute": 1, "HorizontalPodAutoscaler": 2},
    "api-ingress": {"Ingress": 2, "Secret": 6},
    "sentinel-keda": {"ScaledObject": 2, "TriggerAuthentication": 1, "Secret": 7},
}


@pytest.mark.parametrize("value_set", sorted(EXPECTED))
def test_value_set_shape(value_set: str) -> None:
    found = kinds(render_chart(VALUE_SETS[value_set], validate=False))
    for kind, count in EXPECTED[value_set].items():
        assert found.get(kind, 0) == count, (
            f"{value_set}: {kind} x{found.get(kind, 0)}, want {count}"
        )


def test_prometheus_operator_objects_follow_the_cluster_api() -> None:
    without = render_chart()
    assert not [o for o in without if o["apiVersion"] == MONITORING_API]
    with_api = render_chart(api_versions=[MONITORING_API])
    assert names(with_api, "PodMonitor") and names(with_api, "ServiceMonitor")
    assert names(with_api, "PrometheusRule")
    off = render_chart(
        {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}},
        api_versions=[MONITORING_API],
    )
    assert not [o for o in off if o["apiVersion"] == MONITORING_API]


def test_objects_carry_the_standard_labels() -> None:
    for obj in render_chart(VALUE_SETS["overrides"]):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "waardhaven-tasks", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["cost-center"] == "cc-42"
        assert obj["metadata"]["name"] == "wh" or obj["metadata"]["name"].startswith("wh-")


def test_no_object_sets_a_namespace_so_kustomize_and_helm_decide() -> None:
    for obj in render_chart():
        assert "namespace" not in obj["metadata"]


def test_secret_env_goes_to_a_secret_and_reaches_every_container() -> None:
    objects = render_chart(VALUE_SETS["overrides"])
    secret = next(o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == "wh")
    assert "TWELVEDATA_API_KEY" in secret["data"]
    for obj in objects:
        if obj["kind"] in {"Deployment", "Job", "Pod"}:
            spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                refs = [e.get("secretRef", {}).get("name") for e in c["envFrom"]]
                assert "wh" in refs and "more-secrets" in refs, obj["metadata"]["name"]
