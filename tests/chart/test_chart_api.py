"""The API's chart part (issue 11 point 4): what it renders, and its rendered container run.

The run test takes the API Deployment's command, env and tokens mount as rendered, against a
password-protected redis-server of this module (external Redis values), and calls it with the
generated admin token, whose plaintext is read from its own Secret as NOTES.txt says.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from chart_helpers import (
    container,
    env_of,
    external_redis,
    get,
    merge,
    names,
    pod_spec,
    render_chart,
    secret_data,
)
from helm_python import HelmError
from pod_runner import LocalPod
from value_sets import ADMIN_ENTRY, VALUE_SETS

from conftest import RedisServer, free_port, http_status


def test_api_deployment_service_hpa_pdb_and_probes() -> None:
    objects = render_chart()
    api = get(objects, "Deployment", "api")
    c = container(api)
    assert c["args"] == ["services/api/run"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert "replicas" not in api["spec"]  # the HPA owns it
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    # A Redis outage makes /healthz 503: out of the Service, but no restart loop.
    assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}
    assert pod_spec(api)["terminationGracePeriodSeconds"] > 10
    env = env_of(c)
    assert env["API_TOKENS_FILE"] == "/etc/waardhaven-tasks/api-tokens/tokens.json"
    assert {"API_RATE_LIMIT", "API_RATE_PERIOD", "API_MAX_BODY_BYTES", "REDIS_URL"} <= set(env)
    assert env["TASK_SIGNING"] == "true"
    # The tokens file as a whole directory (no subPath): a rotation reaches the pod in place.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tokens")
    assert "subPath" not in mount and mount["mountPath"] == "/etc/waardhaven-tasks/api-tokens"
    assert (
        get(objects, "HorizontalPodAutoscaler", "api")["spec"]["metrics"][0]["resource"]["name"]
        == "cpu"
    )
    assert get(objects, "PodDisruptionBudget", "api")["spec"]["maxUnavailable"] == 1
    assert get(objects, "Service", "api")["spec"]["ports"][0]["port"] == 8000
    # No Prometheus Operator: scrape annotations; with it: a ServiceMonitor and none.
    assert (
        pod_spec(api)
        and api["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    )
    forced = render_chart({"serviceMonitor": {"force": True}})
    assert "waardhaven-tasks-api" in names(forced, "ServiceMonitor")
    annotations = get(forced, "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations


def test_ingress_and_route_expose_v1_docs_openapi_never_metrics() -> None:
    objects = render_chart(VALUE_SETS["api-ingress"])
    ingress = get(objects, "Ingress", "api")
    paths = {p["path"]: p["pathType"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert paths == {"/v1": "Prefix", "/docs": "Prefix", "/openapi.json": "Exact"}
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # SSE as it happens
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert ingress["spec"]["tls"][0]["hosts"] == ["api.example.com"]
    route = get(render_chart(VALUE_SETS["api-gateway"]), "HTTPRoute", "api")
    values = {m["path"]["value"] for m in route["spec"]["rules"][0]["matches"]}
    assert values == {"/v1", "/docs", "/openapi.json"}
    with pytest.raises(HelmError, match=r"api\.httpRoute\.parentRefs"):
        render_chart({"api": {"httpRoute": {"enabled": True}}})


def test_tokens_secret_holds_hashes_and_the_admin_token_has_its_own_secret() -> None:
    objects = render_chart()
    tokens = json.loads(secret_data(objects, "api-tokens")["tokens.json"])["tokens"]
    admin = secret_data(objects, "api-admin-token")["bearer"]
    test = secret_data(objects, "api-test-token")["bearer"]
    by_name = {t["name"]: t for t in tokens}
    assert by_name["admin"]["sha256"] == hashlib.sha256(admin.encode()).hexdigest()
    assert by_name["admin"]["permissions"] == {"*": ["*"]}
    assert by_name["helm-test"]["sha256"] == hashlib.sha256(test.encode()).hexdigest()
    assert by_name["helm-test"]["permissions"] == {"ping": ["submit", "read"]}
    text = secret_data(objects, "api-tokens")["tokens.json"]
    assert admin not in text and test not in text  # no plaintext in what the API mounts
    # Entries given: no admin token generated; existingSecret: no tokens Secret at all.
    given = render_chart(VALUE_SETS["api-ingress"])
    assert "waardhaven-tasks-api-admin-token" not in names(given, "Secret")
    entries = json.loads(secret_data(given, "api-tokens")["tokens.json"])["tokens"]
    assert entries[0] == ADMIN_ENTRY
    existing = render_chart(VALUE_SETS["api-existing-secrets"])
    api = get(existing, "Deployment", "api")
    tokens_volume = next(v for v in pod_spec(api)["volumes"] if v["name"] == "tokens")
    assert tokens_volume["secret"]["secretName"] == "wh-api-tokens"
    assert not {"waardhaven-tasks-api-tokens", "waardhaven-tasks-api-test-token"} & names(
        existing, "Secret"
    )


def test_an_upgrade_that_cannot_read_the_generated_tokens_back_fails_naming_the_values() -> None:
    api_generated = merge(VALUE_SETS["gitops"], {"api": {"tokens": {"existingSecret": ""}}})
    with pytest.raises(HelmError, match=r"set api\.tokens\.entries"):
        render_chart(api_generated, is_upgrade=True)
    # Everything given: upgrades render without a cluster (GitOps).
    render_chart(VALUE_SETS["gitops"], is_upgrade=True)


def test_two_renders_are_identical_with_existing_secrets() -> None:
    assert render_chart(VALUE_SETS["gitops"]) == render_chart(VALUE_SETS["gitops"])


def test_network_policy_admits_clients_and_prometheus_and_lets_out_only_dns_and_redis() -> None:
    policy = get(
        render_chart({"networkPolicy": {"apiClientsFrom": [{"podSelector": {}}]}}),
        "NetworkPolicy",
        "api",
    )
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert {"podSelector": {}} in policy["spec"]["ingress"][0]["from"]
    egress = policy["spec"]["egress"]
    assert {p["port"] for p in egress[0]["ports"]} == {53}
    assert egress[1]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "redis"
    )
    assert egress[1]["ports"] == [{"port": 6379, "protocol": "TCP"}]


# --- the rendered container, run ---------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_hex(12)).start()
    yield server
    server.close()


def _call(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rendered_api_container_serves_healthz_and_the_rendered_tokens(
    broker: RedisServer, tmp_path: Path
) -> None:
    objects = render_chart(external_redis(broker))
    api = get(objects, "Deployment", "api")
    port = free_port()
    pod = LocalPod(objects, container(api), tmp_path / "api.log", pod_spec(api), API_PORT=str(port))
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}/healthz") != 200:
            assert pod.proc.poll() is None, pod.output
            assert time.monotonic() < deadline, pod.output
            time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert json.load(response)["tokens"] == 2  # admin and helm-test
        admin = secret_data(objects, "api-admin-token")["bearer"]
        test = secret_data(objects, "api-test-token")["bearer"]
        assert _call(f"http://127.0.0.1:{port}/v1/queues", admin) == 200
        assert _call(f"http://127.0.0.1:{port}/v1/queues", None) == 401
        assert _call(f"http://127.0.0.1:{port}/v1/queues", "wht_" + "x" * 43) == 401
        assert _call(f"http://127.0.0.1:{port}/v1/queues", test) == 403  # ping only
    finally:
        pod.stop(signal.SIGTERM, timeout=20)
