"""The worker side of a request: time-limit hits and rejected messages, counted where Celery
handles them, in the worker's main process (a hard limit kills the child, which then reports
nothing). A Request subclass is Celery's documented per-task hook (`Task.Request`). Imported
only by a worker (celery.worker.request is not cheap)."""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from tasks.metrics.families import get, queue_label, task_label
from tasks.metrics.receivers import current_request


class MetricsRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> None:
        name, queue = task_label(self.name), queue_label(self.delivery_info)
        get().time_limits.labels(name, queue, "soft" if soft else "hard").inc()
        token = current_request.set(self)
        try:
            super().on_timeout(soft, timeout)
        finally:
            current_request.reset(token)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        token = current_request.set(self)
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            current_request.reset(token)

    def reject(self, requeue: bool = False) -> None:
        if not self.acknowledged:
            name, queue = task_label(self.name), queue_label(self.delivery_info)
            get().tasks.labels(name, queue, "rejected").inc()
        super().reject(requeue=requeue)
