"""Wrong values are refused at render time with a message that names the key and the problem."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from chart_helpers import render_chart

# values -> a fragment of the error message (values.schema.json).
SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown top-level key",
        {"replicaCount": 3},
        "additional properties 'replicaCount' not allowed",
    ),
    (
        "typo in a worker key",
        {"workers": {"high": {"queues": ["high_priority"], "concurency": 3}}},
        "'concurency' not allowed",
    ),
    (
        "concurrency as string",
        {"workers": {"high": {"queues": ["high_priority"], "concurrency": "4"}}},
        "/workers/high/concurrency",
    ),
    (
        "worker without queues",
        {"workers": {"extra": {"concurrency": 2}}},
        "missing property 'queues'",
    ),
    ("empty queue list", {"workers": {"high": {"queues": []}}}, "/workers/high/queues"),
    (
        "bad worker name",
        {"workers": {"High_Pool": {"queues": ["x"]}}},
        "invalid propertyName 'High_Pool'",
    ),
    ("latest tag", {"image": {"tag": "latest"}}, "/image/tag"),
    ("bad pull policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("bad log level", {"config": {"LOG_LEVEL": "LOUD"}}, "/config/LOG_LEVEL"),
    (
        "bad crontab",
        {"config": {"SCHEDULE_COMPUTE_INDEX": "hourly"}},
        "/config/SCHEDULE_COMPUTE_INDEX",
    ),
    (
        "lower-case setting name",
        {"config": {"log_level": "INFO"}},
        "invalid propertyName 'log_level'",
    ),
    # null deletes a default (Helm's merge): the schema then sees no limits at all.
    (
        "resources without limits",
        {"beat": {"resources": {"limits": None}}},
        "missing property 'limits'",
    ),
    ("database url scheme", {"database": {"url": "mysql://u:p@h/d"}}, "/database/url"),
    ("short flower password", {"flower": {"auth": {"password": "abc"}}}, "/flower/auth/password"),
    ("two flower replicas", {"flower": {"replicas": 2}}, "/flower/replicas"),
    ("url prefix with slashes", {"flower": {"urlPrefix": "/flower/"}}, "/flower/urlPrefix"),
    (
        "HPA min zero",
        {"workerDefaults": {"autoscaling": {"minReplicas": 0}}},
        "/workerDefaults/autoscaling/minReplicas",
    ),
    ("external redis port", {"externalRedis": {"port": 70000}}, "/externalRedis/port"),
    (
        "redis password not URL-safe",
        {"redis": {"auth": {"password": "p@ss/word:0123456789"}}},
        "/redis/auth/password",
    ),
    (
        "threshold not a number",
        {"alerts": {"thresholds": {"queueLength": "many"}}},
        "/alerts/thresholds/queueLength",
    ),
]


@pytest.mark.parametrize(
    ("case", "values", "message"), SCHEMA_ERRORS, ids=[c[0] for c in SCHEMA_ERRORS]
)
def test_schema_refuses(case: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as info:
        render_chart(values, validate=False)
    text = str(info.value)
    assert message in text, text
    assert "values don't meet the specifications of the schema" in text


# Combinations the schema cannot express: templates/check-values.yaml.
CHECK_VALUES_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "min above max",
        {
            "workers": {
                "low": {"queues": ["low_priority", "default"], "autoscaling": {"minReplicas": 12}}
            }
        },
        "minReplicas (12) is above maxReplicas (10)",
    ),
    (
        "grace period too short",
        {"workerDefaults": {"terminationGracePeriodSeconds": 60}},
        "must exceed config.WORKER_SOFT_SHUTDOWN_TIMEOUT",
    ),
    (
        "queue served twice",
        {"workers": {"extra": {"queues": ["default"]}}},
        "queue default is consumed by workers.",
    ),
    (
        "queue served by nobody",
        {"workers": {"low": {"queues": ["low_priority"]}}},
        "no enabled worker consumes the default queue",
    ),
    ("secret in config", {"config": {"TWELVEDATA_API_KEY": "k"}}, "config.TWELVEDATA_API_KEY"),
    ("password-like config", {"config": {"SMTP_PASSWORD": "x"}}, "looks like a secret"),
    (
        "URL with password in config",
        {"config": {"OTHER_URL": "redis://:pw@host/0"}},
        "holds a URL with a password",
    ),
    (
        "REDIS_URL in config",
        {"config": {"REDIS_URL": "redis://h/0"}},
        "config.REDIS_URL: not a ConfigMap setting",
    ),
    ("database twice", {"database": {"existingSecret": "db"}}, "not both"),
    ("external redis without host", {"redis": {"enabled": False}}, "set externalRedis.host"),
    (
        "flower password and secret",
        {"flower": {"auth": {"password": "long-enough-pass", "existingSecret": "x"}}},
        "not both",
    ),
]


@pytest.mark.parametrize(
    ("case", "values", "message"), CHECK_VALUES_ERRORS, ids=[c[0] for c in CHECK_VALUES_ERRORS]
)
def test_check_values_refuses(case: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as info:
        render_chart(values, validate=False)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "values",
    [
        {"workerDefaults": {"keda": {"enabled": True}, "autoscaling": {"enabled": False}}},
        {"workers": {"low": {"queues": ["low_priority"]}, "default": {"queues": ["default"]}}},
        {
            "config": {"WORKER_SOFT_SHUTDOWN_TIMEOUT": "100"},
            "workerDefaults": {"terminationGracePeriodSeconds": 130},
        },
        {"flower": {"urlPrefix": ""}},
    ],
)
def test_close_to_the_edge_but_valid(values: dict[str, Any]) -> None:
    assert render_chart(values)
