"""Prometheus metrics of waardhaven-tasks (docs/operations.md lists each one with its meaning).

One module per job:

- `families`: the metric objects and the bounds on their labels;
- `receivers`: the Celery signal receivers that count (in the pool child that runs a task, in
  the worker's main process, and in every process that publishes);
- `request`: `MetricsRequest`, the worker side of a request (time limits, rejects);
- `server`: a worker's /metrics, its multiprocess directory and its own gauges;
- `cluster`: Redis, queue age and beat, probed once for the whole cluster (exporter pod).

Cheap everywhere: importing this package imports neither prometheus_client nor Celery's worker
code; beat, Flower and the CLI only stamp each message with its send time. A prefork child
starts with nothing to do (no `worker_process_init` receiver): it inherits the metric objects.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from tasks.metrics import families, receivers, server


def rows_upserted(table: str, n: int) -> None:
    """Count rows written by a bulk upsert."""
    if n > 0:
        m = families.get()
        m.rows.labels(m.bounded("table", table)).inc(n)


def index_assets(n: int) -> None:
    """Record how many assets the last index computation used."""
    families.get().index_assets.set(n)


def report_seconds(kind: str, seconds: float) -> None:
    """Record how long generating one report took."""
    m = families.get()
    m.report_seconds.labels(m.bounded("kind", kind)).observe(max(0.0, seconds))


_RECEIVERS = (
    (signals.before_task_publish, receivers.on_publish),
    (signals.celeryd_init, server.on_worker_main_init),
    (signals.worker_init, server.on_worker_init),
    (signals.task_prerun, receivers.on_prerun),
    (signals.task_postrun, receivers.on_postrun),
    (signals.task_success, receivers.on_success),
    (signals.task_failure, receivers.on_failure),
    (signals.task_retry, receivers.on_retry),
    (signals.task_revoked, receivers.on_revoked),
    (signals.task_rejected, receivers.on_rejected),
    (signals.task_unknown, receivers.on_unknown),
)


def install(app: Any) -> None:
    """Connect the Celery signals that feed the metrics. Cheap in every process: the /metrics
    server and the multiprocess directory appear only in a worker's main process."""
    families.app = app
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"waardhaven-metrics-{receiver.__name__}")
