"""Cheap prefork children: what runs when `worker_max_tasks_per_child` replaces one.

The worker replaces a pool child every WORKER_MAX_TASKS_PER_CHILD tasks (50) to bound leaks.
With Celery and billiard as they come a replacement is slow (docs/performance.md, section 1,
has the figures). `prepare_parent` (on `worker_init`, in the main process before the pool
forks) removes five costs:

1. billiard's `set_pdeathsig` in each child builds cffi's C parser: built once here instead
   (`get_pdeathsig`), every child inherits it. Public API.
2. Celery's `gc.collect()` before each fork walks every object our imports left:
   `gc.freeze()` moves them out of its way (CPython's advice before fork). Public API.
3. A child that ran its last task polls 100 ms at a time until its last result was read:
   2 ms here. A billiard module constant.
4. The main process may look for an exited child a moment before it can be reaped, then
   replaces it only at its next 5 s check: `_reap_then_maintain` reaps it first. Private
   (`AsynPool._event_process_exit`).
5. A task handed to a child that just ran its last task waits for its replacement:
   `_keep_retiring_busy` keeps such a child marked busy. Private (`AsynPool.on_job_ready`),
   and it relies on billiard calling on_job_ready before it counts the child's task.

3 to 5 touch private code: they are installed only with the Celery and billiard versions in
`tasks.compat.TESTED` (else the worker logs that it runs without them, and recycles the slow
way); tests/unit/test_hook_assumptions.py checks what they assume.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

from celery import signals

from tasks.compat import hook_allowed

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
    """Install 3. to 5. (once), with the tested Celery and billiard only."""
    from celery.concurrency import asynpool

    if not hook_allowed("the prefork pool patches", "recycled children are replaced slower"):
        return
    shorten_exit_poll()

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
    patch_pool()
    gc.collect()
    gc.freeze()  # see 2.


def install() -> None:
    signals.worker_init.connect(prepare_parent, weak=False, dispatch_uid="waardhaven-prefork")
