"""Imported by the benchmark's workers (WAARDHAVEN_EXTRA_TASK_MODULES=bench.worker_probe).

It changes nothing unless the benchmark asks, through environment variables:

- BENCH_ACKS_LATE=0, BENCH_TRACK_STARTED=0, BENCH_EVENTS=0: the ablations of settings that
  have no environment variable of their own (they are fixed in tasks.celery_app).
- BENCH_STOCK_CHILD_START=1: undo tasks.prefork (a child starts as with stock Celery).
- BENCH_POOL_PATCHES=0: keep tasks.prefork's public-API parts (1, 2), not its private pool
  patches (3 to 5): what the worker runs with an untested Celery or billiard.
- BENCH_PROBE_FILE=path: one line per child life (fork, ready, exit times) and, with
  BENCH_TASK_TIMES=1, one line per task (wall and CPU seconds, resident memory), as JSON.

The worker's main process imports this module before it reads its configuration and before
the pool forks, so the changes hold in every child.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

from celery import signals

from tasks import prefork
from tasks.celery_app import app

PROBE_FILE = os.environ.get("BENCH_PROBE_FILE", "")
TASK_TIMES = os.environ.get("BENCH_TASK_TIMES") == "1"


def _off(name: str) -> bool:
    return os.environ.get(name) == "0"


if _off("BENCH_EVENTS"):
    app.conf.worker_send_task_events = False
if _off("BENCH_ACKS_LATE"):
    app.conf.task_acks_late = False
    for _task in app.tasks.values():
        _task.acks_late = False
if _off("BENCH_TRACK_STARTED"):
    app.conf.task_track_started = False
    for _task in app.tasks.values():
        _task.track_started = False
if os.environ.get("BENCH_STOCK_CHILD_START") == "1":
    signals.worker_init.disconnect(prefork.prepare_parent, dispatch_uid="waardhaven-prefork")
if _off("BENCH_POOL_PATCHES"):
    prefork.patch_pool = lambda: None  # type: ignore[assignment]


def _write(record: dict[str, Any]) -> None:
    if PROBE_FILE:
        with open(PROBE_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


_life: dict[str, float] = {}
_task_start: dict[str, tuple[float, float]] = {}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _forked() -> None:
    _life.clear()
    _life["fork"] = time.time()
    _life["tasks"] = 0


if PROBE_FILE:
    os.register_at_fork(after_in_child=_forked)

    @signals.worker_process_init.connect(weak=False)
    def _child_ready(**_: Any) -> None:
        _life["ready"] = time.time()

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_exit(**_: Any) -> None:
        if "fork" in _life:
            _write({"kind": "child", "pid": os.getpid(), "exit": time.time(), **_life})

    @signals.task_prerun.connect(weak=False)
    def _prerun(task_id: str | None = None, **_: Any) -> None:
        now = time.time()
        _life["tasks"] = _life.get("tasks", 0) + 1
        _life.setdefault("first_task", now)
        if TASK_TIMES and task_id:
            _task_start[task_id] = (time.perf_counter(), time.process_time())

    @signals.task_postrun.connect(weak=False)
    def _postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        _life["last_task_end"] = time.time()
        if not (TASK_TIMES and task_id and task_id in _task_start):
            return
        wall0, cpu0 = _task_start.pop(task_id)
        _write(
            {
                "kind": "task",
                "name": getattr(task, "name", "?"),
                "pid": os.getpid(),
                "wall": time.perf_counter() - wall0,
                "cpu": time.process_time() - cpu0,
                "rss_mib": round(_rss_mib(), 1),
                "end": time.time(),
            }
        )
