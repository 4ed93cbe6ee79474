"""beat (a singleton) and Flower (behind two layers of basic auth)."""

from __future__ import annotations

import base64

import pytest
from chart_helpers import by_kind, container, env_of, get, render_chart, secret_data
from value_sets import VALUE_SETS

FLOWER = [
    "templates/flower/flower-deployment.yaml",
    "templates/flower/flower-ingress.yaml",
    "templates/flower/flower-secret.yaml",
    "templates/flower/flower-service.yaml",
]


class TestBeat:
    def test_exactly_one_pod_recreated_never_rolled(self) -> None:
        beat = get(
            render_chart(show_only=["templates/beat/beat-deployment.yaml"]), "Deployment", "beat"
        )
        assert beat["spec"]["replicas"] == 1
        assert beat["spec"]["strategy"] == {"type": "Recreate"}
        c = container(beat)
        assert c["args"] == ["services/beat/run"]
        assert c["livenessProbe"]["exec"]["command"] == ["services/beat/healthcheck"]

    def test_beat_off(self) -> None:
        assert not [
            o for o in render_chart({"beat": {"enabled": False}}) if "beat" in o["metadata"]["name"]
        ]


class TestFlowerIngress:
    def test_ingress_basic_auth_from_the_htpasswd_secret(self) -> None:
        objects = render_chart(show_only=FLOWER)
        ingress = get(objects, "Ingress", "flower")
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"
        assert (
            annotations["nginx.ingress.kubernetes.io/auth-secret"] == "waardhaven-tasks-flower-auth"
        )
        assert annotations["nginx.ingress.kubernetes.io/auth-secret-type"] == "auth-file"
        user, hashed = secret_data(objects, "flower-auth")["auth"].split(":", 1)
        assert user == "admin" and hashed.startswith("$2")  # bcrypt, which ingress-nginx reads

    def test_path_is_flowers_url_prefix(self) -> None:
        objects = render_chart({"flower": {"urlPrefix": "ops/flower"}}, show_only=FLOWER)
        path = get(objects, "Ingress", "flower")["spec"]["rules"][0]["http"]["paths"][0]
        c = container(get(objects, "Deployment", "flower"))
        assert path["path"] == "/ops/flower" and path["pathType"] == "Prefix"
        assert env_of(c)["FLOWER_URL_PREFIX"] == "ops/flower"
        assert c["livenessProbe"]["exec"]["command"] == ["services/flower/healthcheck"]

    def test_tls(self) -> None:
        ingress = get(
            render_chart(VALUE_SETS["ingress-tls"], show_only=FLOWER), "Ingress", "flower"
        )
        # TLS by default once a host is set: the credentials never cross the wire in clear.
        assert ingress["spec"]["tls"] == [
            {"secretName": "waardhaven-tasks-flower-tls", "hosts": ["flower.example.com"]}
        ]
        assert ingress["spec"]["rules"][0]["host"] == "flower.example.com"
        annotations = ingress["metadata"]["annotations"]
        assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
        assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"

    def test_ingress_off_keeps_flower(self) -> None:
        objects = render_chart({"flower": {"ingress": {"enabled": False}}})
        assert not by_kind(objects, "Ingress")
        assert get(objects, "Deployment", "flower")


class TestFlowerAuth:
    def test_flower_itself_reads_credentials_from_the_secret(self) -> None:
        c = container(get(render_chart(show_only=FLOWER), "Deployment", "flower"))
        ref = env_of(c)["FLOWER_BASIC_AUTH"]["secretKeyRef"]
        assert ref == {"name": "waardhaven-tasks-flower-auth", "key": "basic-auth"}
        assert c["args"] == ["services/flower/run"]  # never the password on a command line

    def test_probes_authenticate_because_every_path_needs_auth(self) -> None:
        c = container(get(render_chart(show_only=FLOWER), "Deployment", "flower"))
        assert c["livenessProbe"]["exec"]["command"] == ["services/flower/healthcheck"]
        assert c["readinessProbe"]["exec"]["command"] == ["services/flower/healthcheck", "ready"]

    def test_no_fixed_default_password_a_new_one_per_install(self) -> None:
        first = secret_data(render_chart(show_only=FLOWER), "flower-auth")
        second = secret_data(render_chart(show_only=FLOWER), "flower-auth")
        assert first["password"] != second["password"]
        assert len(first["password"]) >= 20
        assert first["basic-auth"] == f"admin:{first['password']}"

    def test_given_password_is_used(self) -> None:
        values = {"flower": {"auth": {"username": "ops", "password": "correct-horse-battery"}}}
        data = secret_data(render_chart(values, show_only=FLOWER), "flower-auth")
        assert data["basic-auth"] == "ops:correct-horse-battery"
        assert data["auth"].startswith("ops:$2")

    def test_existing_secret(self) -> None:
        objects = render_chart(VALUE_SETS["existing-secrets"], show_only=FLOWER)
        assert not by_kind(objects, "Secret")
        ingress = get(objects, "Ingress", "flower")
        assert (
            ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-secret"]
            == "wh-flower"
        )
        c = container(get(objects, "Deployment", "flower"))
        assert env_of(c)["FLOWER_BASIC_AUTH"]["secretKeyRef"]["name"] == "wh-flower"

    def test_notes_tell_how_to_read_the_password(self) -> None:
        from chart_helpers import MINIMAL, render_templates

        notes = render_templates(MINIMAL)["templates/NOTES.txt"]
        assert "get secret waardhaven-tasks-flower-auth -o jsonpath='{.data.password}'" in notes
        assert "/flower/" in notes

    @pytest.mark.parametrize("password", ["short", "elevenchars"])
    def test_short_passwords_are_refused(self, password: str) -> None:
        with pytest.raises(Exception, match="flower"):
            render_chart({"flower": {"auth": {"password": password}}})


def test_flower_basic_auth_value_is_user_colon_password() -> None:
    secret = get(render_chart(show_only=FLOWER), "Secret", "flower-auth")
    value = base64.b64decode(secret["data"]["basic-auth"]).decode()
    assert value.count(":") >= 1 and value.split(":", 1)[0] == "admin"
