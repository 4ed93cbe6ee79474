"""Run as a script by test_metrics_multiprocess.py (its own process: multiprocess mode changes
prometheus_client's global state). Plays a worker's main process whose pool recycled CHILDREN
children, each of which ran TASKS tasks, then prints what a scrape costs and returns, as JSON.

    python multiproc_probe.py CHILDREN TASKS
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    children, tasks_per_child = int(sys.argv[1]), int(sys.argv[2])
    os.environ["METRICS_PORT"] = str(free_port())
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from tasks.celery_app import app
    from tasks.metrics import families, server

    server.COMPACT_INTERVAL = 1e9  # no background folding: measure the unfolded directory
    server.on_worker_main_init(sender="probe@host", instance=None)
    server.state.queues = ["high_priority", "low_priority", "default"]  # every series
    app.loader.import_default_modules()  # the tasks, as the worker imports them
    server.preinitialise(app)
    path = server.state.path
    assert path is not None
    m = families.get()
    first_write: list[float] = []
    for i in range(children):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a pool child: inherits the metric objects, writes, exits
            os.close(r)
            started = time.perf_counter()
            m.tasks.labels("ping", "default", "succeeded").inc()
            elapsed = time.perf_counter() - started
            for _ in range(tasks_per_child - 1):
                m.tasks.labels("ping", "default", "succeeded").inc()
            for _ in range(tasks_per_child):
                m.runtime.labels("ping", "default").observe(0.003)
            m.last_success.labels("ping").set(1000.0 + i)
            m.rows.labels("prices").inc(2)
            os.write(w, f"{elapsed}".encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as pipe:
            first_write.append(float(pipe.read()))
        os.waitpid(pid, 0)

    from prometheus_client.multiprocess import MultiProcessCollector

    files_before = len(list(path.glob("*.db")))
    # Each time is the best of a few tries: the least the machine's other load added.
    raw_times = []
    for _ in range(3):
        started = time.perf_counter()
        raw = list(MultiProcessCollector(None, str(path)).collect())  # a scrape, unfolded
        raw_times.append(time.perf_counter() - started)
    raw_seconds = min(raw_times)

    started = time.perf_counter()
    server.FilesCollector().collect()  # first scrape: folds the dead children in
    first_scrape_seconds = time.perf_counter() - started
    scrape_times = []
    for _ in range(5):
        started = time.perf_counter()
        merged = list(server.FilesCollector().collect())
        scrape_times.append(time.perf_counter() - started)
    scrape_seconds = min(scrape_times)

    def values(families: list) -> dict:
        out = {}
        for family in families:
            for sample in family.samples:
                labels = sample.labels
                if labels.get("queue", "default") != "default":
                    continue
                if (
                    labels.get("task", "ping") == "ping"
                    and sample.name
                    in (
                        "waardhaven_tasks_total",
                        "waardhaven_task_runtime_seconds_count",
                        "waardhaven_task_runtime_seconds_sum",
                        "waardhaven_task_last_success_timestamp_seconds",
                        "waardhaven_rows_upserted_total",
                    )
                    and labels.get("state", "succeeded") == "succeeded"
                ):
                    out[sample.name] = sample.value
        return out

    print(
        json.dumps(
            {
                "files_before": files_before,
                "files_after": len(list(path.glob("*.db"))),
                "raw_seconds": raw_seconds,
                "first_scrape_seconds": first_scrape_seconds,
                "scrape_seconds": scrape_seconds,
                "raw": values(raw),
                "merged": values(merged),
                "child_first_write_median": statistics.median(first_write),
                "compacted": server.state.compacted,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
