"""The base class of every task and the worker's message guard.

Poison messages: `acks_late` + `task_reject_on_worker_lost` redeliver a task whose worker died.
A message that kills its worker every time would loop forever, and Redis keeps no delivery
count, so we keep one: deliveries of (task id, retry number, continuation) counted in Redis;
past MAX_DELIVERIES the task fails with PoisonMessage instead of running again. Only deaths
count: a task that a worker's soft shutdown puts back on the queue (SIGTERM, a rollout) gets
its delivery back (`excuse_requeued_deliveries`), so three rollouts in a row fail nothing.

Malformed messages: Celery builds each request in the worker's main process, and a body that
is not `[args, kwargs, embed]` (or a `task` header that is not a string) raises there and stops
the whole worker ("Unrecoverable error"); the message goes back to the queue and stops the next
worker too. `GuardedConsumer` (the app's `worker_consumer`) checks every task message first:
size, headers, content type and body shape; a bad one is logged with the reason, marked FAILURE
(InvalidMessage) for whoever waits on it, and rejected without requeue (gone from the queue).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Any

import psycopg2
import redis
from celery import Task, signals
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from tasks import redis_conn, store
from tasks.compat import hook_allowed
from tasks.db import new_session, session_scope
from tasks.errors import InvalidMessage, PoisonMessage
from tasks.market_data import TransientProviderError
from tasks.settings import get_settings

# (task id, retry number, continuation: Task.replace keeps the id and resets the retries)
DELIVERY_KEY = "waardhaven:deliveries:{id}:{retries}:{nesting}"
# The largest task message a worker accepts. Ours are small (a refresh of 5,000 symbols is
# ~60 kB); a bigger one is a mistake or an attack that would cost every worker its memory.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

logger = get_logger(__name__)


@functools.cache
def _redis() -> redis.Redis:
    return redis_conn.client(get_settings())


class WaardhavenTask(Task):
    # Bad input must fail, never be retried; subclasses name their transient errors.
    autoretry_for: tuple[type[BaseException], ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not (request.called_directly or request.is_eager) and request.id:
            nesting = request.get("replaced_task_nesting") or 0
            self._count_delivery(request.id, request.retries or 0, nesting)
        return super().__call__(*args, **kwargs)

    def _count_delivery(self, task_id: str, retries: int, nesting: int) -> None:
        settings = get_settings()
        key = DELIVERY_KEY.format(id=task_id, retries=retries, nesting=nesting)
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


# --- soft-shutdown requeues are not deaths ----------------------------------------------------

# Requests this worker's main process started, by id (pruned once acknowledged).
_started: dict[str, Any] = {}


@signals.task_received.connect
def _track_request(request: Any, **_: Any) -> None:
    for task_id, old in list(_started.items()):
        if old.acknowledged:
            del _started[task_id]
    _started[request.id] = request


@signals.worker_shutting_down.connect
def excuse_requeued_deliveries(**_: Any) -> None:
    """Give back the delivery of each task a shutdown puts back on the queue.

    Celery sends this signal in the main process once the soft shutdown has cancelled what was
    still running: those requests started and are not acknowledged (acks_late), so their
    messages return to the queue. Their worker did not die of them: not a poison delivery.
    """
    requeued = [r for r in _started.values() if r.time_start and not r.acknowledged]
    if not requeued:
        return
    try:
        # Its own client (not _redis()'s pool: this runs in a signal handler), built like every
        # other: with REDIS_SENTINELS, REDIS_URL is unset and names no server of ours.
        client = redis_conn.client(get_settings())
        pipe = client.pipeline()
        for r in requeued:
            info = r.request_dict
            key = DELIVERY_KEY.format(
                id=r.id,
                retries=info.get("retries") or 0,
                nesting=info.get("replaced_task_nesting") or 0,
            )
            pipe.decr(key)
        pipe.execute()
        client.close()
    except redis.RedisError as exc:
        logger.warning("deliveries of %d requeued tasks not given back: %s", len(requeued), exc)


# --- the database task --------------------------------------------------------------------

# Errors that go away by themselves: a provider timeout or 5xx, a dropped DB connection (as
# SQLAlchemy wraps it, or raw from psycopg2 where db.copy_upsert works on the DBAPI cursor).
TRANSIENT_ERRORS = (
    TransientProviderError,
    OperationalError,
    InterfaceError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
)


class DatabaseTask(WaardhavenTask):
    """A session per task (commit, rollback, close) and a row in `task_runs` for operators."""

    abstract = True
    audit_name: str | None = None  # the task_runs name, if not the task's (a run's summary)
    rows_written = 0  # reset per run in before_start
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_jitter = True

    def __init__(self) -> None:
        settings = get_settings()
        self.retry_backoff_max = settings.retry_backoff_max
        self.max_retries = settings.max_retries
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = new_session()
        return self._session

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.rows_written = 0
        request = self.request
        if request.retries or request.get("replaced_task_nesting"):
            self._audit(task_id, state="STARTED")  # the run's row keeps when it began
        else:
            self._audit(task_id, state="STARTED", started_at=dt.datetime.now(dt.UTC))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Released here, whatever the outcome: Celery calls after_return for neither RETRY nor
        # REJECTED, and a session left behind by a retried run (its connection dropped by a
        # PostgreSQL restart) would fail the next task in this process with
        # PendingRollbackError.
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._release_session()

    def _release_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        try:
            session.rollback()  # nothing uncommitted survives a task
            session.close()
        except SQLAlchemyError as exc:
            logger.warning("database session not closed cleanly: %s", exc)
            session.invalidate()

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self._release_session()
        error = None if status == "SUCCESS" else f"{type(retval).__name__}: {retval}"
        self._audit(
            task_id,
            state=status,
            finished_at=dt.datetime.now(dt.UTC),
            rows_written=getattr(self, "rows_written", 0),
            error=error,
        )

    def _audit(self, task_id: str, **values: Any) -> None:
        delivery = self.request.delivery_info or {}
        try:
            with session_scope() as session:
                store.record_task_run(
                    session,
                    {
                        "task_id": task_id,
                        "name": self.audit_name or self.name,
                        "queue": delivery.get("routing_key"),
                        # a message header: "api:<token>", "beat", "cli:<user>" (docs/api.md)
                        "requested_by": self.request.get("requested_by"),
                        **values,
                    },
                )
        except (OperationalError, InterfaceError) as exc:
            # The audit trail must never turn a good task into a failed one.
            logger.warning("task_runs not written for %s: %s", task_id, exc)


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
