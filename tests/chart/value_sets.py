"""Named sets of values the chart must render (each merged over chart_helpers.MINIMAL)."""

from __future__ import annotations

from typing import Any

EXISTING_SECRETS: dict[str, Any] = {
    "database": {"url": "", "existingSecret": "wh-secrets", "existingSecretKey": "db-url"},
    "redis": {"auth": {"existingSecret": "wh-secrets", "existingSecretPasswordKey": "redis"}},
    "flower": {"auth": {"existingSecret": "wh-flower"}},
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {
        "redis": {"enabled": False},
        "externalRedis": {
            "host": "redis.example.internal",
            "port": 6380,
            "db": 2,
            "tls": True,
            "existingSecret": "managed-redis",
            "existingSecretPasswordKey": "password",
        },
    },
    "external-redis-password": {
        "redis": {"enabled": False},
        "externalRedis": {"host": "10.0.0.5", "password": "ext-redis-pw-123456"},
    },
    "keda": {
        "workerDefaults": {"autoscaling": {"enabled": False}, "keda": {"enabled": True}},
    },
    "flower-off": {"flower": {"enabled": False}},
    "third-queue": {
        "workers": {"reports": {"queues": ["reports"], "concurrency": 4, "service": "worker-low"}}
    },
    "existing-secrets": EXISTING_SECRETS,
    "ingress-tls": {
        "flower": {
            "ingress": {
                "host": "flower.example.com",
                "tls": [{"secretName": "flower-tls", "hosts": ["flower.example.com"]}],
                "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
            }
        }
    },
    "no-autoscaling": {"workerDefaults": {"autoscaling": {"enabled": False}, "replicas": 2}},
    "monitoring-forced": {"serviceMonitor": {"force": True}, "prometheusRule": {"force": True}},
    "minimal-features": {
        "networkPolicy": {"enabled": False},
        "metrics": {"enabled": False},
        "exporter": {"enabled": False},
        "dashboards": {"enabled": False},
        "beat": {"enabled": False},
        "tests": {"enabled": False},
        "database": {"migrate": False},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "redis": {"persistence": {"enabled": False}},
    },
    "overrides": {
        "fullnameOverride": "wh",
        "image": {"repository": "registry.example/wh/tasks", "digest": "sha256:" + "a" * 64},
        "secretEnv": {"TWELVEDATA_API_KEY": "td-key-0123456789"},
        "config": {"MARKET_DATA_PROVIDER": "twelvedata", "LOG_LEVEL": "DEBUG"},
        "extraEnvFrom": [{"secretRef": {"name": "more-secrets"}}],
        "podAnnotations": {"example.com/team": "index"},
        "podLabels": {"team": "index"},
        "commonLabels": {"cost-center": "cc-42"},
        "workers": {"high": {"extraArgs": ["--without-gossip"], "affinity": {}}},
    },
}
