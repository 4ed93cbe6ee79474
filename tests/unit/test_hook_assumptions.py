"""What our hooks on Celery and billiard internals assume, checked against the installed
libraries (no server: the in-memory broker, a real billiard pool of one child).

tasks.prefork patches AsynPool._event_process_exit and on_job_ready and a billiard constant;
GuardedConsumer wraps Consumer.create_task_handler. They are installed only with the versions
in tasks.compat.TESTED; these tests say whether those versions still behave as assumed."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import billiard
import pytest
from billiard import pool as billiard_pool
from celery import signals
from celery.concurrency.asynpool import AsynPool
from celery.worker.consumer import Consumer

from tasks import compat, prefork
from tasks.celery_app import app, drop_sender_time_limits
from tasks.settings import get_settings

REPO = Path(__file__).resolve().parents[2]


def test_tested_versions_are_the_locked_and_installed_ones() -> None:
    locked = dict(
        line.split("==", 1)
        for line in (REPO / "requirements" / "base.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name, version in compat.TESTED.items():
        assert locked[name].strip() == version, f"{name}: lock {locked[name]}, TESTED {version}"
    assert compat.untested() == {}


def test_hook_signatures() -> None:
    def params(func: Any) -> list[str]:
        return list(inspect.signature(func).parameters)

    assert params(AsynPool._event_process_exit) == ["self", "hub", "proc"]
    assert params(AsynPool.on_job_ready) == ["self", "job", "i", "obj", "inqW_fd"]
    assert params(Consumer.create_task_handler) == ["self", "promise"]
    # 3.: the constants billiard's exiting child polls with, read at call time.
    source = inspect.getsource(billiard_pool.Worker._ensure_messages_consumed)
    assert "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL" in source
    assert "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT" in source


def test_on_job_ready_runs_before_the_child_task_is_counted() -> None:
    """_keep_retiring_busy reads the child's counter in on_job_ready and adds 1 for the result
    being handled: billiard must call it before it increments the counter."""
    counter = billiard.Value("i")
    seen: list[int] = []
    handler = billiard_pool.ResultHandler(
        outqueue=None,
        get=None,
        cache={},
        poll=None,
        join_exited_workers=None,
        putlock=None,
        restart_state=billiard_pool.restart_state(10, 1),
        check_timeouts=None,
        on_job_ready=lambda job, i, obj, fd: seen.append(counter.value),
        on_ready_counters={4242: counter},
    )
    on_ack = handler.state_handlers[billiard_pool.ACK]
    on_ready = handler.state_handlers[billiard_pool.READY]
    for job in range(3):
        on_ack(job, 0, 0.0, 4242, None)
        on_ready(job, 0, (True, None), 7)
    assert seen == [0, 1, 2]  # the value before each increment
    assert counter.value == 3


def test_pool_keeps_what_the_patches_read() -> None:
    """A real AsynPool of one child: the inqW fd maps to the process, its pid to the counter
    of tasks it ran, and the process has a Popen to poll (4. and 5.)."""
    pool = AsynPool(processes=1, maxtasksperchild=7, threads=False)
    try:
        assert pool._maxtasksperchild == 7
        (child,) = pool._pool
        pool.on_process_alive(child.pid)  # what the event loop does on the child's WORKER_UP
        ((fd, proc),) = pool._fileno_to_inq.items()
        assert fd == proc.inqW_fd
        assert proc.pid in pool._on_ready_counters
        assert pool._on_ready_counters[proc.pid].value == 0
        assert proc._popen.poll() is None and proc._popen.returncode is None
    finally:
        pool.terminate()


def test_patches_install_with_the_tested_versions_only() -> None:
    """In a fresh interpreter: with another billiard the pool is left as it comes and the log
    says so; with the tested versions it is patched."""
    code = """
import json, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
from celery.concurrency.asynpool import AsynPool
from billiard import pool
from tasks import compat, prefork
def state():
    return {
        "exit": getattr(AsynPool._event_process_exit, "waardhaven_patched", False),
        "ready": getattr(AsynPool.on_job_ready, "waardhaven_patched", False),
        "poll": pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL,
    }
tested = compat.TESTED
compat.TESTED = {**tested, "billiard": "0.0.1"}
prefork.patch_pool()
other = state()
print("--- tested ---", file=sys.stderr)
compat.TESTED = tested
compat.hook_allowed.cache_clear()
prefork.patch_pool()
print(json.dumps({"other": other, "tested": state()}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log_other, _, log_tested = done.stderr.partition("--- tested ---")
    assert result["other"] == {"exit": False, "ready": False, "poll": 0.1}
    assert "not installing the prefork pool patches" in log_other
    assert "billiard 0.0.1" in log_other
    assert result["tested"] == {"exit": True, "ready": True, "poll": prefork.EXIT_POLL_INTERVAL}
    assert "not installing" not in log_tested


def test_consumer_check_needs_the_tested_celery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tested Celery the consumer's task handler is Celery's own, unwrapped."""
    from tasks.base import GuardedConsumer

    def handler(self: Any, promise: Any = None) -> Any:
        return "celery's handler"

    monkeypatch.setattr(Consumer, "create_task_handler", handler)
    consumer = GuardedConsumer.__new__(GuardedConsumer)
    compat.hook_allowed.cache_clear()
    try:
        assert callable(consumer.create_task_handler())  # tested versions: wrapped
        monkeypatch.setattr(compat, "TESTED", {**compat.TESTED, "celery": "9.9.9"})
        compat.hook_allowed.cache_clear()
        assert consumer.create_task_handler() == "celery's handler"
    finally:
        compat.hook_allowed.cache_clear()


def _published_timelimit(**options: Any) -> Any:
    app.loader.import_default_modules()  # as in beat and the CLI: the tasks are registered
    app.finalize()
    with app.connection_for_write("memory://") as conn:
        queue = conn.SimpleQueue("default")
        app.send_task("ping", connection=conn, queue="default", **options)
        message = queue.get_nowait()  # in memory: there at once
        message.ack()
        queue.close()
        return message.headers["timelimit"]


def test_messages_carry_no_sender_time_limits() -> None:
    """Celery stamps the sender's configured limits into a message sent by task name (so the
    receiver has work to do); drop_sender_time_limits clears them and keeps chosen ones."""
    settings = get_settings()
    signals.before_task_publish.disconnect(dispatch_uid="waardhaven-time-limits")
    try:
        stamped = _published_timelimit()
    finally:
        signals.before_task_publish.connect(
            drop_sender_time_limits, weak=False, dispatch_uid="waardhaven-time-limits"
        )
    assert stamped == [settings.task_time_limit, settings.task_soft_time_limit]
    assert _published_timelimit() == [None, None]
    assert _published_timelimit(time_limit=30) == [30, None]
    assert _published_timelimit(soft_time_limit=5, time_limit=9) == [9, 5]


# --- private names used outside tasks.compat's guard ------------------------------------------
# Each is used in one place; an upgrade that renames it fails here, in seconds, and not in a pod.


def test_the_api_can_turn_off_result_subscriptions() -> None:
    """tasks.api.app sets celery._state's task-join flag so send_task does not subscribe the
    API to every task's result channel (they would pile up in a long-lived process)."""
    from celery import _state

    before = _state.task_join_will_block()
    try:
        _state._set_task_join_will_block(True)
        assert _state.task_join_will_block() is True
    finally:
        _state._set_task_join_will_block(before)


def test_requests_say_whether_they_started_and_were_acknowledged() -> None:
    """tasks.base.excuse_requeued_deliveries tells a requeued task from a finished one by
    Request.time_start (set when a child accepts it) and Request.acknowledged."""
    from celery.worker.request import Request

    assert Request.time_start is None and Request.acknowledged is False  # class defaults
    source = inspect.getsource(Request.on_accepted)
    assert "self.time_start =" in source
    assert "self.acknowledged = True" in inspect.getsource(Request.acknowledge)


def test_prometheus_client_internals_the_preinitialised_series_use() -> None:
    """tasks.metrics.server.preinitialise writes zero series straight into a multiprocess file:
    prometheus_client's MmapedDict and mmap_key, and the metric attributes that name a series."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    registry = CollectorRegistry()
    counter = Counter("probe", "doc", ["a"], registry=registry)
    histogram = Histogram("probe_h", "doc", ["a"], buckets=(1.0,), registry=registry)
    assert (counter._name, list(counter._labelnames), counter._documentation) == (
        "probe",
        ["a"],
        "doc",
    )
    assert list(histogram._upper_bounds) == [1.0, float("inf")]
    assert list(inspect.signature(mmap_key).parameters) == [
        "metric_name",
        "name",
        "labelnames",
        "labelvalues",
        "help_text",
    ]
    params = list(inspect.signature(MmapedDict.write_value).parameters)
    assert params == ["self", "key", "value", "timestamp"]
    assert {"close", "read_all_values"} <= set(dir(MmapedDict))
