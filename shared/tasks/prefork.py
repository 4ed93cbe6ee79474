"""Cheap prefork children: what runs when `worker_max_tasks_per_child` replaces one.

The worker replaces a pool child every WORKER_MAX_TASKS_PER_CHILD tasks (50), so that a leak in
a task, a library or a C extension cannot grow a pod's memory for ever. With Celery 5.7 and
billiard 4.3 as they come, one replacement cost a 2-core pod ~0.3 s, and the production
settings processed ~3x fewer no-op tasks per second than without recycling (bench/run.py,
docs/performance.md). Five causes, each fixed here in the worker's main process before the
pool forks (`prepare_parent`, on `worker_init`):

1. billiard's `set_pdeathsig` in every new child goes through cffi, whose first `FFI.cdef` in
   a process imports pycparser and builds its parser: 80-250 ms of CPU per child. Running the
   same code once in the main process (`get_pdeathsig`) leaves the parser built for every
   child to inherit: ~4 ms.
2. Celery runs `gc.collect()` in the main process before each fork; a full collection walks
   the ~110k objects our imports leave (~100 ms), during which the main process neither
   dispatches nor acknowledges. `gc.freeze()` moves them to the permanent generation, so the
   collection walks only what was allocated since (CPython's advice before fork; it also keeps
   the children's copy-on-write pages shared).
3. A child that has run its last task polls every 100 ms until the main process has read its
   last result: a pool slot idles ~100 ms per replacement. It polls every 2 ms here (the same
   30 s limit).
4. A race in Celery's pool: the main process learns that a child exited from a pipe that
   closes a moment before the child can be reaped; when it looks in that moment it finds no
   exited child, stops watching, and replaces the child only at its next 5-second check. A
   task handed to the exiting child waits for that: 3-5 s latency spikes after recycles at
   low load. `_reap_then_maintain` reaps the child first (it is exiting: microseconds).
5. The main process hands the next task to any idle child, also to one that has just run its
   last task and is leaving: that task waits until the child is gone and its replacement
   started (~50 ms, one task in 50 at low load: the p99 latency). `_keep_retiring_busy`
   leaves a child that has run its last task marked busy, so the task goes to another child.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

from celery import signals

EXIT_POLL_INTERVAL = 0.002  # seconds; billiard's default is 0.1
EXIT_POLL_LIMIT = 30.0  # seconds a recycled child waits for its last result to be read
REAP_WAIT = 0.1  # seconds the main process waits for an exiting child to become reapable


def warm_pdeathsig() -> None:
    """Build cffi's C parser in this process (see 1.), if billiard uses cffi at all."""
    from billiard import util

    # Not Linux, or no prctl: the children do not call set_pdeathsig either.
    with contextlib.suppress(OSError):
        util.get_pdeathsig()


def shorten_exit_poll() -> None:
    """A recycled child leaves within ~2 ms of its last result being read (see 3.)."""
    from billiard import pool

    if hasattr(pool, "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL"):
        pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL = EXIT_POLL_INTERVAL
        pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = int(EXIT_POLL_LIMIT / EXIT_POLL_INTERVAL)


def _reap_then_maintain(original: Any) -> Any:
    """Wraps AsynPool._event_process_exit (see 4.)."""

    def event_process_exit(self: Any, hub: Any, proc: Any) -> Any:
        popen = getattr(proc, "_popen", None)
        if popen is not None and getattr(popen, "returncode", 0) is None:
            deadline = time.monotonic() + REAP_WAIT
            while popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0002)
        return original(self, hub, proc)

    event_process_exit.waardhaven_patched = True  # type: ignore[attr-defined]
    return event_process_exit


def _keep_retiring_busy(original: Any) -> Any:
    """Wraps AsynPool.on_job_ready, which marks the child that sent a result idle (see 5.)."""

    def on_job_ready(self: Any, job: Any, i: Any, obj: Any, inqW_fd: int) -> Any:
        maxtasks = getattr(self, "_maxtasksperchild", None)
        if maxtasks:
            proc = getattr(self, "_fileno_to_inq", {}).get(inqW_fd)
            counter = getattr(self, "_on_ready_counters", {}).get(getattr(proc, "pid", None))
            # The counter is incremented after this call: +1 is the result being handled.
            if counter is not None and counter.value + 1 >= maxtasks:
                return None  # its last task: it stays busy until it is replaced
        return original(self, job, i, obj, inqW_fd)

    on_job_ready.waardhaven_patched = True  # type: ignore[attr-defined]
    return on_job_ready


def patch_pool() -> None:
    """Install 4. and 5. on Celery's prefork pool (once; skipped if Celery changed them)."""
    from celery.concurrency import asynpool

    pool = asynpool.AsynPool
    current = getattr(pool, "_event_process_exit", None)
    if current is not None and not getattr(current, "waardhaven_patched", False):
        pool._event_process_exit = _reap_then_maintain(current)
    current = getattr(pool, "on_job_ready", None)
    if current is not None and not getattr(current, "waardhaven_patched", False):
        pool.on_job_ready = _keep_retiring_busy(current)


def prepare_parent(**_: Any) -> None:
    """`worker_init` receiver: runs in the worker's main process, before the pool forks."""
    warm_pdeathsig()
    shorten_exit_poll()
    patch_pool()
    gc.collect()
    gc.freeze()  # see 2.


def install() -> None:
    signals.worker_init.connect(prepare_parent, weak=False, dispatch_uid="waardhaven-prefork")
