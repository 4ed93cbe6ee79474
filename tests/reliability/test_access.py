"""Scenario 7: access. Flower answers 401 without credentials, directly and through nginx set up
the way ingress-nginx sets up basic auth (auth_basic + auth_basic_user_file holding the
htpasswd line of the chart's Secret); Redis refuses commands without its password; no secret
appears in the logs of worker, beat and Flower.

The chart's own checks (no fixed default password: generated passwords differ between installs;
no credential in any ConfigMap) are in tests/chart/test_chart_security.py.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from reliability_helpers import record_security, wait_until
from scenarios import SECURITY
from sqlalchemy.engine import make_url

from conftest import REPO, free_port
from tasks.celery_app import app

USER = "admin"
FLOWER, REDIS, SECRETS = SECURITY


def status(url: str, auth: str | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)
    except OSError:
        return 0, {}


@pytest.fixture(scope="module")
def nginx() -> str:
    """The nginx binary; installed from Debian (with apache2-utils) when missing."""
    if shutil.which("nginx") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            # No skip: a missing row must fail the run, never hide.
            pytest.fail(
                "nginx is not installed and cannot be installed here (apt-get install nginx)"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]  # wait for another apt-get
        subprocess.run([*apt, "update"], env=env, check=True, capture_output=True)
        subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", "nginx", "apache2-utils"],
            env=env,
            check=True,
            capture_output=True,
        )
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(found).exists()
    return found


def chart_credentials() -> tuple[str, str]:
    """(user:password, htpasswd line) from the chart's Flower Secret, as the Ingress uses it."""
    sys.path.insert(0, str(REPO / "tests" / "chart"))
    try:
        from chart_helpers import render_chart, secret_data
    except ImportError:  # no chart or no Helm engine: the same kind of line, from htpasswd
        password = secrets.token_urlsafe(18)
        line = subprocess.run(
            ["htpasswd", "-nbB", USER, password], check=True, capture_output=True, text=True
        ).stdout.strip()
        return f"{USER}:{password}", line
    finally:
        sys.path.remove(str(REPO / "tests" / "chart"))
    objects = render_chart(show_only=["templates/flower/flower-secret.yaml"], validate=False)
    data = secret_data(objects, "waardhaven-tasks-flower-auth")
    return data["basic-auth"], data["auth"]


NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    # What ingress-nginx renders for auth-type: basic, auth-secret-type: auth-file.
    location /flower {{
      auth_basic "waardhaven-tasks Flower";
      auth_basic_user_file {dir}/auth;
      proxy_set_header Host $host;
      proxy_pass http://127.0.0.1:{upstream};
    }}
  }}
}}
"""


@pytest.mark.slow
def test_flower_needs_credentials_directly_and_through_nginx(
    nginx: str, start_service: Any, migrated_db: str, tmp_path: Path
) -> None:
    basic_auth, htpasswd_line = chart_credentials()
    assert htpasswd_line.startswith(f"{USER}:$2")  # bcrypt, as Helm's htpasswd writes it
    flower_port, nginx_port = free_port(), free_port()
    start_service(
        "flower",
        FLOWER_PORT=str(flower_port),
        FLOWER_ADDRESS="127.0.0.1",
        FLOWER_URL_PREFIX="flower",
        FLOWER_BASIC_AUTH=basic_auth,
    )
    conf_dir = tmp_path / "nginx"
    conf_dir.mkdir()
    (conf_dir / "auth").write_text(htpasswd_line + "\n")
    (conf_dir / "nginx.conf").write_text(
        NGINX_CONF.format(
            dir=conf_dir,
            port=nginx_port,
            upstream=flower_port,
            user="user root;" if os.geteuid() == 0 else "",
        )
    )
    proxy = subprocess.Popen(
        [nginx, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct = f"http://127.0.0.1:{flower_port}/flower"
    ingress = f"http://127.0.0.1:{nginx_port}/flower"
    user, password = basic_auth.split(":", 1)
    # check -> (path tried, credentials, answer expected)
    plan = {
        "direct, no credentials": (direct + "/", None, 401),
        "direct, wrong password": (direct + "/", f"{user}:wrong", 401),
        "direct, credentials": (direct + "/", basic_auth, 200),
        "ingress, no credentials": (ingress + "/", None, 401),
        "ingress, wrong password": (ingress + "/", f"{user}:{password}x", 401),
        "ingress, credentials": (ingress + "/", basic_auth, 200),
        "ingress, API with credentials": (ingress + "/api/workers", basic_auth, 200),
        "ingress, API without credentials": (ingress + "/api/workers", None, 401),
    }
    seen: dict[str, Any] = {}
    try:
        wait_until(lambda: status(direct + "/healthcheck", basic_auth)[0] == 200, 60, 0.2, "Flower")
        wait_until(lambda: status(ingress + "/")[0] != 0, 20, 0.1, "nginx")
        for check, (url, auth, _) in plan.items():
            seen[check] = status(url, auth)[0]
        code, headers = status(ingress + "/tasks")
        refused_by = headers.get("Server", "")
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for check, (url, auth, expected) in plan.items():
            where = "through nginx" if url.startswith(ingress) else "Flower direct"
            how = {None: "no credentials", basic_auth: "the credentials"}.get(auth, "wrong ones")
            tried = f"GET {url[url.index('/flower') :]}, {where}, {how}"
            record_security(FLOWER, check, tried, expected, seen.get(check, "not reached"))
    assert seen == {k: want for k, (_, _, want) in plan.items()}
    # Without credentials the ingress answers itself: nothing reaches Flower.
    assert code == 401 and refused_by.startswith("nginx")
    assert 'realm="waardhaven-tasks Flower"' in headers.get("WWW-Authenticate", "")


def test_redis_refuses_commands_without_the_password() -> None:
    url = os.environ["REDIS_URL"]
    parsed = redis.connection.parse_url(url)
    assert parsed.get("password"), "the test Redis has a password"
    seen: dict[str, str] = {}
    # A client that skips AUTH, talking RESP as redis-cli does.
    with socket.create_connection((parsed["host"], parsed["port"]), timeout=5) as sock:
        for command in ("PING", "LRANGE default 0 -1", "KEYS *", "FLUSHALL"):
            sock.sendall(command.encode() + b"\r\n")
            seen[command] = sock.recv(256).decode(errors="replace").split(" ", 1)[0]
    for command, answer in seen.items():
        record_security(REDIS, command, f"{command} without AUTH", "-NOAUTH", answer)
    wrong = redis.Redis(host=parsed["host"], port=parsed["port"], password="not-it")
    try:
        wrong.ping()
        wrong_answer = "PONG"
    except redis.exceptions.AuthenticationError:
        wrong_answer = "AuthenticationError"
    record_security(
        REDIS, "wrong password", "AUTH not-it, PING", "AuthenticationError", wrong_answer
    )
    right = "PONG" if redis.Redis.from_url(url).ping() else "no answer"
    record_security(REDIS, "password", "AUTH <password>, PING", "PONG", right)
    assert set(seen.values()) == {"-NOAUTH"}, seen
    assert wrong_answer == "AuthenticationError"
    assert right == "PONG"


@pytest.mark.slow
def test_secrets_never_appear_in_the_logs(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    from fake_twelvedata import FakeTwelveData

    redis_client.flushdb()
    redis_password = redis.connection.parse_url(os.environ["REDIS_URL"])["password"]
    flower_password = secrets.token_urlsafe(18)
    api_key = "td-" + secrets.token_hex(12)
    db_password = "db-" + secrets.token_hex(8)  # the test server trusts: any password works
    db_url = make_url(os.environ["DATABASE_URL"]).set(password=db_password)
    # The HTTP provider, against a fake TwelveData that fails the first request (the error
    # path: the exception text, the retry log line) and then answers (the request log line).
    # It answers only requests that carry this key (the provider sends it in a header).
    api = FakeTwelveData(fail_first=1, fail_status=503, api_key=api_key)
    env = {
        "DATABASE_URL": db_url.render_as_string(hide_password=False),
        "MARKET_DATA_PROVIDER": "twelvedata",
        "TWELVEDATA_URL": api.url,
        "TWELVEDATA_API_KEY": api_key,
    }
    secrets_ = {
        "Redis password": redis_password,
        "Flower password": flower_password,
        "TwelveData API key": api_key,
        "database password": db_password,
    }
    logs: dict[str, str] = {}
    try:
        worker = start_service(
            "worker-high", WORKER_QUEUES="high_priority,low_priority,default", **env
        ).wait_ready()
        beat = start_service("beat", **env)
        flower_port = free_port()
        flower = start_service(
            "flower",
            FLOWER_PORT=str(flower_port),
            FLOWER_ADDRESS="127.0.0.1",
            FLOWER_BASIC_AUTH=f"{USER}:{flower_password}",
            **env,
        )
        base = f"http://127.0.0.1:{flower_port}"
        flower_auth = f"{USER}:{flower_password}"
        wait_until(lambda: status(base + "/healthcheck", flower_auth)[0] == 200, 60, 0.2, "Flower")
        # Work that logs: successes, a refresh through the HTTP provider (a 503, its retry,
        # then the data), a validation failure with its traceback.
        assert app.send_task("ping").get(timeout=30) == "pong"
        refresh = app.send_task("refresh_market_data", kwargs={"symbols": ["AAPL"]})
        assert refresh.get(timeout=120)["rows_inserted"] > 0
        assert len(api.requests) >= 2  # the key path was used: a failed request, an answer
        assert not any(api_key in line for line in api.paths)  # and never in a URL
        assert app.send_task("cleanup_old_data").get(timeout=60)["cutoff"]
        failed = app.send_task("generate_report", kwargs={"report_type": "bogus"})
        assert failed.get(timeout=30, propagate=False) is not None
        assert status(base + "/api/workers", f"{USER}:{flower_password}")[0] == 200
        assert status(base + "/api/workers", f"{USER}:wrong")[0] == 401
        time.sleep(2)
        for service in (worker, beat, flower):
            service.stop()
        logs.update({s.name: s.output for s in (worker, beat, flower)})
        assert all(len(text) > 500 for text in logs.values())  # they did log
        assert "Retry in" in logs["worker-high"]  # the provider's error path was logged
    finally:
        api.close()
        for name in ("worker-high", "beat", "flower"):
            found = [label for label, secret in secrets_.items() if secret in logs.get(name, "")]
            seen = "not run" if name not in logs else (", ".join(found) or "none")
            tried = "its whole log, for: " + ", ".join(secrets_)
            record_security(SECRETS, f"{name} log", tried, "none", seen)
    leaks = [(n, label) for n, t in logs.items() for label, sec in secrets_.items() if sec in t]
    assert leaks == []
