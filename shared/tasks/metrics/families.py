"""The metric objects of a worker's processes, and the bounds on their labels.

Created once per process, on first use (prometheus_client is imported only then). In a worker
that serves /metrics (tasks.metrics.server) they write prometheus_client's multiprocess files;
anywhere else they count in memory.

Labels are bounded: task (registered task names, else "unknown"), queue (the app's declared
queues, else "unknown"), state (five values), exception (class names, at most MAX_LABEL_VALUES
per process, else "Other"), table/kind (names from the code, bounded the same way). No task id,
no argument, no host name: a pod's series are told apart only by the target labels Prometheus
adds, and every dashboard and alert aggregates them away.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

#: Message header holding the publish time (UNIX seconds), set by `before_task_publish`.
SENT_AT_HEADER = "sent_at"
STATES = ("succeeded", "failed", "retried", "rejected", "revoked")
UNKNOWN = "unknown"
OTHER = "Other"
MAX_LABEL_VALUES = 50

# Runtime and wait: from a ping (ms) to the 30-minute hard time limit.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
REPORT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")


class Families:
    """The metric objects of this process."""

    def __init__(self, multiprocess: bool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = multiprocess
        # Multiprocess values are read back from the files; a local registry keeps the metrics
        # of other processes (tests, the CLI) out of prometheus_client's global one (Flower's).
        registry = None if multiprocess else CollectorRegistry(auto_describe=False)
        self.registry = registry
        self.tasks = Counter(
            "waardhaven_tasks",
            "Tasks that ended, by task, queue and state "
            "(succeeded, failed, retried, rejected, revoked).",
            ["task", "queue", "state"],
            registry=registry,
        )
        self.failures = Counter(
            "waardhaven_task_failures",
            "Failed tasks by exception class.",
            ["task", "queue", "exception"],
            registry=registry,
        )
        self.runtime = Histogram(
            "waardhaven_task_runtime_seconds",
            "Time a task ran (task_prerun to task_postrun), whatever its outcome.",
            ["task", "queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.wait = Histogram(
            "waardhaven_task_queue_wait_seconds",
            "Time from publish (or ETA/countdown) to start of a task.",
            ["task", "queue"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_limits = Counter(
            "waardhaven_task_time_limit_hits",
            "Tasks that reached their soft or hard time limit (kind=soft|hard).",
            ["task", "queue", "kind"],
            registry=registry,
        )
        self.last_success = Gauge(
            "waardhaven_task_last_success_timestamp_seconds",
            "UNIX time of the last success of a task in this pod (since the pod started).",
            ["task"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.rows = Counter(
            "waardhaven_rows_upserted",
            "Rows written by bulk upserts, by table.",
            ["table"],
            registry=registry,
        )
        self.index_assets = Gauge(
            "waardhaven_index_assets",
            "Assets in the index at its last computation.",
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.report_seconds = Histogram(
            "waardhaven_report_generation_seconds",
            "Time to build one report, by kind.",
            ["kind"],
            buckets=REPORT_BUCKETS,
            registry=registry,
        )
        self._seen: dict[str, set[str]] = {}
        self._seen_lock = threading.Lock()

    def bounded(self, family: str, value: str, fallback: str = OTHER) -> str:
        """`value` if it is a plain name and the family has room for it, else `fallback`."""
        if not _NAME_RE.match(value):
            return fallback
        with self._seen_lock:
            seen = self._seen.setdefault(family, set())
            if value in seen:
                return value
            if len(seen) >= MAX_LABEL_VALUES:
                return fallback
            seen.add(value)
            return value


_families: Families | None = None
_lock = threading.Lock()
_multiprocess = False  # set by tasks.metrics.server in the process that serves /metrics
app: Any = None  # the Celery app whose tasks and queues are the label values (install())


def get() -> Families:
    global _families
    if _families is None:
        with _lock:
            if _families is None:
                if not _multiprocess and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                    # Set in the environment, but this process serves no /metrics: nobody would
                    # ever compact the files, so count in memory instead.
                    from prometheus_client import values

                    values.ValueClass = values.MutexValue
                _families = Families(multiprocess=_multiprocess)
    return _families


def use_multiprocess() -> Families:
    """The metric objects again, writing multiprocess files (the values class is set)."""
    global _families, _multiprocess
    with _lock:
        _multiprocess = True
        _families = None
    return get()


# --- labels -------------------------------------------------------------------------------------


def known_queues() -> set[str]:
    if app is None:
        return set()
    try:
        return {str(name) for name in app.amqp.queues}
    except Exception:  # pragma: no cover - app not configured
        return set()


def task_label(name: Any) -> str:
    if isinstance(name, str) and app is not None and name in app.tasks:
        return name
    return UNKNOWN


def queue_label(delivery_info: Any) -> str:
    if isinstance(delivery_info, dict):
        for key in ("routing_key", "queue"):
            value = delivery_info.get(key)
            if isinstance(value, str) and value in known_queues():
                return value
    return UNKNOWN


def routed_queue(celery_app: Any, name: str) -> str | None:
    try:
        return str(celery_app.amqp.router.route({}, name)["queue"].name)
    except Exception:
        return None
