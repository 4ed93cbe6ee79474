"""Render the chart with the real Helm engine and validate what it renders (Airflow helm-tests).

`render_chart(values)` renders deploy/helm/waardhaven-tasks with Helm's Go engine (PyPI
`helm-python-sdk`, offline: no cluster, no download) and validates every object strictly
against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships, for every version from
1.29 to the newest. Custom resources (Prometheus Operator, KEDA) have no schema there: they are
checked against the small structural schemas below.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from helm_python import _native
from kubernetes_validate import utils as kv_utils
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "waardhaven-tasks"
RELEASE = "waardhaven-tasks"
NAMESPACE = "waardhaven"
MONITORING_API = "monitoring.coreos.com/v1"

# The one value a user must set. Tests start from it; `render_chart(..., minimal=False)` doesn't.
DB_URL = "postgresql+psycopg2://waardhaven:db-secret-Xy7@postgres:5432/waardhaven"
MINIMAL: dict[str, Any] = {"database": {"url": DB_URL}}

KUBE_VERSIONS = sorted(
    {v for v in kv_utils.all_versions() if Version(v) >= Version("1.29.0")}, key=Version
)
NEWEST = KUBE_VERSIONS[-1]


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Deep merge (maps merge, everything else is replaced): how Helm merges -f files."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def external_redis(broker: Any) -> dict[str, Any]:
    """Values pointing the chart at a test's own password-protected redis-server (conftest's
    RedisServer) instead of the in-chart Redis."""
    return {
        "redis": {"enabled": False},
        "externalRedis": {"host": "127.0.0.1", "port": broker.port, "password": broker.password},
    }


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_templates(
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    kubernetes_version: str = NEWEST,
    api_versions: list[str] | None = None,
    is_upgrade: bool = False,
) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included). Raises helm.HelmError."""
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "kube_version": f"v{kubernetes_version}",
        "is_install": not is_upgrade,
        "is_upgrade": is_upgrade,
    }
    if api_versions:
        opts["api_versions"] = api_versions
    # Chart.render() does not expose kube_version/api_versions; the native call takes them.
    rendered = _native.call_string(
        "helm_render", chart()._raw(), json.dumps(values or {}), json.dumps(opts)
    )
    out: dict[str, str] = json.loads(rendered)
    prefix = f"{chart().name}/"
    return {k.removeprefix(prefix): v for k, v in out.items()}


def render_chart(
    values: dict[str, Any] | None = None,
    show_only: list[str] | None = None,
    kubernetes_version: str = NEWEST,
    *,
    minimal: bool = True,
    validate: bool = True,
    api_versions: list[str] | None = None,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
    is_upgrade: bool = False,
) -> list[dict[str, Any]]:
    """The chart's objects for `values` (merged over MINIMAL unless minimal=False).

    show_only: template paths relative to the chart ("templates/beat/beat-deployment.yaml").
    Every object is validated against every Kubernetes version in KUBE_VERSIONS.
    """
    merged = merge(MINIMAL, values) if minimal else (values or {})
    templates = render_templates(
        merged,
        name=name,
        namespace=namespace,
        kubernetes_version=kubernetes_version,
        api_versions=api_versions,
        is_upgrade=is_upgrade,
    )
    objects: list[dict[str, Any]] = []
    for path, text in sorted(templates.items()):
        if not path.endswith(".yaml") or (show_only and path not in show_only):
            continue
        for doc in yaml.load_all(text, Loader=yaml.CSafeLoader):  # libyaml: 10x faster
            if doc:
                objects.append(doc)
    if show_only:
        unknown = set(show_only) - set(templates)
        assert not unknown, f"no such templates: {unknown}"
    if validate:
        for obj in objects:
            validate_object(obj)
    return objects


# --- validation ----------------------------------------------------------------------------


def _crd_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "maxLength": 253}},
            },
            "spec": spec,
        },
    }


_relabel = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "sourceLabels": {"type": "array", "items": {"type": "string"}},
            "targetLabel": {"type": "string"},
            "replacement": {"type": "string"},
            "action": {"type": "string"},
            "regex": {"type": "string"},
        },
    },
}
_endpoint = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "relabelings": _relabel,
    },
}
_selector = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
}

# Structural subsets of the CRDs' own schemas (the fields this chart uses, strictly).
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _selector,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _endpoint},
            },
        }
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _selector,
                "endpoints": {"type": "array", "minItems": 1, "items": _endpoint},
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "interval": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {
                                            "type": "string",
                                            "pattern": "^[A-Z][A-Za-z0-9]*$",
                                        },
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string"},
                                        "keep_firing_for": {"type": "string"},
                                        "labels": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 1},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "required": ["formula", "target"],
                            "additionalProperties": False,
                            "properties": {
                                "formula": {"type": "string"},
                                "target": {"type": "string"},
                                "activationTarget": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["redis", "redis-sentinel"]},
                            "name": {"type": "string", "pattern": "^[a-z][a-z0-9]*$"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}},
                            },
                            # KEDA's trigger metadata is a map of strings.
                            "metadata": {
                                "type": "object",
                                "required": ["listName", "listLength"],
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    },
                },
            },
        }
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string", "minLength": 1},
                            "key": {"type": "string", "minLength": 1},
                        },
                    },
                }
            },
        }
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _crd_schema(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["parentRefs", "rules"],
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            k: {"type": "string"}
                            for k in ("group", "kind", "name", "namespace", "sectionName")
                        }
                        | {"port": {"type": "integer"}},
                    },
                },
                "hostnames": {"type": "array", "items": {"type": "string"}},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "path": {
                                            "type": "object",
                                            "required": ["type", "value"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {
                                                    "enum": [
                                                        "Exact",
                                                        "PathPrefix",
                                                        "RegularExpression",
                                                    ]
                                                },
                                                "value": {"type": "string", "pattern": "^/"},
                                            },
                                        }
                                    },
                                },
                            },
                            "backendRefs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "name": {"type": "string"},
                                        "port": {"type": "integer"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    ),
}


@functools.lru_cache(maxsize=4096)
def _validate_json(doc: str, version: str) -> None:
    kubernetes_validate.validate(json.loads(doc), version, strict=True)


def validate_object(obj: dict[str, Any], versions: list[str] | None = None) -> None:
    """Strict validation for every version; raises AssertionError naming object and path."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    what = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        try:
            jsonschema.validate(obj, CRD_SCHEMAS[key])
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{what}: {exc.message} at {list(exc.absolute_path)}") from None
        return
    doc = json.dumps(obj, sort_keys=True)
    for version in versions or KUBE_VERSIONS:
        try:
            _validate_json(doc, version)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{what} (Kubernetes {version}): {exc.message} at {path}"
            ) from None
        except kubernetes_validate.SchemaNotFoundError:
            raise AssertionError(f"{what}: no schema for {key} in Kubernetes {version}") from None


# --- lookups ---------------------------------------------------------------------------------


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def get(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    full = name if name.startswith(RELEASE) else f"{RELEASE}-{name}"
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == full]
    assert found, f"no {kind}/{full} among {[(o['kind'], o['metadata']['name']) for o in objects]}"
    return found[0]


def names(objects: list[dict[str, Any]], kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in objects if o["kind"] == kind}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any]
    if obj["kind"] == "Pod":
        spec = obj["spec"]
    elif obj["kind"] == "CronJob":
        spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        spec = obj["spec"]["template"]["spec"]
    return spec


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(obj)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value (str) or valueFrom (dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def secret_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    import base64

    secret = get(objects, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
