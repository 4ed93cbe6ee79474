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
from reliability_helpers import record, wait_until
from sqlalchemy.engine import make_url

from conftest import REPO, free_port
from tasks.celery_app import app

USER = "admin"


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
            # A skip must not hide a missing dependency in CI.
            (pytest.fail if os.environ.get("CI") else pytest.skip)(
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
    try:
        direct = f"http://127.0.0.1:{flower_port}/flower"
        ingress = f"http://127.0.0.1:{nginx_port}/flower"
        wait_until(lambda: status(direct + "/healthcheck", basic_auth)[0] == 200, 60, 0.2, "Flower")
        wait_until(lambda: status(ingress + "/")[0] != 0, 20, 0.1, "nginx")
        user, password = basic_auth.split(":", 1)
        checks = {
            "direct, no credentials": (status(direct + "/")[0], 401),
            "direct, wrong password": (status(direct + "/", f"{user}:wrong")[0], 401),
            "direct, credentials": (status(direct + "/", basic_auth)[0], 200),
            "ingress, no credentials": (status(ingress + "/")[0], 401),
            "ingress, wrong password": (status(ingress + "/", f"{user}:{password}x")[0], 401),
            "ingress, credentials": (status(ingress + "/", basic_auth)[0], 200),
            "ingress, API with credentials": (status(ingress + "/api/workers", basic_auth)[0], 200),
        }
        code, headers = status(ingress + "/tasks")
        refused_by = headers.get("Server", "")
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
    print(checks)
    record(
        "access: Flower direct + via nginx basic auth",
        sent=len(checks),
        completed=sum(1 for got, want in checks.values() if got == want),
        duplicated=0,
        lost=0,
        recover_s=None,
    )
    assert {k: got for k, (got, _) in checks.items()} == {k: w for k, (_, w) in checks.items()}
    # Without credentials the ingress answers itself: nothing reaches Flower.
    assert code == 401 and refused_by.startswith("nginx")
    assert 'realm="waardhaven-tasks Flower"' in headers.get("WWW-Authenticate", "")


def test_redis_refuses_commands_without_the_password() -> None:
    url = os.environ["REDIS_URL"]
    parsed = redis.connection.parse_url(url)
    assert parsed.get("password"), "the test Redis has a password"
    # A client that skips AUTH, talking RESP as redis-cli does.
    with socket.create_connection((parsed["host"], parsed["port"]), timeout=5) as sock:
        for command in (b"PING", b"LRANGE default 0 -1", b"KEYS *", b"FLUSHALL"):
            sock.sendall(command + b"\r\n")
            assert sock.recv(256).startswith(b"-NOAUTH Authentication required"), command
    wrong = redis.Redis(host=parsed["host"], port=parsed["port"], password="not-it")
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    assert redis.Redis.from_url(url).ping()


@pytest.mark.slow
def test_secrets_never_appear_in_the_logs(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    redis_client.flushdb()
    redis_password = redis.connection.parse_url(os.environ["REDIS_URL"])["password"]
    flower_password = secrets.token_urlsafe(18)
    api_key = "td-" + secrets.token_hex(12)
    db_password = "db-" + secrets.token_hex(8)  # the test server trusts: any password works
    db_url = make_url(os.environ["DATABASE_URL"]).set(password=db_password)
    env = {
        "DATABASE_URL": db_url.render_as_string(hide_password=False),
        "TWELVEDATA_API_KEY": api_key,
    }
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
    wait_until(
        lambda: status(base + "/healthcheck", f"{USER}:{flower_password}")[0] == 200,
        60,
        0.2,
        "Flower",
    )
    # Work that logs: successes, a validation failure with its traceback, a crash.
    assert app.send_task("ping").get(timeout=30) == "pong"
    assert app.send_task("cleanup_old_data").get(timeout=60)["cutoff"]
    failed = app.send_task("generate_report", kwargs={"report_type": "bogus"})
    assert failed.get(timeout=30, propagate=False) is not None
    assert status(base + "/api/workers", f"{USER}:{flower_password}")[0] == 200
    assert status(base + "/api/workers", f"{USER}:wrong")[0] == 401
    time.sleep(2)
    for service in (worker, beat, flower):
        service.stop()
    logs = {s.name: s.output for s in (worker, beat, flower)}
    assert all(len(text) > 500 for text in logs.values())  # they did log
    leaks = {
        f"{name}: {label}"
        for name, text in logs.items()
        for label, secret in {
            "Redis password": redis_password,
            "Flower password": flower_password,
            "API key": api_key,
            "database password": db_password,
        }.items()
        if secret in text
    }
    record(
        "access: secrets in logs (worker, beat, Flower)",
        sent=3,
        completed=3 - len({leak.split(":")[0] for leak in leaks}),
        duplicated=0,
        lost=0,
        recover_s=None,
    )
    assert leaks == set()
