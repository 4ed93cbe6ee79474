"""Worker pools: Deployment, HPA, KEDA ScaledObject and PDB per entry of `workers`."""

from __future__ import annotations

from typing import Any

import pytest
from chart_helpers import by_kind, container, env_of, get, merge, names, render_chart
from value_sets import VALUE_SETS

DEPLOYMENT = ["templates/workers/worker-deployment.yaml"]
HPA = ["templates/workers/worker-hpa.yaml"]
KEDA = ["templates/workers/worker-scaledobject.yaml"]
PDB = ["templates/workers/worker-pdb.yaml"]


class TestWorkerDeployment:
    @pytest.mark.parametrize(
        ("pool", "service", "queues"),
        [("high", "worker-high", "high_priority"), ("low", "worker-low", "low_priority,default")],
    )
    def test_default_pools_run_their_service_on_their_queues(
        self, pool: str, service: str, queues: str
    ) -> None:
        c = container(get(render_chart(show_only=DEPLOYMENT), "Deployment", f"worker-{pool}"))
        assert "command" not in c  # the image's entrypoint (dumb-init) stays PID 1
        assert c["args"][0] == f"services/{service}/run"
        assert f"--hostname={pool}@%h" in c["args"]
        env = env_of(c)
        assert env["WORKER_QUEUES"] == queues
        assert env["WORKER_CONCURRENCY"] == "2"
        assert c["livenessProbe"]["exec"]["command"] == [f"services/{service}/healthcheck"]
        assert c["readinessProbe"]["exec"]["command"] == [
            f"services/{service}/healthcheck",
            "ready",
        ]

    def test_a_third_queue_is_a_values_change(self) -> None:
        objects = render_chart(VALUE_SETS["third-queue"])
        deployment = get(objects, "Deployment", "worker-reports")
        c = container(deployment)
        assert env_of(c)["WORKER_QUEUES"] == "reports"
        assert env_of(c)["WORKER_CONCURRENCY"] == "4"
        assert "--hostname=reports@%h" in c["args"]
        # The defaults of workerDefaults apply to the new pool.
        assert c["resources"]["limits"]["memory"] == "1Gi"
        hpa = get(objects, "HorizontalPodAutoscaler", "worker-reports")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
        assert get(objects, "PodDisruptionBudget", "worker-reports")

    def test_replicas_are_left_out_when_autoscaled(self) -> None:
        for d in by_kind(render_chart(show_only=DEPLOYMENT), "Deployment"):
            assert "replicas" not in d["spec"]
        keda = render_chart(VALUE_SETS["keda"], show_only=DEPLOYMENT)
        assert all("replicas" not in d["spec"] for d in keda)
        fixed = render_chart(VALUE_SETS["no-autoscaling"], show_only=DEPLOYMENT)
        assert [d["spec"]["replicas"] for d in fixed] == [2, 2]

    def test_an_entry_overrides_one_autoscaling_key_and_keeps_the_others(self) -> None:
        values: dict[str, Any] = {"workers": {"high": {"autoscaling": {"maxReplicas": 4}}}}
        hpa = get(render_chart(values, show_only=HPA), "HorizontalPodAutoscaler", "worker-high")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 4)
        values = {"workers": {"high": {"autoscaling": {"enabled": False}, "replicas": 1}}}
        objects = render_chart(values, show_only=DEPLOYMENT + HPA)
        assert names(objects, "HorizontalPodAutoscaler") == {"waardhaven-tasks-worker-low"}
        assert get(objects, "Deployment", "worker-high")["spec"]["replicas"] == 1

    def test_disabled_pool_renders_nothing(self) -> None:
        values = {"workers": {"reports": {"queues": ["reports"], "enabled": False}}}
        objects = render_chart(values)
        assert not [o for o in objects if o["metadata"]["name"].endswith("worker-reports")]

    def test_grace_period_exceeds_the_soft_shutdown(self) -> None:
        objects = render_chart(show_only=[*DEPLOYMENT, "templates/configmap.yaml"])
        soft = float(get(objects, "ConfigMap", "config")["data"]["WORKER_SOFT_SHUTDOWN_TIMEOUT"])
        for d in by_kind(objects, "Deployment"):
            grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > soft + 15

    def test_rollout_adds_pods_before_removing_any(self) -> None:
        for d in render_chart(show_only=DEPLOYMENT):
            assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    def test_preferred_anti_affinity_spreads_a_pool_over_nodes(self) -> None:
        d = get(render_chart(show_only=DEPLOYMENT), "Deployment", "worker-high")
        terms = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        term = terms[0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker-high"

    def test_metrics_port_and_scrape_annotations(self) -> None:
        d = get(render_chart(show_only=DEPLOYMENT), "Deployment", "worker-low")
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9808"
        assert container(d)["ports"] == [
            {"name": "metrics", "containerPort": 9808, "protocol": "TCP"}
        ]
        off = render_chart({"metrics": {"enabled": False}}, show_only=DEPLOYMENT)
        for d in off:
            assert "ports" not in container(d)
            assert "prometheus.io/scrape" not in d["spec"]["template"]["metadata"]["annotations"]

    @pytest.mark.parametrize(
        ("change", "annotation"),
        [
            ({"config": {"LOG_LEVEL": "DEBUG"}}, "checksum/config"),
            ({"database": {"url": "postgresql+psycopg2://other@db/x"}}, "checksum/secret"),
            ({"secretEnv": {"TWELVEDATA_API_KEY": "new-key"}}, "checksum/secret"),
        ],
    )
    def test_checksums_roll_pods_when_settings_change(
        self, change: dict[str, Any], annotation: str
    ) -> None:
        def checksums(values: dict[str, Any] | None) -> dict[str, str]:
            d = get(render_chart(values, show_only=DEPLOYMENT), "Deployment", "worker-high")
            annotations: dict[str, str] = d["spec"]["template"]["metadata"]["annotations"]
            return annotations

        before, after = checksums(None), checksums(change)
        assert before[annotation] != after[annotation]
        other = ({"checksum/config", "checksum/secret"} - {annotation}).pop()
        assert before[other] == after[other]


class TestWorkerHPA:
    def test_cpu_hpa_3_to_10_scaling_down_slower_than_up(self) -> None:
        hpas = by_kind(render_chart(show_only=HPA), "HorizontalPodAutoscaler")
        assert len(hpas) == 2
        for hpa in hpas:
            spec = hpa["spec"]
            assert hpa["apiVersion"] == "autoscaling/v2"
            assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 10)
            assert spec["scaleTargetRef"]["name"] == hpa["metadata"]["name"]
            assert spec["metrics"][0]["resource"]["name"] == "cpu"
            up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
            assert down["stabilizationWindowSeconds"] > up["stabilizationWindowSeconds"]
            assert max(p["value"] for p in down["policies"] if p["type"] == "Pods") < max(
                p["value"] for p in up["policies"] if p["type"] == "Pods"
            )


KEDA_API = ["keda.sh/v1alpha1"]


class TestWorkerKeda:
    """KEDA's operator polls Redis from its own namespace, as it does in a real cluster."""

    def test_operator_reaches_redis_by_its_full_name_with_the_password_from_the_secret(
        self,
    ) -> None:
        objects = render_chart(VALUE_SETS["keda"], show_only=HPA + KEDA, namespace="shop")
        assert not by_kind(objects, "HorizontalPodAutoscaler")
        low = get(objects, "ScaledObject", "worker-low")
        assert low["spec"]["scaleTargetRef"]["name"] == "waardhaven-tasks-worker-low"
        assert (low["spec"]["minReplicaCount"], low["spec"]["maxReplicaCount"]) == (3, 10)
        triggers = low["spec"]["triggers"]
        assert [t["metadata"]["listName"] for t in triggers] == ["low_priority", "default"]
        for t in triggers:
            assert t["type"] == "redis"
            # The short Service name does not resolve from the operator's namespace.
            assert t["metadata"]["address"] == "waardhaven-tasks-redis.shop.svc.cluster.local:6379"
            assert "passwordFromEnv" not in t["metadata"]  # the operator has no such env
            assert t["authenticationRef"] == {"name": "waardhaven-tasks-redis-auth"}
        auth = get(objects, "TriggerAuthentication", "redis-auth")
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "password", "name": "waardhaven-tasks-redis", "key": "redis-password"}
        ]

    def test_cluster_domain_is_a_value(self) -> None:
        values = {**VALUE_SETS["keda"], "clusterDomain": "corp.internal"}
        so = get(render_chart(values, show_only=KEDA), "ScaledObject", "worker-high")
        address = so["spec"]["triggers"][0]["metadata"]["address"]
        assert address == "waardhaven-tasks-redis.waardhaven.svc.corp.internal:6379"

    def test_existing_secret_feeds_the_trigger_authentication(self) -> None:
        values = merge(VALUE_SETS["keda"], VALUE_SETS["existing-secrets"])
        auth = get(render_chart(values, show_only=KEDA), "TriggerAuthentication", "redis-auth")
        assert auth["spec"]["secretTargetRef"][0] | {"parameter": "password"} == {
            "parameter": "password",
            "name": "wh-secrets",
            "key": "redis",
        }

    def test_redis_network_policy_admits_the_keda_operator_only_when_keda_is_used(self) -> None:
        np = ["templates/networkpolicies/redis-networkpolicy.yaml"]
        with_keda = get(render_chart(VALUE_SETS["keda"], show_only=np), "NetworkPolicy", "redis")
        rules = with_keda["spec"]["ingress"]
        operator = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
        }
        assert [operator] in [r["from"] for r in rules]
        assert all(r["ports"] == [{"port": 6379, "protocol": "TCP"}] for r in rules)
        without = get(render_chart(show_only=np), "NetworkPolicy", "redis")
        assert len(without["spec"]["ingress"]) == 1
        # Another namespace selector (KEDA installed elsewhere) is a value.
        peers = [{"namespaceSelector": {"matchLabels": {"team": "platform"}}}]
        custom = render_chart(
            merge(VALUE_SETS["keda"], {"networkPolicy": {"kedaOperatorFrom": peers}}),
            show_only=np,
        )
        assert peers in [
            r["from"] for r in get(custom, "NetworkPolicy", "redis")["spec"]["ingress"]
        ]

    def test_fallback_replicas_when_the_queues_cannot_be_read(self) -> None:
        so = get(render_chart(VALUE_SETS["keda"], show_only=KEDA), "ScaledObject", "worker-high")
        assert so["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 6}

    def test_upgrade_from_the_hpa_transfers_its_ownership(self) -> None:
        """The ScaledObject names the chart's HPA and asks KEDA to adopt it; without that,
        KEDA's webhook refuses a ScaledObject for a Deployment another HPA already scales."""
        before = render_chart(show_only=HPA)
        after = render_chart(VALUE_SETS["keda"], show_only=KEDA)
        for hpa in by_kind(before, "HorizontalPodAutoscaler"):
            name = hpa["metadata"]["name"]
            so = next(o for o in after if o["metadata"]["name"] == name)
            assert so["metadata"]["annotations"] == {
                "scaledobject.keda.sh/transfer-hpa-ownership": "true"
            }
            assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == name
            assert so["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]

    def test_a_pool_scales_on_the_sum_of_its_queues(self) -> None:
        objects = render_chart(VALUE_SETS["keda"], show_only=KEDA)
        low = get(objects, "ScaledObject", "worker-low")
        names = [t["name"] for t in low["spec"]["triggers"]]
        assert names == ["queue0", "queue1"]
        assert low["spec"]["advanced"]["scalingModifiers"] == {
            "formula": "queue0 + queue1",
            "target": "20",
            "metricType": "AverageValue",
        }
        # One queue: its own trigger target, no formula needed.
        high = get(objects, "ScaledObject", "worker-high")
        assert "scalingModifiers" not in high["spec"]["advanced"]
        assert high["spec"]["triggers"][0]["metadata"]["listLength"] == "20"

    def test_external_tls_redis_reaches_the_trigger(self) -> None:
        values = merge(VALUE_SETS["keda"], VALUE_SETS["external-redis"])
        so = get(render_chart(values, show_only=KEDA), "ScaledObject", "worker-high")
        meta = so["spec"]["triggers"][0]["metadata"]
        assert meta["address"] == "redis.example.internal:6380"
        assert (meta["databaseIndex"], meta["enableTLS"]) == ("2", "true")

    def test_keda_true_replaces_the_hpa_of_that_pool_only(self) -> None:
        values = {"workers": {"low": {"keda": {"enabled": True}}}}
        objects = render_chart(values, show_only=HPA + KEDA)
        assert [o["metadata"]["name"] for o in by_kind(objects, "ScaledObject")] == [
            "waardhaven-tasks-worker-low"
        ]
        assert [o["metadata"]["name"] for o in by_kind(objects, "HorizontalPodAutoscaler")] == [
            "waardhaven-tasks-worker-high"
        ]

    def test_auto_uses_keda_where_the_cluster_serves_it(self) -> None:
        """The default (keda.enabled: auto): queue-length scaling where KEDA is installed,
        the CPU HPA elsewhere; both with the same 3..10 bounds and no replicas field."""
        paths = HPA + KEDA + DEPLOYMENT
        with_keda = render_chart(show_only=paths, api_versions=KEDA_API)
        without = render_chart(show_only=paths)
        assert len(by_kind(with_keda, "ScaledObject")) == 2
        assert not by_kind(with_keda, "HorizontalPodAutoscaler")
        assert len(by_kind(without, "HorizontalPodAutoscaler")) == 2
        assert not by_kind(without, "ScaledObject")
        for objects in (with_keda, without):
            assert all("replicas" not in d["spec"] for d in by_kind(objects, "Deployment"))

    @pytest.mark.parametrize("keda", [True, "auto", False])
    def test_autoscaling_off_means_fixed_replicas_whatever_keda_says(self, keda: Any) -> None:
        """As values.yaml documents: keda.enabled picks the autoscaler, autoscaling.enabled
        false turns autoscaling off, even with keda.enabled true and KEDA served."""
        values = {
            "workerDefaults": {
                "autoscaling": {"enabled": False},
                "replicas": 4,
                "keda": {"enabled": keda},
            }
        }
        objects = render_chart(values, show_only=HPA + KEDA + DEPLOYMENT, api_versions=KEDA_API)
        assert not by_kind(objects, "ScaledObject")
        assert not by_kind(objects, "HorizontalPodAutoscaler")
        assert {d["spec"]["replicas"] for d in by_kind(objects, "Deployment")} == {4}


class TestWorkerPDB:
    def test_one_pod_at_a_time_per_pool(self) -> None:
        pdbs = by_kind(render_chart(show_only=PDB), "PodDisruptionBudget")
        assert {p["metadata"]["name"] for p in pdbs} == {
            "waardhaven-tasks-worker-high",
            "waardhaven-tasks-worker-low",
        }
        for pdb in pdbs:
            assert pdb["spec"]["maxUnavailable"] == 1
            component = pdb["metadata"]["name"].removeprefix("waardhaven-tasks-")
            assert (
                pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
            )
