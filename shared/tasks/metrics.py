"""Prometheus instrumentation of the workers (prometheus-client, multiprocess mode).

What is measured, and where (docs/operations.md lists every metric with its meaning):

- In the process that runs a task (a prefork child), from Celery's signals: outcomes per task,
  queue and state (``waardhaven_tasks_total``), failures per exception class, runtime and queue
  wait histograms, the domain figures the tasks report (`rows_upserted`, `index_assets`,
  `report_seconds`).
- In the worker's main process: what only it sees. Soft and hard time-limit hits and rejected
  messages (through `MetricsRequest`, Celery's documented per-task hook for the worker side of a
  request), revocations, and, at scrape time, tasks in progress, the queues it consumes, its
  pool size, Redis's health and memory, the age of the oldest message per queue, and beat's
  last and next run per schedule entry (RedBeat keeps them in Redis).

Prefork: the children's numbers go through prometheus_client's multiprocess files. The worker's
main process (only it: `celeryd_init`, and only when METRICS_PORT is not 0) binds the /metrics
port, empties the directory (PROMETHEUS_MULTIPROC_DIR, default ``$TMPDIR/waardhaven-metrics-
<port>``) and serves the merged files. A child replaced after `worker_max_tasks_per_child` tasks
leaves its files behind; read as they are, thousands of them make every scrape slow (DESIGN.md
section 7). `compact` folds the files of dead processes into one file per kind and removes them
(and the dead processes' live gauges, as `mark_process_dead` does): the directory holds
O(live processes) files whatever the number of recycled children. It runs every
COMPACT_INTERVAL seconds and before each scrape.

Cheap everywhere: importing this module imports neither prometheus_client nor Celery's worker
code; beat, Flower and the CLI only get a `before_task_publish` receiver that stamps the
message with its send time (the start of the queue wait). A prefork child starts with nothing
to do (no `worker_process_init` receiver): it inherits the metric objects, and the zero series
written at start sit in `*_preinit.db` files rather than in value objects every child would
re-open; its first write opens its own files (~3 ms once per child, measured).

Labels are bounded: task (registered task names, else "unknown"), queue (the app's declared
queues, else "unknown"), state (five values), exception (class names, at most MAX_LABEL_VALUES
per process, else "Other"), table/kind (names from the code, bounded the same way). No task id,
no argument, no host name: a pod's series are told apart only by the target labels Prometheus
adds, and every dashboard and alert aggregates them away.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from celery import signals

logger = logging.getLogger(__name__)

#: Message header holding the publish time (UNIX seconds), set by `before_task_publish`.
SENT_AT_HEADER = "sent_at"
STATES = ("succeeded", "failed", "retried", "rejected", "revoked")
UNKNOWN = "unknown"
OTHER = "Other"
MAX_LABEL_VALUES = 50
#: Seconds between two compactions of the multiprocess directory (also done at each scrape).
COMPACT_INTERVAL = 10.0
#: Seconds the Redis probes of one scrape may take, each.
REDIS_TIMEOUT = 1.0
MAX_SCHEDULE_ENTRIES = 100

# Runtime and wait: from a ping (ms) to the 30-minute hard time limit.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
REPORT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,99}$")


class _Metrics:
    """The metric objects; created once per process, lazily (prometheus_client imported here)."""

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


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()
_app: Any = None


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                if _server.path is None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                    # Set in the environment, but this process serves no /metrics: nobody would
                    # ever compact the files, so count in memory instead.
                    from prometheus_client import values

                    values.ValueClass = values.MutexValue
                _metrics = _Metrics(multiprocess=_server.path is not None)
    return _metrics


# --- the public hooks (called by the tasks) ---------------------------------------------------


def rows_upserted(table: str, n: int) -> None:
    """Count rows written by a bulk upsert."""
    if n > 0:
        m = _get()
        m.rows.labels(m.bounded("table", table)).inc(n)


def index_assets(n: int) -> None:
    """Record how many assets the last index computation used."""
    _get().index_assets.set(n)


def report_seconds(kind: str, seconds: float) -> None:
    """Record how long generating one report took."""
    m = _get()
    m.report_seconds.labels(m.bounded("kind", kind)).observe(max(0.0, seconds))


# --- labels -------------------------------------------------------------------------------------


def _known_queues() -> set[str]:
    if _app is None:
        return set()
    try:
        return {str(name) for name in _app.amqp.queues}
    except Exception:  # pragma: no cover - app not configured
        return set()


def _task_label(name: Any) -> str:
    if isinstance(name, str) and _app is not None and name in _app.tasks:
        return name
    return UNKNOWN


def _queue_label(delivery_info: Any) -> str:
    if isinstance(delivery_info, dict):
        for key in ("routing_key", "queue"):
            value = delivery_info.get(key)
            if isinstance(value, str) and value in _known_queues():
                return value
    return UNKNOWN


# The worker-side request being handled by MetricsRequest (main process), for the signal
# receivers that Celery calls there without a request context (hard time limit).
_current_request: contextvars.ContextVar[Any] = contextvars.ContextVar("request", default=None)


def _labels_of(task: Any) -> tuple[str, str]:
    request = _current_request.get()
    if request is not None:
        return _task_label(request.name), _queue_label(request.delivery_info)
    ctx = getattr(task, "request", None)
    return _task_label(getattr(task, "name", None)), _queue_label(
        getattr(ctx, "delivery_info", None)
    )


def _exception_name(exc: Any) -> str:
    inner = getattr(exc, "exc", None)  # billiard's ExceptionWithTraceback
    if isinstance(inner, BaseException):
        exc = inner
    return type(exc).__name__


# --- signal receivers ---------------------------------------------------------------------------


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the message with its publish time (beat, the CLI, workers publishing retries)."""
    if isinstance(headers, dict):
        headers[SENT_AT_HEADER] = time.time()


_started: dict[str, float] = {}


def _parse_eta(eta: Any) -> float | None:
    if isinstance(eta, dt.datetime):
        return eta.timestamp()
    if isinstance(eta, str):
        try:
            return dt.datetime.fromisoformat(eta).timestamp()
        except ValueError:
            return None
    return None


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    now = time.time()
    if task_id:
        _started[task_id] = time.monotonic()
    request = getattr(task, "request", None)
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if sent_at is None:
        sent_at = (getattr(request, "headers", None) or {}).get(SENT_AT_HEADER)
    if not isinstance(sent_at, int | float):
        return
    eta = _parse_eta(getattr(request, "eta", None))
    ready = max(float(sent_at), eta or 0.0)
    name, queue = _labels_of(task)
    _get().wait.labels(name, queue).observe(max(0.0, now - ready))


def _on_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    started = _started.pop(task_id, None) if task_id else None
    if started is not None:
        name, queue = _labels_of(task)
        _get().runtime.labels(name, queue).observe(time.monotonic() - started)


def _count(task: Any, state: str) -> tuple[str, str]:
    name, queue = _labels_of(task)
    _get().tasks.labels(name, queue, state).inc()
    return name, queue


def _on_success(sender: Any = None, **_: Any) -> None:
    name, _queue = _count(sender, "succeeded")
    _get().last_success.labels(name).set(time.time())


def _on_failure(sender: Any = None, exception: Any = None, **_: Any) -> None:
    request = _current_request.get()
    if request is not None:
        # Celery reports a hard time limit twice in the main process (on_timeout, then the
        # pool's error callback): count the request once.
        if getattr(request, "_metrics_failed", False):
            return
        request._metrics_failed = True
    name, queue = _count(sender, "failed")
    m = _get()
    m.failures.labels(name, queue, m.bounded("exception", _exception_name(exception))).inc()


def _on_retry(sender: Any = None, **_: Any) -> None:
    _count(sender, "retried")


def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    name = _task_label(getattr(request, "task", None) or getattr(sender, "name", None))
    queue = _queue_label(getattr(request, "delivery_info", None))
    _get().tasks.labels(name, queue, "revoked").inc()


def _on_rejected(message: Any = None, **_: Any) -> None:
    """The consumer refused a message (unknown type or task, undecodable): main process."""
    headers = getattr(message, "headers", None) or {}
    name = _task_label(headers.get("task") if isinstance(headers, dict) else None)
    queue = _queue_label(getattr(message, "delivery_info", None))
    _get().tasks.labels(name, queue, "rejected").inc()


def _on_unknown(message: Any = None, **_: Any) -> None:
    queue = _queue_label(getattr(message, "delivery_info", None))
    _get().tasks.labels(UNKNOWN, queue, "rejected").inc()


# --- the worker side of a request (main process) -----------------------------------------------


def _make_request_class() -> type:
    from celery.worker.request import Request

    class MetricsRequest(Request):
        """Counts time-limit hits and rejected messages where Celery handles them: the
        worker's main process (a hard limit kills the child, which then reports nothing)."""

        def on_timeout(self, soft: bool, timeout: float) -> None:
            name, queue = _task_label(self.name), _queue_label(self.delivery_info)
            _get().time_limits.labels(name, queue, "soft" if soft else "hard").inc()
            token = _current_request.set(self)
            try:
                super().on_timeout(soft, timeout)
            finally:
                _current_request.reset(token)

        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> Any:
            token = _current_request.set(self)
            try:
                return super().on_failure(exc_info, send_failed_event, return_ok)
            finally:
                _current_request.reset(token)

        def reject(self, requeue: bool = False) -> None:
            if not self.acknowledged:
                name, queue = _task_label(self.name), _queue_label(self.delivery_info)
                _get().tasks.labels(name, queue, "rejected").inc()
            super().reject(requeue=requeue)

    MetricsRequest.__module__ = __name__
    return MetricsRequest


_request_class: type | None = None


def __getattr__(name: str) -> Any:
    """`tasks.metrics:MetricsRequest` (a task's `Request`), built on first use: importing
    Celery's worker code costs the processes that never run a worker (beat, CLI) nothing."""
    global _request_class
    if name == "MetricsRequest":
        if _request_class is None:
            _request_class = _make_request_class()
        return _request_class
    raise AttributeError(name)


# --- the /metrics server and the multiprocess directory (worker main process) ------------------


class _Server:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.port = 0
        self.worker: Any = None
        self.queues: list[str] = []
        self.lock = threading.Lock()
        self.compacted = 0
        self.httpd: Any = None
        self.owns_path = False  # the default directory: removed at worker shutdown


_server = _Server()


def default_multiproc_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"waardhaven-metrics-{port}"


def _clean(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.suffix == ".db" or f.name.endswith(".db.tmp"):
            f.unlink(missing_ok=True)


def _on_worker_main_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """`celeryd_init`: the worker's main process, before its pool forks."""
    from tasks.settings import get_settings

    global _metrics
    settings = get_settings()
    port = settings.metrics_port
    _server.worker = instance
    if not port or _server.httpd is not None:
        return
    from prometheus_client import CollectorRegistry, start_http_server, values

    registry = CollectorRegistry(auto_describe=False)
    try:
        httpd, _thread = start_http_server(port, addr=settings.metrics_address, registry=registry)
    except OSError as exc:
        logger.warning("metrics: cannot listen on port %s (%s); /metrics is off", port, exc)
        return
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    path = Path(configured or default_multiproc_dir(port))
    _server.owns_path = not configured
    _clean(path)  # a restarted container finds its previous run's files in the emptyDir
    atexit.register(_remove_own_dir, os.getpid())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()
    with _metrics_lock:
        _server.path, _server.port, _server.httpd = path, port, httpd
        _metrics = None  # (re)created below in multiprocess mode
    _get()
    registry.register(_FilesCollector())
    registry.register(_LiveCollector())
    threading.Thread(target=_compact_loop, name="metrics-compact", daemon=True).start()
    logger.info("metrics: /metrics on port %s (multiprocess dir %s)", port, path)


def _remove_own_dir(main_pid: int) -> None:
    """At exit of the worker's main process: our default directory goes with the worker (a
    pod's emptyDir goes with the pod; a local run leaves nothing in /tmp)."""
    if os.getpid() == main_pid and _server.owns_path and _server.path is not None:
        shutil.rmtree(_server.path, ignore_errors=True)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """`worker_init`: tasks are imported and the queues known; the pool has not forked yet."""
    worker = sender if sender is not None else _server.worker
    _server.worker = worker
    app = getattr(worker, "app", None) or _app
    try:
        consume_from = app.amqp.queues.consume_from
        _server.queues = sorted(consume_from) if consume_from else sorted(app.amqp.queues)
    except Exception:  # pragma: no cover
        _server.queues = []
    # The worker side of every request counts time limits and rejects (unless a task brings
    # its own Request class, which then should derive from MetricsRequest).
    request_cls = __getattr__("MetricsRequest")
    from celery import Task

    for task in app.tasks.values():
        if task.Request == Task.Request:
            task.Request = request_cls
    _preinitialise(app)


PREINIT = "preinit"


def _preinitialise(app: Any) -> None:
    """Zero series before the pool forks: a counter that first appears at 1 is invisible to
    rate() and increase(), so a first failure or time-limit hit would never alert. Counters for
    every task on every queue this worker consumes (tasks x queues: bounded); histograms only
    for the queue each task is routed to (buckets multiply).

    The zeros are written straight into `<kind>_preinit.db`, not through labelled metric
    objects: every value object the main process holds is re-opened by each new pool child on
    its first write (prometheus_client resets them all after a fork), which cost a recycled
    child ~7 ms for ~450 series; this way a child pays only for the series it writes."""
    if _server.path is None:
        return
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.utils import floatToGoString

    m = _get()
    consumed = set(_server.queues)
    keys: dict[str, list[str]] = {"counter": [], "histogram": []}

    def counter(metric: Any, labels: list[str]) -> None:
        keys["counter"].append(
            mmap_key(metric._name, metric._name + "_total", metric._labelnames, labels,
                     metric._documentation)
        )  # fmt: skip

    def histogram(metric: Any, labels: list[str]) -> None:
        name, doc, names = metric._name, metric._documentation, list(metric._labelnames)
        for bound in metric._upper_bounds:
            keys["histogram"].append(
                mmap_key(name, name + "_bucket", [*names, "le"], [*labels, floatToGoString(bound)],
                         doc)
            )  # fmt: skip
        keys["histogram"].append(mmap_key(name, name + "_sum", names, labels, doc))

    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        for queue in sorted(consumed):
            for state in STATES:
                counter(m.tasks, [name, queue, state])
            for kind in ("soft", "hard"):
                counter(m.time_limits, [name, queue, kind])
        routed = _routed_queue(app, name)
        if routed in consumed:
            histogram(m.runtime, [name, str(routed)])
            histogram(m.wait, [name, str(routed)])
    for kind, names in keys.items():
        out = MmapedDict(str(_server.path / f"{kind}_{PREINIT}.db"))
        try:
            for key in names:
                out.write_value(key, 0.0, 0.0)
        finally:
            out.close()


def _routed_queue(app: Any, name: str) -> str | None:
    try:
        return str(app.amqp.router.route({}, name)["queue"].name)
    except Exception:
        return None


def _compact_loop() -> None:
    while True:
        time.sleep(COMPACT_INTERVAL)
        try:
            with _server.lock:
                if _server.path is not None:
                    _server.compacted += compact(_server.path)
        except Exception:  # never let bookkeeping kill the thread
            logger.exception("metrics: compaction failed")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MERGED = "merged"
# How the values of the dead processes' files combine, by file prefix. Live gauges (livesum...)
# of dead processes are dropped (`mark_process_dead`); "all" gauges are not used here.
_MERGE = {
    "counter": "sum",
    "histogram": "sum",
    "summary": "sum",
    "gauge_sum": "sum",
    "gauge_max": "max",
    "gauge_min": "min",
    "gauge_mostrecent": "mostrecent",
}


def _split(name: str) -> tuple[str, str] | None:
    if not name.endswith(".db") or "_" not in name:
        return None
    prefix, _, ident = name[:-3].rpartition("_")
    return prefix, ident


def compact(path: Path) -> int:
    """Fold the files of dead processes into `<prefix>_merged.db`; returns the number of dead
    processes folded. Callers hold `_server.lock` (collect must never see a dead process's
    counts both in its own file and in the merged one)."""
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import mark_process_dead

    dead: dict[str, list[Path]] = {}
    dead_pids: set[int] = set()
    alive: dict[int, bool] = {}
    for f in path.iterdir():
        parts = _split(f.name)
        if parts is None or not parts[1].isdigit():
            continue
        prefix, pid = parts[0], int(parts[1])
        if pid not in alive:
            alive[pid] = _pid_alive(pid)
        if alive[pid]:
            continue
        dead_pids.add(pid)
        if prefix in _MERGE:
            dead.setdefault(prefix, []).append(f)
    for prefix, files in dead.items():
        how = _MERGE[prefix]
        merged = path / f"{prefix}_{MERGED}.db"
        values: dict[str, tuple[float, float]] = {}
        sources = ([merged] if merged.exists() else []) + files
        for source in sources:
            for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(str(source)):
                old = values.get(key)
                if old is None:
                    values[key] = (value, timestamp)
                elif how == "sum":
                    values[key] = (old[0] + value, 0.0)
                elif how == "max":
                    values[key] = (max(old[0], value), 0.0)
                elif how == "min":
                    values[key] = (min(old[0], value), 0.0)
                elif timestamp > old[1]:  # mostrecent
                    values[key] = (value, timestamp)
        tmp = path / f"{prefix}_{MERGED}.db.tmp"
        tmp.unlink(missing_ok=True)
        out = MmapedDict(str(tmp))
        try:
            for key, (value, timestamp) in values.items():
                out.write_value(key, value, timestamp)
        finally:
            out.close()
        os.replace(tmp, merged)
        for f in files:
            f.unlink(missing_ok=True)
    for pid in dead_pids:
        mark_process_dead(pid, str(path))
        for f in path.glob(f"gauge_*_{pid}.db"):  # modes we do not merge ("all")
            f.unlink(missing_ok=True)
    return len(dead_pids)


class _FilesCollector:
    """The multiprocess files, compacted first."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        path = _server.path
        if path is None:
            return iter(())
        with _server.lock:
            _server.compacted += compact(path)
            files = [str(f) for f in path.glob("*.db")]
            metrics = list(MultiProcessCollector.merge(files, accumulate=True))
        return iter(metrics)


class _LiveCollector:
    """What the worker's main process knows at scrape time, and what Redis says."""

    def __init__(self) -> None:
        self._redis: Any = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        consuming = GaugeMetricFamily(
            "waardhaven_worker_consuming",
            "1 for each queue this worker consumes (sum by queue: workers per queue).",
            labels=["queue"],
        )
        for queue in _server.queues:
            consuming.add_metric([queue], 1)
        yield consuming
        processes = GaugeMetricFamily(
            "waardhaven_worker_processes", "Pool processes (children) of this worker."
        )
        processes.add_metric([], len(self._pool_pids()))
        yield processes
        yield self._in_progress(GaugeMetricFamily)
        path = _server.path
        files = GaugeMetricFamily(
            "waardhaven_metrics_files", "Files in this worker's multiprocess metrics directory."
        )
        files.add_metric([], len(list(path.glob("*.db"))) if path else 0)
        yield files
        compacted = CounterMetricFamily(
            "waardhaven_metrics_compacted_processes",
            "Dead pool processes whose metric files were folded into the merged files.",
        )
        compacted.add_metric([], _server.compacted)
        yield compacted
        yield from self._redis_metrics(GaugeMetricFamily)

    def _pool_pids(self) -> list[int]:
        try:
            return list(_server.worker.pool.info.get("processes", []))
        except Exception:
            return []

    def _in_progress(self, family: Any) -> Any:
        from celery.worker import state

        metric = family(
            "waardhaven_tasks_in_progress",
            "Tasks running in this worker's pool now.",
            labels=["task", "queue"],
        )
        counts: dict[tuple[str, str], int] = {}
        if _app is not None:
            for name in _app.tasks:
                queue = _routed_queue(_app, name)
                if not name.startswith("celery.") and queue in _server.queues:
                    counts[(name, str(queue))] = 0
        for _attempt in range(3):
            try:
                requests = list(state.active_requests)
                break
            except RuntimeError:  # changed during iteration (the event loop's thread)
                continue
        else:
            requests = []
        for request in requests:
            key = (_task_label(request.name), _queue_label(request.delivery_info))
            counts[key] = counts.get(key, 0) + 1
        for (name, queue), n in sorted(counts.items()):
            metric.add_metric([name, queue], n)
        return metric

    def _client(self) -> Any:
        if self._redis is None:
            from tasks import redis_conn
            from tasks.settings import get_settings

            self._redis = redis_conn.client(
                get_settings(),
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                health_check_interval=0,
            )
        return self._redis

    def _redis_metrics(self, family: Any) -> Iterable[Any]:
        up = family("waardhaven_redis_up", "1 when this worker reaches Redis (the broker).")
        try:
            client = self._client()
            client.ping()
        except Exception as exc:
            logger.debug("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        out = [up]
        try:
            info = client.info("memory")
            used = family("waardhaven_redis_memory_used_bytes", "Redis used_memory.")
            used.add_metric([], float(info.get("used_memory", 0)))
            limit = family(
                "waardhaven_redis_memory_max_bytes", "Redis maxmemory (0: no limit set)."
            )
            limit.add_metric([], float(info.get("maxmemory", 0)))
            out += [used, limit]
            out.append(self._oldest(client, family))
            out += self._beat(client, family)
        except Exception as exc:
            logger.warning("metrics: Redis probe failed: %s", exc)
        return out

    def _oldest(self, client: Any, family: Any) -> Any:
        metric = family(
            "waardhaven_queue_oldest_message_age_seconds",
            "Age of the oldest message waiting in a queue (0 when empty).",
            labels=["queue"],
        )
        now = time.time()
        for queue in sorted(_known_queues()):
            raw = client.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the oldest is last
            if raw is None:
                metric.add_metric([queue], 0.0)
                continue
            try:
                sent_at = json.loads(raw)["headers"][SENT_AT_HEADER]
                metric.add_metric([queue], max(0.0, now - float(sent_at)))
            except (ValueError, KeyError, TypeError):
                continue  # published without our header: unknown age
        return metric

    def _beat(self, client: Any, family: Any) -> list[Any]:
        conf = _app.conf if _app is not None else {}
        prefix = conf.get("redbeat_key_prefix") or "redbeat:"
        entries = client.zrange(prefix + ":schedule", 0, MAX_SCHEDULE_ENTRIES - 1, withscores=True)
        next_run = family(
            "waardhaven_beat_next_run_timestamp_seconds",
            "When beat will next send a schedule entry (RedBeat's due time, UNIX seconds).",
            labels=["schedule", "task"],
        )
        last_run = family(
            "waardhaven_beat_last_run_timestamp_seconds",
            "When beat last sent a schedule entry (or created it), UNIX seconds.",
            labels=["schedule", "task"],
        )
        if not entries:
            return [next_run, last_run]
        from redbeat.decoder import RedBeatJSONDecoder

        pipe = client.pipeline()
        for key, _score in entries:
            pipe.hmget(key, "definition", "meta")
        for (key, score), (definition, meta) in zip(entries, pipe.execute(), strict=True):
            name = key.decode() if isinstance(key, bytes) else str(key)
            name = name[len(prefix) :] if name.startswith(prefix) else name
            try:
                task = json.loads(definition or "{}").get("task") or UNKNOWN
                meta_d = json.loads(meta, cls=RedBeatJSONDecoder) if meta else {}
            except ValueError:
                continue
            if score >= 0:
                next_run.add_metric([name, str(task)], float(score))
            last = meta_d.get("last_run_at")
            if isinstance(last, dt.datetime):
                if last.tzinfo is None:
                    last = last.replace(tzinfo=dt.UTC)
                last_run.add_metric([name, str(task)], last.timestamp())
        return [next_run, last_run]


# --- install ------------------------------------------------------------------------------------

_RECEIVERS = (
    (signals.before_task_publish, _on_publish),
    (signals.celeryd_init, _on_worker_main_init),
    (signals.worker_init, _on_worker_init),
    (signals.task_prerun, _on_prerun),
    (signals.task_postrun, _on_postrun),
    (signals.task_success, _on_success),
    (signals.task_failure, _on_failure),
    (signals.task_retry, _on_retry),
    (signals.task_revoked, _on_revoked),
    (signals.task_rejected, _on_rejected),
    (signals.task_unknown, _on_unknown),
)


def install(app: Any) -> None:
    """Connect the Celery signals that feed the metrics. Cheap in every process: the /metrics
    server and the multiprocess directory appear only in a worker's main process."""
    global _app
    _app = app
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"waardhaven-metrics-{receiver.__name__}")
