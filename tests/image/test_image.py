"""The image from the top-level Dockerfile, built here and run: a worker in it processes a task.

No Docker engine here: the base image is made with debootstrap (Debian bookworm + python3,
the way DESIGN.md section 5 describes), imported with podman, cached under a tag keyed by a
hash of how it was made; the image is built by scripts/build-image.sh (buildah, chroot
isolation) and run with `buildah run --isolation chroot`, which shares the host network, so the
worker reaches the test's Redis on 127.0.0.1. Missing tools are installed with apt-get.
Minutes on a cold cache, well under one on a warm one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, RedisServer

pytestmark = [pytest.mark.image, pytest.mark.slow]

SUITE = "bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3,python3-venv,ca-certificates"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE]
TOOLS = {"debootstrap": "debootstrap", "buildah": "buildah", "podman": "podman"}
IMAGE = "localhost/waardhaven-tasks:image-test"


def run(*args: str, timeout: float = 900, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


@pytest.fixture(scope="session")
def tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"the image test needs {missing} (apt-get install {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-q", env=env)
    run("apt-get", "install", "-y", "-q", *missing, env=env)


def image_exists(ref: str) -> bool:
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", ref], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture(scope="session")
def base_image(tools: None) -> str:
    """A Debian base with python3, made once and cached under a tag keyed by how it is made."""
    key = hashlib.sha256(json.dumps([DEBOOTSTRAP, MIRROR]).encode()).hexdigest()[:12]
    ref = f"localhost/waardhaven-debian-python:{SUITE}-{key}"
    if image_exists(ref):
        return ref
    root = Path(tempfile.mkdtemp(prefix="wh-debootstrap-"))
    try:
        run(*DEBOOTSTRAP, str(root / "rootfs"), MIRROR)
        tar = subprocess.Popen(
            ["tar", "-C", str(root / "rootfs"), "-c", "."], stdout=subprocess.PIPE
        )
        imported = subprocess.run(
            ["podman", "import", "-", ref],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return ref


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """Built with the same script `make image` runs (buildah keeps layers: rebuilds are quick)."""
    env = {**os.environ, "BASE": base_image, "BUILDER": "buildah"}
    run(str(REPO / "scripts" / "build-image.sh"), IMAGE, cwd=REPO, env=env, timeout=1800)
    return IMAGE


@pytest.fixture
def working_container(image: str) -> Iterator[str]:
    name = run("buildah", "from", image).stdout.strip().splitlines()[-1]
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def in_image(container: str, *cmd: str, env: dict[str, str] | None = None) -> str:
    args = ["buildah", "run", "--isolation", "chroot"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return run(*args, container, "--", *cmd, timeout=120).stdout


def test_image_config(image: str) -> None:
    config = json.loads(run("buildah", "inspect", "--type", "image", image).stdout)["OCIv1"]
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["WorkingDir"] == "/app"
    assert config["config"]["Entrypoint"] == ["dumb-init", "--single-child", "--"]
    assert "Healthcheck" not in config["config"]
    labels = config["config"]["Labels"]
    for key in ("title", "version", "revision", "created", "source"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert any(e.startswith("PATH=/opt/venv/bin:") for e in config["config"]["Env"])


def test_non_root_no_compilers_services_and_both_venvs(working_container: str) -> None:
    script = (
        "id -u; id -g; command -v gcc cc make || true; ls services;"
        " /opt/exporter-venv/bin/python -c"
        " 'import redis; print(\"exporter-redis\", redis.__version__)';"
        " python -c 'import redis, tasks.celery_app; print(\"app-redis\", redis.__version__)';"
        " touch /app/x 2>/dev/null && echo app-writable || echo app-read-only"
    )
    out = in_image(working_container, "bash", "-c", script, env={"METRICS_PORT": "0"}).split("\n")
    assert out[0] == "10001" and out[1] == "10001"
    assert not [line for line in out if line.endswith(("/gcc", "/cc", "/make"))]
    for service in ("worker-high", "worker-low", "beat", "flower"):
        assert service in out
    assert (
        next(line for line in out if line.startswith("exporter-redis")).split()[1].startswith("5.")
    )
    assert (
        int(next(line for line in out if line.startswith("app-redis")).split()[1].split(".")[0])
        >= 6
    )
    assert "app-read-only" in out


def _dumb_init_pid(parent: int) -> int | None:
    """The dumb-init process that `buildah run` started (chroot isolation: same PID namespace)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if cmdline[0].endswith(b"/dumb-init") and _is_below(int(proc.name), parent):
                return int(proc.name)
    return None


def _is_below(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def test_worker_in_the_image_processes_a_task_and_stops_softly(
    working_container: str, tmp_path: Path
) -> None:
    from tasks.celery_app import create_app
    from tasks.settings import Settings

    broker = RedisServer(password=secrets.token_hex(8)).start()
    log = (tmp_path / "worker.log").open("wb")
    env = {
        "REDIS_URL": broker.url,
        "DATABASE_URL": os.environ["DATABASE_URL"],
        "METRICS_PORT": "0",
        "WORKER_CONCURRENCY": "1",
        "WORKER_SOFT_SHUTDOWN_TIMEOUT": "5",  # idle soft shutdown waits it out in full
    }
    args = ["buildah", "run", "--isolation", "chroot"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    # The image's entrypoint and the chart's args for worker-low: what the pod runs.
    cmd = ["dumb-init", "--single-child", "--", "services/worker-low/run"]
    proc = subprocess.Popen(
        [*args, working_container, "--", *cmd], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        app = create_app(Settings(redis_url=broker.url))
        result = app.send_task("ping")  # routed to `default`, which worker-low consumes
        assert result.get(timeout=120) == "pong", (tmp_path / "worker.log").read_text()
        output = (tmp_path / "worker.log").read_text()
        assert "low@" in output and "ready" in output

        # SIGTERM to the container's PID 1 (dumb-init), as the kubelet does: it reaches the
        # Celery main process only, whose soft shutdown ends the worker cleanly.
        init = _dumb_init_pid(proc.pid)
        assert init, "dumb-init not found"
        os.kill(init, signal.SIGTERM)
        proc.wait(timeout=90)
        output = (tmp_path / "worker.log").read_text()
        assert "soft shutdown" in output.lower(), output[-3000:]
    finally:
        if proc.poll() is None:
            init = _dumb_init_pid(proc.pid)
            if init:
                os.kill(init, signal.SIGKILL)
            proc.terminate()
            proc.wait(timeout=30)
        log.close()
        broker.close()
        time.sleep(0.1)
