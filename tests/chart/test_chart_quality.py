"""The chart as a package: lint, values.yaml against values.schema.json, documentation of keys."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from chart_helpers import CHART_DIR, MINIMAL, REPO, render_chart

VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
CHART = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())


def test_helm_lint_is_clean() -> None:
    for values in (MINIMAL, None):
        report = helm.lint(CHART_DIR, values, strict=True, namespace="waardhaven")
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


def test_chart_metadata() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert CHART["apiVersion"] == "v2"
    assert CHART["appVersion"] == pyproject["project"]["version"]
    assert CHART["kubeVersion"].startswith(">=1.29")


def test_values_yaml_validates_against_the_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(VALUES)
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(MINIMAL)


def test_schema_stays_small() -> None:
    assert (
        CHART_DIR / "values.schema.json"
    ).stat().st_size < 110_000  # three more components (API, signing, Sentinel)


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        out.append((f"{path}.{key}".lstrip("."), sub))
        out += _walk(sub, f"{path}.{key}")
    return out


def _resolve(sub: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in sub:
        ref = SCHEMA["$defs"][sub["$ref"].rsplit("/", 1)[1]]
        return {**ref, **{k: v for k, v in sub.items() if k != "$ref"}}
    return sub


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


@pytest.mark.parametrize("path", [p for p, _ in _walk(SCHEMA)])
def test_every_schema_key_has_description_type_and_the_values_yaml_default(path: str) -> None:
    sub = _resolve(dict(_walk(SCHEMA))[path])
    assert sub.get("description"), f"{path}: no description"
    assert "type" in sub or "const" in sub, f"{path}: no type"
    if path.startswith("config."):
        return  # documented settings that values.yaml may leave out
    if path == "workers":
        return  # the pools and their queues: values.yaml is their one source, not copied here
    assert "default" in sub, f"{path}: no default"
    assert sub["default"] == _lookup(VALUES, path), f"{path}: schema default != values.yaml"


def test_every_object_in_the_schema_is_closed() -> None:
    def check(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "description" in node:
                assert "additionalProperties" in node, f"{where}: additionalProperties missing"
            for key, value in node.items():
                check(value, key)
        elif isinstance(node, list):
            for item in node:
                check(item, where)

    assert SCHEMA["additionalProperties"] is False
    check(SCHEMA, "")


# Keys whose values are Kubernetes objects passed through as they are (documented as a whole).
PASSTHROUGH = {
    "podSecurityContext",
    "containerSecurityContext",
    "resources",
    "ingressControllerFrom",
    "prometheusFrom",
    "kedaOperatorFrom",
    "databaseTo",
}


def test_every_key_in_values_yaml_has_a_comment_above_it() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(-\s+)?([A-Za-z_][\w.-]*):", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside = any(key in PASSTHROUGH for _, key in stack)
        stack.append((indent, match.group(3)))
        if inside or match.group(2):
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert not missing, "keys without a comment above them:\n" + "\n".join(missing)


def test_no_values_at_all_is_an_evaluation_install_with_its_own_postgresql() -> None:
    objects = render_chart(minimal=False)
    sts = {o["metadata"]["name"] for o in objects if o["kind"] == "StatefulSet"}
    assert sts == {"waardhaven-tasks-redis", "waardhaven-tasks-postgresql"}
