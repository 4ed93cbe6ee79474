"""Run a rendered container's command as a local process: what the pod would run, run here.

The environment is built the way the kubelet builds it: envFrom (ConfigMaps, Secrets) first,
then `env` in order, `$(VAR)` expanded from the variables defined before it. Values come from
the objects rendered by the same chart run. Nothing of the test's own environment leaks in
except PATH (the venv's bin first, as /opt/venv/bin is in the image), HOME and locale.
The image's ENTRYPOINT (from the Dockerfile) wraps `args` as in the pod when it is installed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chart_helpers import REPO

VENV_BIN = Path(sys.executable).parent
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables only; $$ escapes a dollar."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REF.sub(sub, text)


def _source(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            if kind == "Secret":
                return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
            return {k: str(v) for k, v in obj.get("data", {}).items()}
    raise LookupError(f"the pod refers to {kind} {name}, which the chart did not render")


def container_env(
    objects: list[dict[str, Any]],
    container: dict[str, Any],
    extra_sources: dict[tuple[str, str], dict[str, str]] | None = None,
) -> dict[str, str]:
    """The container's environment. extra_sources: (kind, name) -> data for existing Secrets."""

    def source(kind: str, name: str) -> dict[str, str]:
        if extra_sources and (kind, name) in extra_sources:
            return extra_sources[(kind, name)]
        return _source(objects, kind, name)

    env: dict[str, str] = {}
    for item in container.get("envFrom", []):
        if "configMapRef" in item:
            env.update(source("ConfigMap", item["configMapRef"]["name"]))
        elif "secretRef" in item:
            env.update(source("Secret", item["secretRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            data = source("Secret", ref["secretKeyRef"]["name"])
            env[item["name"]] = data[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            data = source("ConfigMap", ref["configMapKeyRef"]["name"])
            env[item["name"]] = data[ref["configMapKeyRef"]["key"]]
        else:
            raise NotImplementedError(f"env {item['name']}: {ref}")
    return env


def image_entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form)."""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            return list(json.loads(line.removeprefix("ENTRYPOINT ")))
    return []


def process_env(env: dict[str, str], **overrides: str) -> dict[str, str]:
    base = {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    return {**base, **env, **overrides}


def argv_of(container: dict[str, Any], env: dict[str, str], wrap: bool = True) -> list[str]:
    """command (or the image's ENTRYPOINT) + args, $(VAR) expanded like the kubelet does."""
    args = [expand(a, env) for a in container.get("args", [])]
    if "command" in container:
        return [expand(c, env) for c in container["command"]] + args
    entry = image_entrypoint()
    if wrap and entry and shutil.which(entry[0], path=env["PATH"]):
        return [*entry, *args]
    return args


def _volume_files(objects: list[dict[str, Any]], volume: dict[str, Any]) -> dict[str, str] | None:
    """The files a secret, configMap or projected volume shows (None: another kind)."""

    def one(kind: str, name: str, items: list[dict[str, str]] | None) -> dict[str, str]:
        data = _source(objects, kind, name)
        if items is None:
            return data
        return {i["path"]: data[i["key"]] for i in items}

    if "secret" in volume:
        return one("Secret", volume["secret"]["secretName"], volume["secret"].get("items"))
    if "configMap" in volume:
        return one("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("items"))
    if "projected" in volume:
        files: dict[str, str] = {}
        for src in volume["projected"]["sources"]:
            kind, ref = (
                ("Secret", src["secret"]) if "secret" in src else ("ConfigMap", src["configMap"])
            )
            files |= one(kind, ref["name"], ref.get("items"))
        return files
    return None


def local_mounts(
    objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], root: Path
) -> dict[str, str]:
    """Write the container's Secret/ConfigMap mounts under root, as the kubelet mounts them
    (a directory per volume, one file per key). Returns mountPath -> local directory."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        files = _volume_files(objects, volumes[mount["name"]])
        if files is None:
            continue
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
        out[mount["mountPath"]] = str(directory)
    return out


def relocate(text: str, mounts: dict[str, str]) -> str:
    """A path under a mountPath, moved to the local copy (only paths change)."""
    for path, local in mounts.items():
        text = text.replace(path, local)
    return text


class LocalPod:
    """One container of a rendered pod as a local process (cwd = repo root = the image's /app)."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        container: dict[str, Any],
        log_path: Path,
        pod: dict[str, Any] | None = None,
        **overrides: str,
    ) -> None:
        """pod: the pod spec; its Secret/ConfigMap mounts are written next to log_path."""
        self.container = container
        mounts = (
            local_mounts(objects, pod, container, log_path.parent / f"{log_path.stem}-mounts")
            if pod
            else {}
        )
        env = {k: relocate(v, mounts) for k, v in container_env(objects, container).items()}
        self.env = process_env(env, **overrides)
        self.argv = [relocate(a, mounts) for a in argv_of(container, self.env)]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exec_probe(self, probe: str) -> subprocess.CompletedProcess[str]:
        """Run the container's exec probe (livenessProbe, readinessProbe...) like the kubelet."""
        spec = self.container[probe]
        assert "exec" in spec, f"{probe} is not an exec probe: {spec}"
        return subprocess.run(
            spec["exec"]["command"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=spec.get("timeoutSeconds", 1) + 10,
        )

    def wait_probe(self, probe: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited {self.proc.returncode}:\n{self.output[-3000:]}"
                )
            last = self.exec_probe(probe)
            if last.returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(
            f"{probe} still failing after {timeout}s: {last and last.stderr}\n{self.output[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal it as the kubelet signals PID 1 and wait; None if it had to be killed.

        Whatever is left afterwards (a process that outlived its parent) is killed, as the
        kubelet removes the whole container.
        """
        tree = _descendants(self.proc.pid)
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
        leftovers = [*tree, *_descendants(self.proc.pid)]
        if self.proc.poll() is None:
            leftovers.append(self.proc.pid)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        return code


def _descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
