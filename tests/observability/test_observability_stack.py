"""A real Prometheus scraping a real local stack, then every dashboard query and alert rule
evaluated against it.

The stack: its own redis-server (maxmemory set, stopped at the end for the Redis alert),
services/worker-high/run (high_priority) and services/worker-low/run with WORKER_QUEUES=
low_priority (so `default` has no consumer), both with `--concurrency 2` and children recycled
every 5 tasks, services/exporter/run, services/beat/run (stopped early: its schedule entry falls
overdue), services/exporter/probes (the cluster-wide figures), the session's PostgreSQL
database. Prometheus (Debian) runs from
deploy/prometheus/prometheus.yml with these targets, 1 s intervals and the chart's rules
rendered with short thresholds (and `for: 0s`). The workload: successes, failures (bad input to
the real generate_report), a retry, soft and hard time-limit hits, an expired (revoked) task, an
unknown (rejected) task, the real refresh -> index -> report chain for the domain figures, and
a backlog on `default`. Test-only tasks (retry, time limits) live in obs_tasks.py, loaded with
WAARDHAVEN_EXTRA_TASK_MODULES.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import Celery
from obs_helpers import (
    HERE,
    PROMETHEUS_EXAMPLE,
    REPO,
    Proc,
    Prometheus,
    ensure_exporter_venv,
    ensure_prometheus,
    http_get,
    is_external,
    label_values,
    load_rules,
    metric_names,
    operands,
    panel_queries,
    rules_with_short_for,
    sample_names,
    scrape,
    service,
    substitute,
    value_of,
    variable_queries,
    wait_until,
)
from render_rules import rules_for

from conftest import VENV_BIN, RedisServer, free_port, reset_database
from tasks.metrics.server import default_multiproc_dir

NAMESPACE = "waardhaven-test"
PINGS = 60  # to worker-high: 2 children recycled every 5 tasks -> at least 10 recycled
# Short thresholds for the live test (the real ones are unit-tested by promtool).
TEST_ALERTS = {
    "alerts": {
        "thresholds": {
            "taskFailureRatio": 0.1,
            "taskFailureMinCount": 1,
            "timeLimitHits": 0,
            "queueLength": 4,
            "queueOldestMessageSeconds": 5,
            "beatOverdueSeconds": 1,
            "redisMemoryRatio": 0.85,
        }
    }
}
# Dashboard variables as a user selecting the test namespace and "All" would send them.
VARIABLES = {
    "namespace": NAMESPACE,
    "queue": ".*",
    "task": ".*",
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "15m",
}
# kube-state-metrics does not run here (no Kubernetes): the HPA panel cannot return data.
# It is the only panel excluded from the "returns data" check; its metric names are checked
# against kube-state-metrics' prefix instead (obs_helpers.EXTERNAL_PREFIXES).
NO_DATA_HERE = {"HPA replicas per worker pool"}
# What must be firing at the end of the workload (before Redis is stopped), by alert: the
# label values that identify each firing instance. Every other alert or instance must not fire.
EXPECTED_FIRING = {
    "WaardhavenTaskFailureRateHigh": {("task", "generate_report"), ("task", "obs.sleep")},
    "WaardhavenTaskTimeLimitHit": {("kind", "soft"), ("kind", "hard")},
    "WaardhavenQueueBacklogGrowing": {("queue_name", "default")},
    "WaardhavenQueueMessageTooOld": {("queue", "default")},
    "WaardhavenQueueNoWorker": {("queue_name", "default")},
    "WaardhavenBeatScheduleMissed": {("schedule", "cleanup-old-data-weekly")},
}


class Stack:
    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.procs: dict[str, Any] = {}
        self.prometheus: Prometheus | None = None
        prometheus_bin, self.promtool = ensure_prometheus()
        exporter_venv = ensure_exporter_venv()
        self.redis_server = RedisServer(password=secrets.token_hex(8)).start()
        self.redis = redis.Redis.from_url(self.redis_server.url)
        self.redis.config_set("maxmemory", "64mb")
        self.ports = {
            "worker-high": free_port(),
            "worker-low": free_port(),
            "exporter": free_port(),
            "probes": free_port(),
        }
        base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        base.update(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            REDIS_URL=self.redis_server.url,
            RESULT_BACKEND_URL=self.redis_server.url,
            DATABASE_URL=database_url,
            WAARDHAVEN_EXTRA_TASK_MODULES="obs_tasks",
            WORKER_MAX_TASKS_PER_CHILD="5",
            WORKER_CONCURRENCY="2",
            WORKER_SOFT_SHUTDOWN_TIMEOUT="2",
            LOG_LEVEL="INFO",
            # Beat: one entry due at the next minute (beat is stopped before: it falls overdue),
            # the others far away (they must not alert).
            SCHEDULE_CLEANUP_OLD_DATA="* * * * *",
            SCHEDULE_REFRESH_MARKET_DATA="0 0 1 1 *",
            SCHEDULE_COMPUTE_INDEX="0 0 1 1 *",
            MARKET_DATA_PROVIDER="synthetic",
            PROGRESS_INTERVAL="0",
        )
        self.env = base
        self.multiproc_low = tmp / "metrics-low"
        self.start(
            "worker-high",
            HEALTH_DIR=str(tmp / "health-high"),
            METRICS_PORT=str(self.ports["worker-high"]),
        )  # default multiprocess dir: $TMPDIR/waardhaven-metrics-<port>
        self.start(
            "worker-low",
            HEALTH_DIR=str(tmp / "health-low"),
            METRICS_PORT=str(self.ports["worker-low"]),
            WORKER_QUEUES="low_priority",
            PROMETHEUS_MULTIPROC_DIR=str(self.multiproc_low),
        )
        self.start(
            "exporter", EXPORTER_PORT=str(self.ports["exporter"]), EXPORTER_VENV=str(exporter_venv)
        )
        self.procs["probes"] = Proc(
            "probes",
            [str(REPO / "services" / "exporter" / "probes")],
            {**self.env, "CLUSTER_METRICS_PORT": str(self.ports["probes"])},
            tmp,
        )
        self.start("beat", HEALTH_DIR=str(tmp / "health-beat"))
        for name in ("worker-high", "worker-low"):
            ready = tmp / f"health-{name.split('-')[1]}" / "worker-ready"
            self.wait(f"{name} ready", ready.exists, 90, name)
        self.wait(
            "exporter /health",
            lambda: http_get(self.exporter_url("/health"))[0] == 200,
            60,
            "exporter",
        )
        # Beat has written its schedule to Redis: stop it, its next due time passes unsent.
        self.wait(
            "beat's schedule in Redis",
            lambda: self.redis.zcard("waardhaven:redbeat::schedule") >= 3,
            60,
            "beat",
        )
        self.procs["beat"].stop()
        self.client = Celery("waardhaven_tasks")
        from tasks.celery_app import build_config
        from tasks.settings import Settings

        self.client.config_from_object(build_config(Settings(redis_url=self.redis_server.url)))
        self.start_prometheus(prometheus_bin)

    def start(self, name: str, **env: str) -> None:
        self.procs[name] = service(name, self.tmp, {**self.env, **env})

    def wait(self, what: str, check: Any, timeout: float, name: str) -> None:
        try:
            wait_until(what, check, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{name} log:\n{self.procs[name].output[-3000:]}") from None

    def metrics_url(self, worker: str) -> str:
        return f"http://127.0.0.1:{self.ports[worker]}/metrics"

    def probes_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['probes']}/metrics"

    def exporter_url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.ports['exporter']}{path}"

    def start_prometheus(self, binary: str) -> None:
        rules = rules_with_short_for(rules_for(TEST_ALERTS))
        rules_path = self.tmp / "alerts.yaml"
        rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        config = yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(rules_path)]
        targets = {
            "worker": [
                {
                    "targets": [f"127.0.0.1:{self.ports['worker-high']}"],
                    "labels": {"worker": "high", "namespace": NAMESPACE},
                },
                {
                    "targets": [f"127.0.0.1:{self.ports['worker-low']}"],
                    "labels": {"worker": "low", "namespace": NAMESPACE},
                },
            ],
            "exporter": [
                {
                    "targets": [
                        f"127.0.0.1:{self.ports['exporter']}",
                        f"127.0.0.1:{self.ports['probes']}",
                    ],
                    "labels": {"namespace": NAMESPACE},
                }
            ],
        }
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert set(jobs) == set(targets), f"jobs of {PROMETHEUS_EXAMPLE}: {set(jobs)}"
        for name, job in jobs.items():
            job["static_configs"] = targets[name]
        # The exporter inspects the workers at each scrape (two 1 s broadcasts).
        jobs["exporter"].update(scrape_interval="3s", scrape_timeout="3s")
        self.prometheus = Prometheus(binary, config, self.tmp, free_port())
        prom = self.prometheus
        wait_until(
            "every target up",
            lambda: all(t["health"] == "up" for t in prom.targets()) and len(prom.targets()) == 4,
            30,
        )

    def send(self, name: str, **options: Any) -> Any:
        return self.client.send_task(name, **options)

    def prom_value(self, expr: str) -> float:
        result = self.prometheus.query(expr)
        assert result, f"no data for {expr}"
        return float(result[0]["value"][1])

    def close(self) -> None:
        if self.prometheus:
            self.prometheus.stop()
        if self.redis_server.proc and self.redis_server.proc.poll() is not None:
            self.redis_server.start()  # workers stop quickly with their broker back
        for proc in self.procs.values():
            proc.stop()
        # worker-high's default directory, should its exit have skipped the cleanup.
        shutil.rmtree(default_multiproc_dir(self.ports["worker-high"]), ignore_errors=True)
        self.redis.close()
        self.redis_server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, migrated_db: str) -> Iterator[Stack]:
    reset_database()
    s = Stack(tmp_path_factory.mktemp("observability"), migrated_db)
    try:
        yield s
    finally:
        s.close()


def _outcome(result: Any, timeout: float = 60) -> Any:
    try:
        return result.get(timeout=timeout, propagate=True)
    except Exception as exc:
        return exc


@pytest.fixture(scope="module")
def workload(stack: Stack) -> dict[str, Any]:
    """Runs once; returns what was sent and how it ended."""
    prom = stack.prometheus
    assert prom is not None
    out: dict[str, Any] = {}
    # A backlog on `default` (nobody consumes it) that grows between two exporter scrapes.
    for _ in range(3):
        stack.send("ping", queue="default")
    wait_until(
        "Prometheus sees 3 messages in default",
        lambda: prom.query('celery_queue_length{queue_name="default"} == 3'),
        20,
    )
    pings = [stack.send("ping", queue="high_priority") for _ in range(PINGS)]
    bad_reports = [
        stack.send("generate_report", kwargs={"period_days": 1}) for _ in range(2)
    ]  # InvalidTaskArguments: a real failure, never retried
    flaky = stack.send("obs.flaky", kwargs={"fails": 2}, queue="low_priority")
    soft = stack.send("obs.sleep", args=[4], queue="low_priority", soft_time_limit=1, time_limit=3)
    hard = stack.send(
        "obs.sleep",
        args=[6],
        kwargs={"ignore_soft_limit": True},
        queue="low_priority",
        soft_time_limit=1,
        time_limit=2,
    )
    stack.send("ping", queue="high_priority", expires=0.001)  # expired on arrival: revoked
    stack.send("no.such.task", queue="high_priority")  # unknown to the worker: rejected
    refresh = stack.send(
        "refresh_market_data", kwargs={"mode": "smart", "symbols": ["AAPL", "MSFT", "SPY", "^GSPC"]}
    )
    out["pings"] = [_outcome(r) for r in pings]
    out["refresh"] = _outcome(refresh)
    out["index"] = _outcome(stack.send("compute_index"))
    out["report"] = _outcome(stack.send("generate_report", kwargs={"report_type": "performance"}))
    out["bad_reports"] = [_outcome(r) for r in bad_reports]
    out["flaky"] = _outcome(flaky)
    out["soft"] = _outcome(soft)
    out["hard"] = _outcome(hard)
    for _ in range(3):
        stack.send("ping", queue="default")
    # Prometheus has the final numbers: every ping counted, the backlog at 6, the cleanup entry
    # overdue (beat was stopped before its next run, due at the next minute).
    wait_until(
        "Prometheus has every ping",
        lambda: prom.query(
            f'sum(waardhaven_tasks_total{{task="ping",queue="high_priority",state="succeeded"}})'
            f" == {PINGS}"
        ),
        30,
    )
    wait_until(
        "Prometheus sees 6 messages in default",
        lambda: prom.query('celery_queue_length{queue_name="default"} == 6'),
        20,
    )
    wait_until(
        "the cleanup schedule entry overdue",
        lambda: prom.query(
            "time() - waardhaven_beat_next_run_timestamp_seconds"
            '{schedule="cleanup-old-data-weekly"} > 2'
        ),
        75,
        interval=1,
    )
    wait_until(
        "the oldest message in default older than 6 s",
        lambda: prom.query('waardhaven_queue_oldest_message_age_seconds{queue="default"} > 6'),
        20,
    )
    time.sleep(3)  # a few more rule evaluations
    return out


def test_the_workload_ends_as_designed(workload: dict[str, Any]) -> None:
    assert workload["pings"] == ["pong"] * PINGS
    assert isinstance(workload["refresh"], dict) and workload["refresh"]["rows_inserted"] > 0
    assert isinstance(workload["index"], dict) and workload["index"]["assets"] > 0
    assert isinstance(workload["report"], dict), workload["report"]
    assert [type(e).__name__ for e in workload["bad_reports"]] == ["InvalidTaskArguments"] * 2
    assert workload["flaky"] == 2  # succeeded on its third run
    assert type(workload["soft"]).__name__ == "SoftTimeLimitExceeded"
    assert type(workload["hard"]).__name__ == "TimeLimitExceeded"


def test_counts_are_exact_with_concurrency_and_recycled_children(
    stack: Stack, workload: dict[str, Any]
) -> None:
    high = scrape(stack.metrics_url("worker-high"))
    ok = value_of(high, "waardhaven_tasks_total", task="ping", queue="high_priority")
    assert ok == PINGS + 1  # + the expired one, counted as revoked
    assert (
        value_of(
            high, "waardhaven_tasks_total", task="ping", state="succeeded", queue="high_priority"
        )
        == PINGS
    )
    assert value_of(high, "waardhaven_tasks_total", task="ping", state="revoked") == 1
    assert value_of(high, "waardhaven_tasks_total", task="unknown", state="rejected") == 1
    assert value_of(high, "waardhaven_task_runtime_seconds_count", task="ping") == PINGS
    assert value_of(high, "waardhaven_task_queue_wait_seconds_count", task="ping") == PINGS
    # Children were recycled, their files folded in: a bounded directory.
    recycled = value_of(high, "waardhaven_metrics_compacted_processes_total")
    assert recycled >= PINGS // 5 - 2, recycled
    assert value_of(high, "waardhaven_metrics_files") <= 15
    assert value_of(high, "waardhaven_worker_processes") == 2
    # Cluster-wide figures come from the one probes process, not from every worker.
    cluster = {"waardhaven_redis_up", "waardhaven_queue_oldest_message_age_seconds"}
    assert not cluster & sample_names(high)
    assert cluster <= sample_names(scrape(stack.probes_url()))

    low = scrape(stack.metrics_url("worker-low"))
    assert value_of(low, "waardhaven_tasks_total", task="generate_report", state="failed") == 2
    assert value_of(low, "waardhaven_tasks_total", task="generate_report", state="succeeded") == 1
    assert value_of(low, "waardhaven_tasks_total", task="obs.flaky", state="retried") == 2
    assert value_of(low, "waardhaven_tasks_total", task="obs.flaky", state="succeeded") == 1
    # The hard limit: one failure, though Celery reports it twice in the main process.
    assert value_of(low, "waardhaven_tasks_total", task="obs.sleep", state="failed") == 2
    assert (
        value_of(low, "waardhaven_task_time_limit_hits_total", task="obs.sleep", kind="soft") == 2
    )
    assert (
        value_of(low, "waardhaven_task_time_limit_hits_total", task="obs.sleep", kind="hard") == 1
    )
    assert (
        value_of(
            low, "waardhaven_task_failures_total", task="obs.sleep", exception="TimeLimitExceeded"
        )
        == 1
    )
    assert (
        value_of(
            low,
            "waardhaven_task_failures_total",
            task="generate_report",
            exception="InvalidTaskArguments",
        )
        == 2
    )
    assert value_of(low, "waardhaven_report_generation_seconds_count", kind="performance") == 1
    assert value_of(high, "waardhaven_index_assets") == workload["index"]["assets"]
    assert (
        value_of(high, "waardhaven_rows_upserted_total", table="prices")
        >= (workload["refresh"]["rows_inserted"])
    )
    # The low worker's explicit PROMETHEUS_MULTIPROC_DIR was used (and emptied at start).
    assert list(stack.multiproc_low.glob("*.db"))
    # Labels are bounded: no id, host or argument anywhere.
    for samples in (high, low):
        for key in samples:
            assert "hostname" not in key and "task_id" not in key and "pid=" not in key, key


def test_every_dashboard_query_returns_data(stack: Stack, workload: dict[str, Any]) -> None:
    prom = stack.prometheus
    assert prom is not None
    empty = []
    checked = 0
    for uid, title, expr in panel_queries():
        if title in NO_DATA_HERE:
            continue
        query = substitute(expr, VARIABLES)
        if not prom.query(query):
            empty.append(f"{uid} / {title}: {query}")
        checked += 1
    assert checked >= 30
    assert not empty, "queries without data:\n" + "\n".join(empty)
    for uid, name, query in variable_queries():
        selector, label = label_values(query)
        values = prom.api(f"label/{label}/values", **{"match[]": substitute(selector, VARIABLES)})
        assert values, f"{uid}: variable {name} has no values ({query})"
    # A few values checked for meaning, not only presence.
    sel = 'namespace=~"$namespace", task="generate_report"'
    failure = substitute(
        f'sum(rate(waardhaven_tasks_total{{{sel}, state="failed"}}[15m]))'
        f' / sum(rate(waardhaven_tasks_total{{{sel}, state=~"succeeded|failed"}}[15m]))',
        VARIABLES,
    )
    assert stack.prom_value(failure) == pytest.approx(2 / 3)
    assert stack.prom_value('max(celery_queue_length{queue_name="default"})') == 6
    assert stack.prom_value('sum(waardhaven_worker_consuming{queue="default"}) or vector(0)') == 0
    assert stack.prom_value('sum(waardhaven_worker_consuming{queue="high_priority"})') == 1


def test_every_alert_expression_has_data_and_the_right_alerts_fire(
    stack: Stack, workload: dict[str, Any]
) -> None:
    prom = stack.prometheus
    assert prom is not None
    rules = rules_for(TEST_ALERTS)
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 9
    empty = []
    for rule in alerts:
        for signal_expr in operands(rule["expr"]):
            if not prom.query(signal_expr):
                empty.append(f"{rule['alert']}: {signal_expr}")
    assert not empty, "alert signals without data:\n" + "\n".join(empty)
    # Those expected to fire return data as a whole expression, too.
    for rule in alerts:
        if rule["alert"] in EXPECTED_FIRING:
            assert prom.query(rule["expr"]), f"{rule['alert']} does not hold: {rule['expr']}"

    firing: dict[str, set[tuple[str, str]]] = {}
    for alert in prom.alerts():
        if alert["state"] != "firing":
            continue
        labels = alert["labels"]
        keys = EXPECTED_FIRING.get(labels["alertname"], set())
        ident = {(k, v) for k, v in labels.items() if (k, v) in keys} or {
            ("unexpected", str(labels))
        }
        firing.setdefault(labels["alertname"], set()).update(ident)
        assert labels["namespace"] == NAMESPACE
        assert labels["severity"] in {"warning", "critical"}
        assert alert["annotations"]["runbook_url"].endswith(
            "#runbook-" + labels["alertname"].lower()
        )
        assert "{{" not in alert["annotations"]["description"]
    assert firing == EXPECTED_FIRING


def test_every_metric_name_in_dashboards_and_rules_is_exposed(
    stack: Stack, workload: dict[str, Any]
) -> None:
    exposed = sample_names(scrape(stack.metrics_url("worker-high")))
    exposed |= sample_names(scrape(stack.metrics_url("worker-low")))
    exposed |= sample_names(scrape(stack.exporter_url()))
    exposed |= sample_names(scrape(stack.probes_url()))
    used: dict[str, str] = {}
    for uid, title, expr in panel_queries():
        for name in metric_names(expr):
            used.setdefault(name, f"dashboard {uid} / {title}")
    for uid, var, query in variable_queries():
        for name in metric_names(label_values(query)[0]):
            used.setdefault(name, f"variable {var} of {uid}")
    for path in (REPO / "deploy" / "prometheus" / "alerts.yaml",):
        for rule in load_rules(path):
            for name in metric_names(rule["expr"]):
                used.setdefault(name, f"alert {rule['alert']}")
    assert len(used) >= 20
    missing = {n: where for n, where in used.items() if n not in exposed and not is_external(n)}
    assert not missing, f"used but exposed by neither the workers nor the exporter: {missing}"


def test_exporter_keeps_the_password_off_the_command_line(stack: Stack) -> None:
    exporter = stack.procs["exporter"]
    cmdline = Path(f"/proc/{exporter.proc.pid}/cmdline").read_bytes().decode()
    assert stack.redis_server.password and stack.redis_server.password not in cmdline
    assert "--queues=high_priority,low_priority,default" in cmdline
    healthcheck = subprocess.run(
        [str(REPO / "services" / "exporter" / "healthcheck")],
        env={**stack.env, "EXPORTER_PORT": str(stack.ports["exporter"])},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert healthcheck.returncode == 0, healthcheck.stderr
    assert stack.redis_server.password not in exporter.output


def test_redis_down_alert_fires_when_redis_stops(stack: Stack, workload: dict[str, Any]) -> None:
    """Last in this module: stops the stack's Redis."""
    prom = stack.prometheus
    assert prom is not None
    assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "WaardhavenRedisDown"]
    stack.redis_server.stop(signal.SIGKILL)
    wait_until(
        "WaardhavenRedisDown firing",
        lambda: [
            a
            for a in prom.alerts()
            if a["labels"]["alertname"] == "WaardhavenRedisDown" and a["state"] == "firing"
        ],
        20,
    )
    assert stack.prom_value("max by (namespace) (waardhaven_redis_up)") == 0
    # The probes still serve /metrics without Redis, and so do the workers.
    assert value_of(scrape(stack.probes_url()), "waardhaven_redis_up") == 0
    assert value_of(scrape(stack.metrics_url("worker-high")), "waardhaven_worker_processes") == 2
