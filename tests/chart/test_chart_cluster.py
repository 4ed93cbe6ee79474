"""The conditions of a real cluster (issue 10): an umbrella chart, GitOps and upgrade renders,
changed credentials, other ingress controllers and the Gateway API, tainted nodes, the
evaluation install, migrations before the new code."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    MINIMAL,
    MONITORING_API,
    by_kind,
    container,
    env_of,
    get,
    merge,
    pod_spec,
    render_chart,
    render_templates,
    secret_data,
    validate_object,
    workloads,
)
from value_sets import SCHEDULING, VALUE_SETS

# --- 2. a dependency of an umbrella chart ---------------------------------------------------


def test_renders_as_a_subchart_with_global_values(tmp_path: Path) -> None:
    umbrella = tmp_path / "platform"
    umbrella.mkdir()
    (umbrella / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "platform",
                "version": "1.0.0",
                "dependencies": [
                    {
                        "name": "waardhaven-tasks",
                        "version": "*",
                        "repository": f"file://{CHART_DIR}",
                    }
                ],
            }
        )
    )
    (umbrella / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "global": {"imagePullSecrets": [{"name": "corp-registry"}], "env": "prod"},
                "waardhaven-tasks": MINIMAL,
            }
        )
    )
    helm.dependency_update(umbrella)
    assert (umbrella / "charts").is_dir()
    with helm.Chart.load(umbrella) as chart:
        rendered = chart.render(name="platform", namespace="apps", is_install=True)
    objects = [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    deployments = {o["metadata"]["name"] for o in by_kind(objects, "Deployment")}
    assert "platform-waardhaven-tasks-worker-high" in deployments
    for obj in workloads(objects):
        validate_object(obj)
        assert {"name": "corp-registry"} in pod_spec(obj)["imagePullSecrets"]


# --- 3. credentials -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "set redis.auth.password or redis.auth.existingSecret"),
        (
            {
                "redis": {"auth": {"password": "redis-given-0123456789"}},
                "signing": {"existingSecret": "wh-signing"},
                "api": {"tokens": {"existingSecret": "wh-api-tokens"}},
            },
            "set flower.auth.password (and flower.auth.htpasswd) or flower.auth.existingSecret",
        ),
        (
            {**VALUE_SETS["gitops"], "database": {"url": ""}},
            "set postgresql.auth.password or postgresql.auth.existingSecret",
        ),
        (
            {**VALUE_SETS["gitops"], "api": {"tokens": {"existingSecret": ""}}},
            "set api.tokens.entries (or api.tokens.existingSecret)",
        ),
        (
            {**VALUE_SETS["gitops"], "signing": {"existingSecret": ""}},
            "set signing.existingSecret",
        ),
        (
            merge(VALUE_SETS["gitops"], {"redis": {"sentinel": {"enabled": True}}}),
            "set redis.sentinel.auth.password or redis.sentinel.auth.existingSecret",
        ),
    ],
)
def test_an_upgrade_that_cannot_read_a_generated_credential_back_fails(
    values: dict[str, Any], message: str
) -> None:
    """No cluster (helm template --is-upgrade, a client-side dry run): `lookup` finds nothing.
    Generating a new password would lock every client out of the data: fail and say what to set."""
    with pytest.raises(helm.HelmError) as info:
        render_templates(merge(MINIMAL, values), is_upgrade=True)
    assert message in str(info.value), str(info.value)
    assert "cannot be read back" in str(info.value)


def test_an_upgrade_with_every_credential_given_renders() -> None:
    assert render_chart(VALUE_SETS["gitops"], is_upgrade=True)
    assert render_chart(VALUE_SETS["existing-secrets"], is_upgrade=True)


def _secrets(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        s["metadata"]["name"]: secret_data([s], s["metadata"]["name"])
        for s in by_kind(render_chart(values), "Secret")
    }


def test_gitops_two_template_renders_give_identical_secrets_htpasswd_included() -> None:
    first, second = _secrets(VALUE_SETS["gitops"]), _secrets(VALUE_SETS["gitops"])
    assert first == second
    flower = first["waardhaven-tasks-flower-auth"]
    assert flower["auth"] == VALUE_SETS["gitops"]["flower"]["auth"]["htpasswd"]
    assert flower["basic-auth"] == "admin:flower-gitops-0123456789"
    assert first["waardhaven-tasks-redis"]["redis-password"] == "redis-gitops-0123456789"

    # ...and the pods' checksums too, so a GitOps sync does not roll them for nothing.
    def annotations(objects: list[dict[str, Any]]) -> list[Any]:
        return [
            o["spec"]["template"]["metadata"]["annotations"] for o in by_kind(objects, "Deployment")
        ]

    assert annotations(render_chart(VALUE_SETS["gitops"])) == annotations(
        render_chart(VALUE_SETS["gitops"])
    )


def test_within_one_render_every_object_sees_the_same_generated_password() -> None:
    objects = render_chart()
    password = secret_data(objects, "redis")["redis-password"]
    import hashlib

    sts = get(objects, "StatefulSet", "redis")
    checksum = sts["spec"]["template"]["metadata"]["annotations"]["checksum/credentials"]
    assert checksum == hashlib.sha256(password.encode()).hexdigest()


def _pod_annotations(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["metadata"].get(
            "annotations", {}
        )
        for o in workloads(render_chart(merge(VALUE_SETS["gitops"], values)))
        if o["kind"] in {"Deployment", "StatefulSet"}
    }


USES_REDIS = {
    "Deployment/waardhaven-tasks-worker-high",
    "Deployment/waardhaven-tasks-worker-low",
    "Deployment/waardhaven-tasks-beat",
    "Deployment/waardhaven-tasks-flower",
    "Deployment/waardhaven-tasks-exporter",
    "Deployment/waardhaven-tasks-api",
    "StatefulSet/waardhaven-tasks-redis",
}


@pytest.mark.parametrize(
    ("change", "rolled"),
    [
        ({"redis": {"auth": {"password": "redis-changed-0123456789"}}}, USES_REDIS),
        (
            {"flower": {"auth": {"password": "flower-changed-012345", "htpasswd": ""}}},
            {"Deployment/waardhaven-tasks-flower"},
        ),
        (
            {"database": {"url": "postgresql+psycopg2://u:changed@db:5432/w"}},
            USES_REDIS - {"StatefulSet/waardhaven-tasks-redis"},
        ),
    ],
)
def test_a_changed_credential_rolls_exactly_the_pods_that_use_it(
    change: dict[str, Any], rolled: set[str]
) -> None:
    before, after = _pod_annotations({}), _pod_annotations(change)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == rolled


# --- 4. Flower behind any controller ----------------------------------------------------------


def test_another_ingress_controller_gets_no_nginx_annotations_and_tls() -> None:
    ingress = get(render_chart(VALUE_SETS["other-ingress-class"]), "Ingress", "flower")
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert not [a for a in ingress["metadata"].get("annotations", {}) if "nginx" in a]
    assert ingress["spec"]["tls"] == [
        {"secretName": "waardhaven-tasks-flower-tls", "hosts": ["f.example"]}
    ]


def test_cert_manager_issuer_and_tls_secret_name() -> None:
    values = {
        "flower": {
            "ingress": {
                "host": "flower.example.com",
                "tls": {"secretName": "flower-cert"},
                "certManager": {"issuer": "internal-ca"},
            }
        }
    }
    ingress = get(render_chart(values), "Ingress", "flower")
    assert ingress["metadata"]["annotations"]["cert-manager.io/issuer"] == "internal-ca"
    assert ingress["spec"]["tls"][0]["secretName"] == "flower-cert"
    off = {"flower": {"ingress": {"host": "flower.example.com", "tls": {"enabled": False}}}}
    assert "tls" not in get(render_chart(off), "Ingress", "flower")["spec"]


def test_gateway_api_httproute_to_flower() -> None:
    objects = render_chart(VALUE_SETS["gateway-api"])
    route = get(objects, "HTTPRoute", "flower")
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "gateway", "sectionName": "https"}
    ]
    assert route["spec"]["hostnames"] == ["flower.example.com"]
    rule = route["spec"]["rules"][0]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/flower"}}]
    assert rule["backendRefs"] == [{"name": "waardhaven-tasks-flower", "port": 5555}]
    with pytest.raises(helm.HelmError, match=r"flower\.httpRoute\.parentRefs"):
        render_chart({"flower": {"httpRoute": {"enabled": True}}})


# --- 6. migrations first, scheduling everywhere, extras, annotations --------------------------


def test_migrations_run_before_the_new_code() -> None:
    objects = render_chart()
    job = get(objects, "Job", "migrate-1")
    assert "helm.sh/hook" not in job["metadata"].get("annotations", {})  # no --wait deadlock
    assert container(job)["args"] == ["waardhaven-tasks", "migrate"]
    for name in ("worker-high", "worker-low", "beat"):
        init = pod_spec(get(objects, "Deployment", name))["initContainers"][0]
        assert init["name"] == "wait-for-migrations"
        assert init["args"][:2] == ["waardhaven-tasks", "wait-for-migrations"]
        assert env_of(init)["DATABASE_URL"] == env_of(container(job))["DATABASE_URL"]
    # Each revision its own Job (a Job's pod template cannot be changed in place).
    upgraded = render_templates(MINIMAL | VALUE_SETS["gitops"], is_upgrade=True)
    assert "name: waardhaven-tasks-migrate-1" in upgraded["templates/database/migrate-job.yaml"]


def test_the_migrate_job_may_reach_only_dns_and_the_database() -> None:
    policy = get(render_chart(), "NetworkPolicy", "migrate")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    ports = [p for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert {"port": 5432, "protocol": "TCP"} in ports
    assert {p["port"] for p in ports} == {53, 5432}
    evaluation = get(render_chart(VALUE_SETS["evaluation-postgresql"]), "NetworkPolicy", "migrate")
    db_rule = evaluation["spec"]["egress"][1]
    assert db_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "postgresql"
    )


def test_every_pod_the_chart_makes_carries_the_scheduling_fields() -> None:
    placement = SCHEDULING["redis"]
    objects = render_chart(SCHEDULING)
    pods = workloads(objects)
    assert {f"{o['kind']}/{o['metadata']['name']}" for o in pods} >= {
        "Job/waardhaven-tasks-migrate-1",
        "Pod/waardhaven-tasks-test-ping",
        "Deployment/waardhaven-tasks-exporter",
        "StatefulSet/waardhaven-tasks-postgresql",
        "StatefulSet/waardhaven-tasks-redis",
    }
    for obj in pods:
        spec = pod_spec(obj)
        where = obj["metadata"]["name"]
        for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
            assert spec.get(key) == placement[key], f"{where}: {key}"


def test_extra_volumes_containers_and_init_containers_per_workload() -> None:
    objects = render_chart(SCHEDULING)
    for name in ("worker-high", "worker-low", "beat", "flower", "exporter", "api"):
        spec = pod_spec(get(objects, "Deployment", name))
        assert {"name": "ca", "configMap": {"name": "corp-ca"}} in spec["volumes"], name
        main = spec["containers"][0]
        assert {"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True} in main["volumeMounts"]
        # the extra container comes after the chart's own (the exporter pod has two: probes)
        assert [c["name"] for c in spec["containers"]][-1] == "sidecar", name
        assert sum(c["name"] == "sidecar" for c in spec["containers"]) == 1, name
        assert spec["initContainers"][-1]["name"] == "init-extra", name


def test_common_annotations_reach_every_pod() -> None:
    for obj in workloads(render_chart(SCHEDULING)):
        meta = obj["metadata"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]
        assert meta["annotations"]["example.com/owner"] == "tasks-team", obj["metadata"]["name"]


def test_scrape_annotations_only_without_the_prometheus_operator() -> None:
    def scraped(objects: list[dict[str, Any]]) -> set[str]:
        return {
            o["metadata"]["name"]
            for o in by_kind(objects, "Deployment")
            if "prometheus.io/scrape" in o["spec"]["template"]["metadata"]["annotations"]
        }

    assert scraped(render_chart()) == {
        "waardhaven-tasks-worker-high",
        "waardhaven-tasks-worker-low",
        "waardhaven-tasks-exporter",
        "waardhaven-tasks-api",
    }
    assert scraped(render_chart(api_versions=[MONITORING_API])) == set()
    assert scraped(render_chart(VALUE_SETS["monitoring-forced"])) == set()


# --- 7. the evaluation install ------------------------------------------------------------------


def test_no_database_given_runs_the_in_chart_postgresql() -> None:
    objects = render_chart(VALUE_SETS["evaluation-postgresql"])
    sts = get(objects, "StatefulSet", "postgresql")
    c = container(sts)
    assert c["image"].startswith("docker.io/library/postgres:")
    assert (
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    )
    assert "pg_isready" in " ".join(c["readinessProbe"]["exec"]["command"])
    secret = get(objects, "Secret", "postgresql")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    password = base64.b64decode(secret["data"]["postgres-password"]).decode()
    assert len(password) == 32
    worker = env_of(container(get(objects, "Deployment", "worker-high")))
    assert worker["DATABASE_PASSWORD"]["secretKeyRef"] == {
        "name": "waardhaven-tasks-postgresql",
        "key": "postgres-password",
    }
    assert worker["DATABASE_URL"] == (
        "postgresql+psycopg2://waardhaven:$(DATABASE_PASSWORD)"
        "@waardhaven-tasks-postgresql:5432/waardhaven"
    )
    policy = get(objects, "NetworkPolicy", "postgresql")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}]
    notes = render_templates(merge(MINIMAL, VALUE_SETS["evaluation-postgresql"]))[
        "templates/NOTES.txt"
    ]
    assert "EVALUATION" in notes


def test_a_given_database_means_no_in_chart_postgresql() -> None:
    for values in ({}, VALUE_SETS["existing-secrets"]):
        objects = render_chart(values)
        assert not [o for o in objects if "postgresql" in o["metadata"]["name"]]


# --- 8. NOTES --------------------------------------------------------------------------------


def test_notes_name_the_existing_redis_secret_and_never_tell_to_delete_it() -> None:
    notes = render_templates(merge(MINIMAL, VALUE_SETS["existing-secrets"]))["templates/NOTES.txt"]
    assert "key redis of Secret wh-secrets" in notes
    assert "delete secret" not in notes
    default = render_templates(MINIMAL)["templates/NOTES.txt"]
    assert "key redis-password of Secret waardhaven-tasks-redis" in default
    assert "delete secret waardhaven-tasks-redis" in default
