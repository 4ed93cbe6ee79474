"""A worker's /metrics: the server, the multiprocess directory, and what the main process knows.

Only the worker's main process serves (`celeryd_init`, and only when METRICS_PORT is not 0): it
binds the port, empties the directory (PROMETHEUS_MULTIPROC_DIR, default
``$TMPDIR/waardhaven-metrics-<port>``) and serves the pool children's files merged with
prometheus_client's own `MultiProcessCollector.merge`, plus the gauges only it knows (queues
consumed, pool size, tasks in progress). Cluster-wide figures (Redis, queue age, beat) are not
here: tasks.metrics.cluster serves them once, from the exporter's pod.

Why `compact` on top of prometheus_client's multiprocess mode (a measured reason): its collector
reads the files of every process that ever wrote, and `mark_process_dead` removes only live
gauges. With `worker_max_tasks_per_child` a pod leaves files for every recycled child, and
scrapes slow down as they pile up (seconds per scrape at thousands of files), measured in
docs/operations.md and checked by tests/observability/test_metrics_multiprocess.py. `compact`
folds the files of dead processes into one file per kind, every COMPACT_INTERVAL seconds and
before each scrape: O(live processes) files.

Zero series are written at start into `<kind>_preinit.db`: a counter that first appears at 1 is
invisible to rate() and increase(). They are written straight into the file rather than through
labelled metric objects, which every new pool child would re-open after the fork (a cost per
recycled child; the test above bounds a child's first write).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.metrics import families
from tasks.metrics.families import STATES, queue_label, routed_queue, task_label

logger = logging.getLogger(__name__)

#: Seconds between two compactions of the multiprocess directory (also done at each scrape).
COMPACT_INTERVAL = 10.0
PREINIT = "preinit"
MERGED = "merged"


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


state = _Server()


def default_multiproc_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"waardhaven-metrics-{port}"


def _clean(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.suffix == ".db" or f.name.endswith(".db.tmp"):
            f.unlink(missing_ok=True)


def on_worker_main_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """`celeryd_init`: the worker's main process, before its pool forks."""
    from tasks.settings import get_settings

    settings = get_settings()
    port = settings.metrics_port
    state.worker = instance
    if not port or state.httpd is not None:
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
    state.owns_path = not configured
    _clean(path)  # a restarted container finds its previous run's files in the emptyDir
    atexit.register(_remove_own_dir, os.getpid())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()
    state.path, state.port, state.httpd = path, port, httpd
    families.use_multiprocess()
    registry.register(FilesCollector())
    registry.register(WorkerCollector())
    threading.Thread(target=_compact_loop, name="metrics-compact", daemon=True).start()
    logger.info("metrics: /metrics on port %s (multiprocess dir %s)", port, path)


def _remove_own_dir(main_pid: int) -> None:
    """At exit of the worker's main process: our default directory goes with the worker (a
    pod's emptyDir goes with the pod; a local run leaves nothing in /tmp)."""
    if os.getpid() == main_pid and state.owns_path and state.path is not None:
        shutil.rmtree(state.path, ignore_errors=True)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """`worker_init`: tasks are imported and the queues known; the pool has not forked yet."""
    from tasks.metrics.receivers import use_metrics_request

    worker = sender if sender is not None else state.worker
    state.worker = worker
    app = getattr(worker, "app", None) or families.app
    try:
        consume_from = app.amqp.queues.consume_from
        state.queues = sorted(consume_from) if consume_from else sorted(app.amqp.queues)
    except Exception:  # pragma: no cover
        state.queues = []
    use_metrics_request(app)
    preinitialise(app)


def preinitialise(app: Any) -> None:
    """Zero series before the pool forks (see the module docstring): counters for every task
    on every queue this worker consumes (tasks x queues: bounded); histograms only for the
    queue each task is routed to (buckets multiply)."""
    if state.path is None:
        return
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.utils import floatToGoString

    m = families.get()
    consumed = set(state.queues)
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
            for outcome in STATES:
                counter(m.tasks, [name, queue, outcome])
            for kind in ("soft", "hard"):
                counter(m.time_limits, [name, queue, kind])
        routed = routed_queue(app, name)
        if routed in consumed:
            histogram(m.runtime, [name, str(routed)])
            histogram(m.wait, [name, str(routed)])
    for kind, names in keys.items():
        out = MmapedDict(str(state.path / f"{kind}_{PREINIT}.db"))
        try:
            for key in names:
                out.write_value(key, 0.0, 0.0)
        finally:
            out.close()


def _compact_loop() -> None:
    while True:
        time.sleep(COMPACT_INTERVAL)
        try:
            with state.lock:
                if state.path is not None:
                    state.compacted += compact(state.path)
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
    processes folded. Callers hold `state.lock` (collect must never see a dead process's
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


class FilesCollector:
    """The multiprocess files, compacted first."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        path = state.path
        if path is None:
            return iter(())
        with state.lock:
            state.compacted += compact(path)
            files = [str(f) for f in path.glob("*.db")]
            metrics = list(MultiProcessCollector.merge(files, accumulate=True))
        return iter(metrics)


class WorkerCollector:
    """What the worker's main process knows at scrape time (no network: cheap)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        consuming = GaugeMetricFamily(
            "waardhaven_worker_consuming",
            "1 for each queue this worker consumes (sum by queue: workers per queue).",
            labels=["queue"],
        )
        for queue in state.queues:
            consuming.add_metric([queue], 1)
        yield consuming
        processes = GaugeMetricFamily(
            "waardhaven_worker_processes", "Pool processes (children) of this worker."
        )
        processes.add_metric([], len(self._pool_pids()))
        yield processes
        yield self._in_progress(GaugeMetricFamily)
        path = state.path
        files = GaugeMetricFamily(
            "waardhaven_metrics_files", "Files in this worker's multiprocess metrics directory."
        )
        files.add_metric([], len(list(path.glob("*.db"))) if path else 0)
        yield files
        compacted = CounterMetricFamily(
            "waardhaven_metrics_compacted_processes",
            "Dead pool processes whose metric files were folded into the merged files.",
        )
        compacted.add_metric([], state.compacted)
        yield compacted

    def _pool_pids(self) -> list[int]:
        try:
            return list(state.worker.pool.info.get("processes", []))
        except Exception:
            return []

    def _in_progress(self, family: Any) -> Any:
        from celery.worker import state as worker_state

        metric = family(
            "waardhaven_tasks_in_progress",
            "Tasks running in this worker's pool now.",
            labels=["task", "queue"],
        )
        counts: dict[tuple[str, str], int] = {}
        app = families.app
        if app is not None:
            for name in app.tasks:
                queue = routed_queue(app, name)
                if not name.startswith("celery.") and queue in state.queues:
                    counts[(name, str(queue))] = 0
        for _attempt in range(3):
            try:
                requests = list(worker_state.active_requests)
                break
            except RuntimeError:  # changed during iteration (the event loop's thread)
                continue
        else:
            requests = []
        for request in requests:
            key = (task_label(request.name), queue_label(request.delivery_info))
            counts[key] = counts.get(key, 0) + 1
        for (name, queue), n in sorted(counts.items()):
            metric.add_metric([name, queue], n)
        return metric
