"""The base class of every task and the worker's message guard.

Poison messages: `acks_late` + `task_reject_on_worker_lost` redeliver a task whose worker died.
A message that kills its worker every time would loop forever, and Redis keeps no delivery
count, so we keep one: deliveries of (task id, retry number) counted in Redis; past
MAX_DELIVERIES the task fails with PoisonMessage instead of running again.

Malformed messages: Celery builds each request in the worker's main process, and a body that
is not `[args, kwargs, embed]` (or a `task` header that is not a string) raises there and stops
the whole worker ("Unrecoverable error"); the message goes back to the queue and stops the next
worker too. `GuardedConsumer` (the app's `worker_consumer`) checks every task message first:
size, headers, content type and body shape; a bad one is logged with the reason, marked FAILURE
(InvalidMessage) for whoever waits on it, and rejected without requeue (gone from the queue).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

from tasks.compat import hook_allowed
from tasks.errors import InvalidMessage, PoisonMessage
from tasks.settings import get_settings

DELIVERY_KEY = "waardhaven:deliveries:{id}:{retries}"
# The largest task message a worker accepts. Ours are small (a refresh of 5,000 symbols is
# ~60 kB); a bigger one is a mistake or an attack that would cost every worker its memory.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

logger = get_logger(__name__)


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url)


class WaardhavenTask(Task):
    # Bad input must fail, never be retried; subclasses name their transient errors.
    autoretry_for: tuple[type[BaseException], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not request.called_directly and request.id and request.delivery_info:
            self._count_delivery(request.id, request.retries or 0)
        return super().__call__(*args, **kwargs)

    def _count_delivery(self, task_id: str, retries: int) -> None:
        settings = get_settings()
        key = DELIVERY_KEY.format(id=task_id, retries=retries)
        pipe = _redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, settings.visibility_timeout * (settings.max_deliveries + 1))
        deliveries = int(pipe.execute()[0])
        if deliveries > settings.max_deliveries:
            raise PoisonMessage(
                f"task {self.name}[{task_id}] delivered {deliveries} times (max "
                f"{settings.max_deliveries}); its worker died each time, so it is failed "
                "instead of run again"
            )


def message_problem(message: Any) -> str | None:
    """Why a task message must be refused, or None to let Celery handle it."""
    headers = message.headers
    if not isinstance(headers, dict):
        return None  # Celery reports it as an unknown message format
    size = len(message.body or b"")
    if size > MAX_MESSAGE_BYTES:
        return f"message body of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
    if "task" not in headers:
        return None  # protocol 1: Celery decodes and checks it itself
    if not isinstance(headers["task"], str) or not isinstance(headers.get("id"), str):
        return "headers 'task' and 'id' must be strings"
    try:
        payload = message.payload  # decoded once, cached for Celery
    except ContentDisallowed as exc:
        return f"content type {message.content_type!r} is not accepted: {exc}"
    except DecodeError as exc:
        return f"body does not decode as {message.content_type!r}: {exc}"
    if not (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict | None)
    ):
        return (
            "malformed body: expected [args (list), kwargs (object), embed (object)], got "
            + type(payload).__name__
            + (f" of {len(payload)}" if isinstance(payload, list | tuple) else "")
        )
    return None


class GuardedConsumer(Consumer):
    """Celery's consumer with `message_problem` checked before a message becomes a request.

    `create_task_handler` is undocumented: the check is installed only with the Celery version
    it was tested with (tasks.compat), else the worker logs that it runs without it."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        if not hook_allowed(
            "the task message check (GuardedConsumer)",
            "a malformed task message stops the worker as in stock Celery",
        ):
            return handle

        def on_task_received(message: Any) -> Any:
            problem = message_problem(message)
            if problem is None:
                return handle(message)
            return self.refuse(message, problem)

        return on_task_received

    def refuse(self, message: Any, problem: str) -> None:
        headers = message.headers
        name, task_id = headers.get("task"), headers.get("id")
        logger.error(
            "Refused task message %s[%s]: %s. The message is rejected and discarded.",
            name if isinstance(name, str) else repr(name)[:100],
            task_id if isinstance(task_id, str) else repr(task_id)[:100],
            problem,
        )
        message.reject_log_error(logger, self.connection_errors)
        if isinstance(task_id, str):
            self.app.backend.mark_as_failure(task_id, InvalidMessage(problem))
