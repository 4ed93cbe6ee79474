"""deploy/k8s: the chart rendered with default values, committed, never out of date."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import yaml
from chart_helpers import REPO, validate_object

SCRIPT = REPO / "scripts" / "render-manifests.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_manifests", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = load_script()


def test_committed_manifests_match_the_chart() -> None:
    stale = RENDER.stale(RENDER.render())
    assert not stale, f"deploy/k8s is out of date, run `make manifests`: {stale}"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((REPO / "deploy/k8s/kustomization.yaml").read_text())
    files = {p.name for p in (REPO / "deploy/k8s").glob("*.yaml")} - {
        "kustomization.yaml",
        "values.yaml",
    }
    assert kustomization["namespace"] == "waardhaven"
    assert sorted(kustomization["resources"]) == sorted(files)


def objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted((REPO / "deploy/k8s").glob("*.yaml")):
        if path.name not in {"kustomization.yaml", "values.yaml"}:
            out.append(yaml.safe_load(path.read_text()))
    return out


def test_plain_manifests_are_valid_and_hold_no_password() -> None:
    found = objects()
    assert {o["kind"] for o in found} >= {
        "Deployment",
        "StatefulSet",
        "HorizontalPodAutoscaler",
        "Ingress",
    }
    for obj in found:
        validate_object(obj)
    # No Secret at all: every credential comes from the Secret the README has you create.
    assert not [o for o in found if o["kind"] == "Secret"]
    # No helm test pod.
    assert not [o for o in found if o["kind"] == "Pod"]
    refs = set()
    for obj in found:
        text = yaml.safe_dump(obj)
        if "secretKeyRef" in text or "auth-secret" in text:
            refs.add(obj["metadata"]["name"])
        assert "waardhaven-tasks-secrets" in text or "secretKeyRef" not in text
    assert "waardhaven-tasks-worker-high" in refs and "waardhaven-tasks-flower" in refs


def test_check_mode_reports_a_stale_file(tmp_path: Any, monkeypatch: Any) -> None:
    files = RENDER.render()
    monkeypatch.setattr(RENDER, "OUT_DIR", tmp_path)
    RENDER.write(files)
    assert RENDER.stale(files) == []
    (tmp_path / "deployment-beat.yaml").write_text("edited by hand\n")
    (tmp_path / "extra.yaml").write_text("kind: ConfigMap\n")
    assert RENDER.stale(files) == ["deployment-beat.yaml", "extra.yaml"]
