"""Exporter, PodMonitor/ServiceMonitor, PrometheusRule (from files/rules) and dashboards."""

from __future__ import annotations

import json

from chart_helpers import CHART_DIR, MONITORING_API, by_kind, container, env_of, get, render_chart

FORCED = {"serviceMonitor": {"force": True}, "prometheusRule": {"force": True}}


def test_exporter_runs_its_service_on_its_port() -> None:
    objects = render_chart()
    deployment = get(objects, "Deployment", "exporter")
    c = container(deployment, "exporter")
    assert c["args"] == ["services/exporter/run"]
    assert env_of(c)["EXPORTER_PORT"] == "9540"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9540, "protocol": "TCP"}]
    assert deployment["spec"]["replicas"] == 1  # two exporters would count events twice
    # The cluster probes run once, in this pod.
    probes = container(deployment, "probes")
    assert probes["args"] == ["services/exporter/probes"]
    assert env_of(probes)["CLUSTER_METRICS_PORT"] == "9541"
    assert probes["ports"] == [{"name": "probes", "containerPort": 9541, "protocol": "TCP"}]
    service = get(objects, "Service", "exporter")
    assert [p["port"] for p in service["spec"]["ports"]] == [9540, 9541]


def test_monitors_select_the_pods_the_chart_labels() -> None:
    objects = render_chart(api_versions=[MONITORING_API])
    pm = get(objects, "PodMonitor", "workers")
    assert pm["spec"]["selector"]["matchLabels"]["waardhaven-tasks/role"] == "worker"
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "worker"} in endpoint["relabelings"]
    for worker in ("worker-high", "worker-low"):
        labels = get(objects, "Deployment", worker)["spec"]["template"]["metadata"]["labels"]
        assert labels["waardhaven-tasks/role"] == "worker"
    sm = get(objects, "ServiceMonitor", "exporter")
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "exporter"
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics", "probes"]
    for e in sm["spec"]["endpoints"]:
        assert {"targetLabel": "job", "replacement": "exporter"} in e["relabelings"]


def test_monitor_labels_for_the_prometheus_selector() -> None:
    values = {**FORCED, "serviceMonitor": {"force": True, "labels": {"release": "kps"}}}
    for obj in by_kind(render_chart(values), "PodMonitor") + by_kind(
        render_chart(values), "ServiceMonitor"
    ):
        assert obj["metadata"]["labels"]["release"] == "kps"


def test_rules_come_from_the_files_with_thresholds_from_values() -> None:
    rules = get(render_chart(FORCED), "PrometheusRule", "waardhaven-tasks")
    groups = rules["spec"]["groups"]
    assert groups and all(g["rules"] for g in groups)
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    for alert in alerts:
        assert alert["labels"]["severity"]
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
        assert "{{ $labels" not in alert["expr"]
    text = json.dumps(groups)
    assert "{{ .Values" not in text  # tpl ran
    changed = render_chart({**FORCED, "alerts": {"thresholds": {"queueLength": 4242}}})
    assert "4242" in json.dumps(get(changed, "PrometheusRule", "waardhaven-tasks")["spec"])


def test_one_dashboard_configmap_per_file_for_the_grafana_sidecar() -> None:
    files = sorted(p.name for p in (CHART_DIR / "files" / "dashboards").glob("*.json"))
    assert files
    cms = [
        c for c in by_kind(render_chart(), "ConfigMap") if "-dashboard-" in c["metadata"]["name"]
    ]
    assert sorted(k for c in cms for k in c["data"]) == files
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for body in cm["data"].values():
            assert json.loads(body)["title"]
    assert not [
        c
        for c in by_kind(render_chart({"dashboards": {"enabled": False}}), "ConfigMap")
        if "-dashboard-" in c["metadata"]["name"]
    ]
