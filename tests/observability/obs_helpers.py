"""Helpers of the observability tests: a real Prometheus, the exporter's venv, processes we
start ourselves, and reading the queries out of the dashboards and rules."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHART = REPO / "deploy" / "helm" / "waardhaven-tasks"
DASHBOARDS = sorted((CHART / "files" / "dashboards").glob("*.json"))
RULE_TEMPLATES = sorted((CHART / "files" / "rules").glob("*.yaml"))
PLAIN_RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
PROMETHEUS_EXAMPLE = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROMTOOL_TESTS = sorted((REPO / "tests" / "rules").glob("*-test.yaml"))
EXPORTER_LOCK = REPO / "services" / "exporter" / "requirements.lock"
VENV_BIN = Path(sys.executable).parent

# Metrics that come from elsewhere than our workers and exporter.
EXTERNAL_METRICS = {
    "up": "Prometheus's own series per target",
}
EXTERNAL_PREFIXES = {
    # kube-state-metrics: no Kubernetes here; the HPA panel is excluded from "returns data".
    "kube_horizontalpodautoscaler_": "kube-state-metrics (not part of the local stack)",
}


# --- tools --------------------------------------------------------------------------------------


def ensure_prometheus() -> tuple[str, str]:
    """prometheus and promtool (Debian package `prometheus`), installed when missing: CI runs
    on a fresh machine of this kind and must bring them itself."""
    prom, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and promtool:
        return prom, promtool
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    for args in (
        ["update", "-qq"],
        ["install", "-y", "-qq", "--no-install-recommends", "prometheus"],
    ):
        done = subprocess.run([*apt, *args], env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    prom, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and promtool):
        raise RuntimeError("the Debian package prometheus installed no prometheus/promtool")
    return prom, promtool


def ensure_exporter_venv() -> Path:
    """$EXPORTER_VENV, else .venv-exporter built from services/exporter/requirements.lock (as
    `make exporter-venv` does); rebuilt when the lock is newer than the venv's stamp."""
    if os.environ.get("EXPORTER_VENV"):
        return Path(os.environ["EXPORTER_VENV"])
    venv = REPO / ".venv-exporter"
    stamp = venv / ".installed"
    if stamp.exists() and stamp.stat().st_mtime >= EXPORTER_LOCK.stat().st_mtime:
        return venv
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    uv = VENV_BIN / "uv"
    if uv.exists():
        cmd = [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    else:
        cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*cmd, "-r", str(EXPORTER_LOCK)], check=True, timeout=600)
    stamp.touch()
    return venv


# --- processes ----------------------------------------------------------------------------------


class Proc:
    """A process we start in its own session; stop() ends that process group only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = tmp / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.proc.pid  # start_new_session: the group is ours

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Prefork children left behind by a main process killed hard: same group, ours.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self._log.close()


def service(name: str, tmp: Path, env: dict[str, str], *args: str) -> Proc:
    return Proc(name, [str(REPO / "services" / name / "run"), *args], env, tmp)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def scrape(url: str) -> dict[str, float]:
    """Sample line (name{labels}) -> value, from a /metrics text page."""
    status, text = http_get(url)
    assert status == 200, f"{url}: {status} {text[:300]}"
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def sample_names(samples: dict[str, float]) -> set[str]:
    return {key.split("{", 1)[0] for key in samples}


def value_of(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    found = False
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
            found = True
    if not found:
        raise KeyError(f"{name}{labels} not exposed")
    return total


# --- Prometheus ---------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, binary: str, config: dict[str, Any], tmp: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self.proc = Proc("prometheus", argv, dict(os.environ), tmp)
        wait_until("Prometheus ready", lambda: http_get(self.url + "/-/ready")[0] == 200, 30)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}")
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"{path} {params}: {status} {body[:500]}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def stop(self) -> None:
        self.proc.stop()


# --- queries in dashboards and rules ------------------------------------------------------------


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target of every panel."""
    for dashboard in dashboards():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                yield dashboard["uid"], panel["title"], target["expr"]


def variable_queries() -> Iterator[tuple[str, str, str]]:
    for dashboard in dashboards():
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                yield dashboard["uid"], var["name"], query


def label_values(query: str) -> tuple[str, str]:
    """Grafana's `label_values(selector, label)` -> (selector, label)."""
    inner = query.strip().removeprefix("label_values(").removesuffix(")")
    selector, label = inner.rsplit(",", 1)
    return selector.strip(), label.strip()


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables as a dashboard with these selections would send them."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def load_rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


_COMPARISON = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPS = ("and", "or", "unless")
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def operands(expr: str) -> list[str]:
    """The operands of the top-level comparison and set operators of `expr` that are not
    number literals: the signals an alert compares with its thresholds. `a > 1 and b >= 2` ->
    [a, b]. Operators inside (), {} or [] and strings are not top level."""
    parts: list[str] = []
    depth = 0
    quote = ""
    start = i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISON if expr.startswith(o, i)), None)
            word = re.match(r"(and|or|unless)\b", expr[i:])
            boundary = i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_")
            if op is None and word and boundary:
                op = word.group(1)
            if op is not None:
                parts.append(expr[start:i])
                i += len(op)
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip() and not _NUMBER.match(p)]


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= set(_SET_OPS)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (label matchers, grouping labels, functions, strings,
    durations and Grafana variables removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        ident = match.group(0)
        if ident[0].isdigit() or ident in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(ident)
    return names


def is_external(name: str) -> bool:
    return name in EXTERNAL_METRICS or name.startswith(tuple(EXTERNAL_PREFIXES))


def rules_with_short_for(rules: dict[str, Any]) -> dict[str, Any]:
    """The same rules with `for: 0s`: the live test cannot wait minutes (promtool tests the
    real durations)."""
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    return rules
