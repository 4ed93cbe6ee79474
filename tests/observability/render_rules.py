"""Render the chart's alert rules (files/rules/*.yaml through Helm's `tpl`) into a plain
Prometheus rules file.

    python tests/observability/render_rules.py     # rewrites deploy/prometheus/alerts.yaml

deploy/prometheus/alerts.yaml is the rendering with the chart's default values, for a Prometheus
without the Operator; test_rules.py fails when it is out of date. The tests also render with
their own values (short thresholds) through `rules_for`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PLAIN_RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
TEMPLATE = "templates/monitoring/prometheusrule.yaml"
HEADER = """\
# Generated from deploy/helm/waardhaven-tasks/files/rules/*.yaml with the chart's default values
# (alerts.thresholds in values.yaml) by `python tests/observability/render_rules.py`: do not edit
# here. For a Prometheus without the Operator: `rule_files: [alerts.yaml]`.
"""

sys.path.insert(0, str(REPO / "tests" / "chart"))


def rules_for(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"groups": [...]} as the chart renders them into its PrometheusRule for `values`."""
    from chart_helpers import MINIMAL, merge, render_templates

    merged = merge(merge(MINIMAL, {"prometheusRule": {"force": True}}), values)
    text = render_templates(merged)[TEMPLATE]
    doc = yaml.safe_load(text)
    return {"groups": doc["spec"]["groups"]}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(rules: dict[str, Any]) -> str:
    body = yaml.dump(rules, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def main() -> int:
    PLAIN_RULES.parent.mkdir(parents=True, exist_ok=True)
    PLAIN_RULES.write_text(dump(rules_for()))
    print(f"wrote {PLAIN_RULES.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
