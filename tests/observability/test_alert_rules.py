"""The alert rules and dashboards as files: promtool (check and unit tests), conventions
(names, `for`, severity, summary/description/runbook/dashboard links), thresholds from values,
the plain rules file up to date, the dashboards' variables and selectors."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml
from obs_helpers import (
    DASHBOARDS,
    PLAIN_RULES,
    PROMETHEUS_EXAMPLE,
    PROMTOOL_TESTS,
    REPO,
    RULE_TEMPLATES,
    dashboards,
    ensure_prometheus,
    load_rules,
    panels,
)
from render_rules import dump, rules_for

RUNBOOK_DOCS = [REPO / "docs" / "operations.md"]
DEFAULT_THRESHOLDS = yaml.safe_load(
    (REPO / "deploy" / "helm" / "waardhaven-tasks" / "values.yaml").read_text()
)["alerts"]["thresholds"]


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_prometheus()[1]


def alerts_of(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_plain_rules_file_is_the_chart_rendering_with_defaults() -> None:
    assert PLAIN_RULES.read_text() == dump(rules_for()), (
        "deploy/prometheus/alerts.yaml is out of date: python tests/observability/render_rules.py"
    )


def test_promtool_accepts_the_rules_and_the_example_config(promtool: str, tmp_path: Any) -> None:
    custom = rules_for(
        {"alerts": {"labels": {"team": "data"}, "dashboardUrl": "https://g.example/"}}
    )
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(custom))
    for path in (PLAIN_RULES, tmp_path / "custom.yaml"):
        check = [promtool, "check", "rules", str(path)]
        done = subprocess.run(check, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_EXAMPLE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for alert in alerts_of(custom):
        assert alert["labels"]["team"] == "data"
        assert alert["annotations"]["dashboard_url"].startswith("https://g.example/d/")


@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(promtool: str, test_file: Any) -> None:
    done = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        cwd=test_file.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_that_do_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in load_rules(PLAIN_RULES) if "alert" in a}
    assert names - fires == set(), "alerts no unit test fires"
    assert names - quiet == set(), "alerts no unit test keeps quiet"


def test_alert_conventions() -> None:
    docs = "\n".join(p.read_text() for p in RUNBOOK_DOCS if p.exists())
    alerts = alerts_of(rules_for())
    assert len(alerts) >= 9
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"Waardhaven(?:[A-Z][a-z0-9]+)+", name), name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        notes = alert["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url", "dashboard_url"}, name
        assert notes["runbook_url"].endswith(f"#runbook-{name.lower()}"), name
        assert re.search(r"/d/waardhaven-tasks-(overview|task)/", notes["dashboard_url"]), name
        assert f"Runbook: {name}" in docs, f"no runbook section for {name}"
        # Every alert aggregates by namespace: one alert per installation, not per pod.
        assert "by (namespace" in alert["expr"] or name == "WaardhavenExporterDown", name
    uids = {d["uid"] for d in dashboards()}
    assert {"waardhaven-tasks-overview", "waardhaven-tasks-task"} <= uids


@pytest.mark.parametrize("threshold", sorted(DEFAULT_THRESHOLDS))
def test_each_threshold_comes_from_values(threshold: str) -> None:
    sentinel = 0.4242  # inside every threshold's schema range
    changed = rules_for({"alerts": {"thresholds": {threshold: sentinel}}})
    exprs = [a["expr"] for a in alerts_of(changed)]
    assert any(str(sentinel) in e for e in exprs), f"{threshold} is in no expression"
    default = [a["expr"] for a in alerts_of(rules_for())]
    assert all(str(sentinel) not in e for e in default)


def test_rule_templates_have_no_literal_thresholds() -> None:
    """Numbers compared with in the templates come from values (windows and `for` aside)."""
    for path in RULE_TEMPLATES:
        text = path.read_text()
        for expr in re.findall(r"expr: \|-\n((?:\s{10}.*\n)+)", text):
            literal = re.findall(r"(?:>|<|>=|<=|==)\s*(\d+(?:\.\d+)?)\b", expr)
            assert set(literal) <= {"0", "1"}, f"{path.name}: literal thresholds {literal}"


def test_dashboards_are_sound() -> None:
    assert {p.name for p in DASHBOARDS} == {"overview.json", "per-task.json"}
    for dashboard in dashboards():
        uid = dashboard["uid"]
        names = [v["name"] for v in dashboard["templating"]["list"]]
        assert names == ["datasource", "namespace", "queue", "task"], uid
        ids = [p["id"] for p in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        titles = [p["title"] for p in panels(dashboard) if p["type"] != "row"]
        assert len(titles) == len(set(titles)), f"{uid}: duplicate panel titles"
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and panel.get("description"), panel["title"]
            for target in panel["targets"]:
                expr = target["expr"]
                assert target["datasource"]["uid"] == "${datasource}"
                # Selected by namespace (the label every scrape of the chart carries), never
                # by a job regex; a pod label never reaches a legend.
                assert 'namespace=~"$namespace"' in expr, (panel["title"], expr)
                assert not re.search(r"\bjob=~|\bpod\b", expr), expr
                assert expr.count("(") == expr.count(")"), expr
    overview = json.loads((DASHBOARDS[0].parent / "overview.json").read_text())
    titles = " ".join(p["title"] for p in panels(overview)).lower()
    for needed in ("throughput", "failure rate", "queue depth", "runtime", "queue wait",
                   "workers per queue", "hpa replicas", "beat"):  # fmt: skip
        assert needed in titles, needed
