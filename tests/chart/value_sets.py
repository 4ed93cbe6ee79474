"""Named sets of values the chart must render (each merged over chart_helpers.MINIMAL)."""

from __future__ import annotations

from typing import Any

EXISTING_SECRETS: dict[str, Any] = {
    "database": {"url": "", "existingSecret": "wh-secrets", "existingSecretKey": "db-url"},
    "redis": {"auth": {"existingSecret": "wh-secrets", "existingSecretPasswordKey": "redis"}},
    "flower": {"auth": {"existingSecret": "wh-flower"}},
    "api": {"tokens": {"existingSecret": "wh-api-tokens"}},
    "signing": {"existingSecret": "wh-signing"},
}

GITOPS: dict[str, Any] = {
    # The tokens file and the signing key cannot be given as plain values: existing Secrets.
    "api": {"tokens": {"existingSecret": "wh-api-tokens"}},
    "signing": {"existingSecret": "wh-signing"},
    "redis": {"auth": {"password": "redis-gitops-0123456789"}},
    "flower": {
        "auth": {
            "password": "flower-gitops-0123456789",
            # The htpasswd line of that password, computed once (bcrypt is salted).
            "htpasswd": "admin:$2a$10$ywnGZaDk0c/f6YrG75yjH.otSJuE00x4RJ.ghxsU5V5ltDwCjuaB2",
        }
    },
}

_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {"pool": "tasks"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "tasks", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["tasks"]}]}
                ]
            }
        }
    },
    "priorityClassName": "tasks-critical",
}
# What the restricted Pod Security Standard asks of an extra container, plus small resources.
_RESTRICTED_CONTAINER: dict[str, Any] = {
    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
}
_EXTRAS: dict[str, Any] = {
    "extraVolumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
    "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
    "extraContainers": [
        {
            "name": "sidecar",
            "image": "registry.example/sidecar:1.0",
            **_RESTRICTED_CONTAINER,
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"exec": {"command": ["true"]}},
        }
    ],
    "initContainers": [
        {
            "name": "init-extra",
            "image": "registry.example/init:1.0",
            **_RESTRICTED_CONTAINER,
        }
    ],
}
SCHEDULING: dict[str, Any] = {
    "database": {"url": "", "migrate": _PLACEMENT},
    "postgresql": _PLACEMENT,
    "redis": _PLACEMENT,
    "tests": _PLACEMENT,
    "workerDefaults": {**_PLACEMENT, **_EXTRAS},
    "beat": {**_PLACEMENT, **_EXTRAS},
    "flower": {**_PLACEMENT, **_EXTRAS},
    "exporter": {**_PLACEMENT, **_EXTRAS},
    "api": {**_PLACEMENT, **_EXTRAS},
    "commonAnnotations": {"example.com/owner": "tasks-team"},
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
    "keda": {"workerDefaults": {"keda": {"enabled": True}}},
    # KEDA with a managed TLS Redis: the trigger's address is the external host as given.
    "keda-external-redis": {
        "workerDefaults": {"keda": {"enabled": True}},
        "redis": {"enabled": False},
        "externalRedis": {"host": "redis.example.internal", "existingSecret": "managed-redis"},
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
                "certManager": {"clusterIssuer": "letsencrypt"},
            }
        }
    },
    # Another controller (no nginx annotations) and the Gateway API.
    "other-ingress-class": {
        "flower": {
            "ingress": {"className": "traefik", "nginxBasicAuth": False, "host": "f.example"}
        }
    },
    "gateway-api": {
        "flower": {
            "ingress": {"enabled": False},
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "public", "namespace": "gateway", "sectionName": "https"}],
                "hostnames": ["flower.example.com"],
            },
        }
    },
    # `helm install` with no database: the in-chart evaluation PostgreSQL.
    "evaluation-postgresql": {"database": {"url": ""}},
    # GitOps (`helm template`): every credential given, so two renders are identical.
    "gitops": GITOPS,
    # Tainted nodes: every pod the chart makes carries the scheduling fields.
    "scheduling": SCHEDULING,
    "no-autoscaling": {"workerDefaults": {"autoscaling": {"enabled": False}, "replicas": 2}},
    "monitoring-forced": {"serviceMonitor": {"force": True}, "prometheusRule": {"force": True}},
    "minimal-features": {
        "networkPolicy": {"enabled": False},
        "metrics": {"enabled": False},
        "exporter": {"enabled": False},
        "dashboards": {"enabled": False},
        "beat": {"enabled": False},
        "tests": {"enabled": False},
        "database": {"migrate": {"enabled": False}},
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

# The API, signing and Sentinel (issue 11 point 4, issue 13 point 2).
ADMIN_ENTRY: dict[str, Any] = {
    "name": "reporting",
    "sha256": "41d7" + "0" * 60,
    "permissions": {"generate_report": ["submit"], "*": ["read"]},
}
VALUE_SETS |= {
    "api-ingress": {
        "api": {
            "ingress": {"enabled": True, "host": "api.example.com"},
            "tokens": {"entries": [ADMIN_ENTRY]},
        }
    },
    "api-gateway": {
        "api": {
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "public", "namespace": "gateway", "sectionName": "https"}],
                "hostnames": ["api.example.com"],
            },
            "autoscaling": {"enabled": False},
        }
    },
    "api-existing-secrets": {
        "api": {"tokens": {"existingSecret": "wh-api-tokens"}},
        "signing": {"existingSecret": "wh-signing"},
    },
    "api-off-signing-off": {"api": {"enabled": False}, "signing": {"enabled": False}},
    "signing-rotation": {
        "signing": {
            "existingSecret": "wh-signing",
            "extraCertificates": {
                "next": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
            },
        }
    },
    "sentinel": {"redis": {"sentinel": {"enabled": True}}},
    "sentinel-keda": {
        "redis": {"sentinel": {"enabled": True, "auth": {"existingSecret": "wh-sentinel"}}},
        "workerDefaults": {"keda": {"enabled": True}},
    },
    "external-sentinel": {
        "redis": {"enabled": False},
        "externalRedis": {
            "existingSecret": "managed-redis",
            "sentinel": {
                "enabled": True,
                "hosts": [
                    "redis-node-0.redis-headless.data:26379",
                    "redis-node-1.redis-headless.data:26379",
                ],
                "masterName": "prod",
                "existingSecret": "managed-redis",
            },
        },
        "workerDefaults": {"keda": {"enabled": True}},
    },
}
