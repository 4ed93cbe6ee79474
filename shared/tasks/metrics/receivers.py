"""The Celery signal receivers that feed the metrics.

In the process that runs a task (a prefork child): outcomes per task, queue and state,
failures per exception class, runtime and queue wait. In the worker's main process: revocations
and rejected messages (and, through tasks.metrics.request, time-limit hits). In every process
that publishes (beat, the CLI, workers sending retries): the send time stamped on the message,
the start of its queue wait.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import time
from typing import Any

from tasks.metrics.families import SENT_AT_HEADER, UNKNOWN, get, queue_label, task_label

# The worker-side request being handled by MetricsRequest (main process), for the signal
# receivers that Celery calls there without a request context (hard time limit).
current_request: contextvars.ContextVar[Any] = contextvars.ContextVar("request", default=None)


def _labels_of(task: Any) -> tuple[str, str]:
    request = current_request.get()
    if request is not None:
        return task_label(request.name), queue_label(request.delivery_info)
    ctx = getattr(task, "request", None)
    return task_label(getattr(task, "name", None)), queue_label(getattr(ctx, "delivery_info", None))


def _exception_name(exc: Any) -> str:
    inner = getattr(exc, "exc", None)  # billiard's ExceptionWithTraceback
    if isinstance(inner, BaseException):
        exc = inner
    return type(exc).__name__


def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
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


def on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
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
    get().wait.labels(name, queue).observe(max(0.0, now - ready))


def on_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    started = _started.pop(task_id, None) if task_id else None
    if started is not None:
        name, queue = _labels_of(task)
        get().runtime.labels(name, queue).observe(time.monotonic() - started)


def _count(task: Any, state: str) -> tuple[str, str]:
    name, queue = _labels_of(task)
    get().tasks.labels(name, queue, state).inc()
    return name, queue


def on_success(sender: Any = None, **_: Any) -> None:
    name, _queue = _count(sender, "succeeded")
    get().last_success.labels(name).set(time.time())


def on_failure(sender: Any = None, exception: Any = None, **_: Any) -> None:
    request = current_request.get()
    if request is not None:
        # Celery reports a hard time limit twice in the main process (on_timeout, then the
        # pool's error callback): count the request once.
        if getattr(request, "_metrics_failed", False):
            return
        request._metrics_failed = True
    name, queue = _count(sender, "failed")
    m = get()
    m.failures.labels(name, queue, m.bounded("exception", _exception_name(exception))).inc()


def on_retry(sender: Any = None, **_: Any) -> None:
    _count(sender, "retried")


def on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    name = task_label(getattr(request, "task", None) or getattr(sender, "name", None))
    queue = queue_label(getattr(request, "delivery_info", None))
    get().tasks.labels(name, queue, "revoked").inc()


def on_rejected(message: Any = None, **_: Any) -> None:
    """The consumer refused a message (unknown type or task, undecodable): main process."""
    headers = getattr(message, "headers", None) or {}
    name = task_label(headers.get("task") if isinstance(headers, dict) else None)
    queue = queue_label(getattr(message, "delivery_info", None))
    get().tasks.labels(name, queue, "rejected").inc()


def on_unknown(message: Any = None, **_: Any) -> None:
    queue = queue_label(getattr(message, "delivery_info", None))
    get().tasks.labels(UNKNOWN, queue, "rejected").inc()


def use_metrics_request(app: Any) -> None:
    """The worker side of every request counts time limits and rejects (unless a task brings
    its own Request class, which then should derive from MetricsRequest)."""
    from celery import Task

    from tasks.metrics.request import MetricsRequest

    for task in app.tasks.values():
        if task.Request == Task.Request:
            task.Request = MetricsRequest
