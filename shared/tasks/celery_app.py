"""The Celery app: `celery -A tasks.celery_app ...`.

Thin on purpose: configuration is built from `tasks.settings` in `build_config`, queues and
routes are declared once here, the tasks live in `tasks.background_tasks`.
"""

from __future__ import annotations

import enum
from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Queue as KombuQueue

from tasks import health, metrics, prefork, redis_conn, revokes, signing
from tasks.settings import Settings, get_settings, parse_crontab


class Queue(enum.StrEnum):
    HIGH = "high_priority"
    LOW = "low_priority"
    DEFAULT = "default"


# Every task by its short name, and the queue it runs on. A test walks this table. A new queue
# is a line here (a name as a plain string will do) and an entry in the chart's `workers` map
# (deploy/helm/waardhaven-tasks/values.yaml), which says which worker pool consumes it.
ROUTES: dict[str, str] = {
    "refresh_market_data": Queue.HIGH,
    "refresh_market_data_chunk": Queue.HIGH,
    "refresh_market_data_summary": Queue.HIGH,
    "compute_index": Queue.HIGH,
    "generate_report": Queue.LOW,
    "cleanup_old_data": Queue.LOW,
    "ping": Queue.DEFAULT,
}
# The queues the app declares, in ROUTES' order: those of ROUTES, then the default one.
QUEUES: list[str] = list(dict.fromkeys([*map(str, ROUTES.values()), str(Queue.DEFAULT)]))


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Crontab entries (UTC). `expires`: a run missed while beat was down is not piled up."""
    by_beat = {"requested_by": "beat"}  # task_runs.requested_by
    return {
        "refresh-market-data-daily": {
            "task": "refresh_market_data",
            "schedule": parse_crontab(settings.schedule_refresh_market_data),
            "kwargs": {"mode": "smart"},
            "options": {
                "queue": ROUTES["refresh_market_data"],
                "expires": 6 * 3600,
                "headers": by_beat,
            },
        },
        "compute-index-hourly": {
            "task": "compute_index",
            "schedule": parse_crontab(settings.schedule_compute_index),
            "options": {"queue": ROUTES["compute_index"], "expires": 50 * 60, "headers": by_beat},
        },
        "cleanup-old-data-weekly": {
            "task": "cleanup_old_data",
            "schedule": parse_crontab(settings.schedule_cleanup_old_data),
            "kwargs": {"days_to_keep": settings.retention_days},
            "options": {
                "queue": ROUTES["cleanup_old_data"],
                "expires": 12 * 3600,
                "headers": by_beat,
            },
        },
    }


def build_config(settings: Settings) -> dict[str, Any]:
    transport = {
        # Must exceed the hard time limit plus retry delays, or long tasks run twice.
        "visibility_timeout": settings.visibility_timeout,
        # kombu sweeps for messages past the visibility timeout every 10 s but scans only on
        # every 10th sweep by default: a dead worker's tasks would wait up to 100 s more.
        "unacked_restore_throttle": 1,
        "socket_keepalive": True,
        "health_check_interval": 25,
        **redis_conn.transport_options(settings),  # Sentinel: master name, Sentinel password
    }
    imports = ["tasks.background_tasks"]
    imports += [m.strip() for m in settings.waardhaven_extra_task_modules.split(",") if m.strip()]
    config: dict[str, Any] = {
        "broker_url": redis_conn.broker_url(settings),
        "result_backend": redis_conn.backend_url(settings),
        "imports": imports,
        # JSON only: pickle would let anyone who can write to Redis run code (CVE-2021-23727).
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "result_expires": settings.result_expires,
        "task_track_started": True,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        "worker_max_memory_per_child": settings.worker_max_memory_per_child or None,
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": settings.broker_pool_limit,
        "redis_max_connections": settings.broker_pool_limit,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        # acks_late + reject_on_worker_lost: a task whose worker dies is redelivered, not lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_disable_rate_limits": False,
        # A reconnect must not leave an acks_late task running while Redis redelivers it.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Soft shutdown (SIGTERM remapped to SIGQUIT by the run scripts): running tasks get
        # this long, then go back to the queue.
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_queues": [KombuQueue(q, routing_key=q) for q in QUEUES],
        "task_default_queue": str(Queue.DEFAULT),
        "task_default_routing_key": str(Queue.DEFAULT),
        "task_routes": {name: {"queue": str(q)} for name, q in ROUTES.items()},
        "beat_schedule": beat_schedule(settings),
        **redis_conn.redbeat_config(settings),
        "redbeat_key_prefix": "waardhaven:redbeat:",
        "redbeat_lock_timeout": settings.beat_lock_timeout,
        # Beat renews its lock every loop: the loop must be well inside the lock timeout.
        "beat_max_loop_interval": max(1, settings.beat_lock_timeout // 4),
        "worker_redirect_stdouts_level": "INFO",
        # Refuses oversized and malformed task messages instead of crashing on them.
        "worker_consumer": "tasks.base:GuardedConsumer",
        # kombu's Redis transport, dropping queue entries it cannot even parse (non-JSON...).
        **redis_conn.broker_transport(settings),
        # Debugging only: apply_async runs the task in the caller (see RefuseEagerMode).
        "task_always_eager": settings.task_always_eager,
    }
    config.update(signing.celery_config(settings))  # TASK_SIGNING: the `auth` serializer
    return config


class RefuseEagerMode(bootsteps.Step):
    """A worker started with TASK_ALWAYS_EAGER would run every task it sends (a chord's parts,
    a continuation) inside the task that sent it: it stops at start instead."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        if parent.app.conf.task_always_eager:
            raise SystemExit(
                "waardhaven-tasks: TASK_ALWAYS_EAGER=true runs tasks in the calling process, "
                "for local debugging without a worker; a worker refuses to start with it. "
                "Unset TASK_ALWAYS_EAGER for workers."
            )
        super().__init__(parent, **kwargs)


def drop_sender_time_limits(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """`before_task_publish` receiver: the time limits are the worker's own.

    Celery stamps the sender's configured limits (task_time_limit, task_soft_time_limit) into
    every message sent through a registered task (beat, the CLI, a chord), and a message's
    limits win over the worker's: a worker pool given longer limits would silently keep the
    sender's. A limit equal to the sender's default is cleared; one a caller chose is kept.
    """
    if not isinstance(headers, dict):
        return
    limits = headers.get("timelimit")
    if not isinstance(limits, list | tuple) or len(limits) != 2:
        return
    settings = get_settings()
    hard, soft = limits
    headers["timelimit"] = [
        None if hard == settings.task_time_limit else hard,
        None if soft == settings.task_soft_time_limit else soft,
    ]


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("waardhaven_tasks", task_cls="tasks.base:WaardhavenTask")
    celery.config_from_object(build_config(settings))
    signing.install(celery, settings)
    celery.steps["worker"].add(RefuseEagerMode)
    celery.steps["consumer"].add(health.WorkerHeartbeat)
    celery.steps["consumer"].add(revokes.LoadRevokes)  # revokes made before this worker started
    metrics.install(celery)
    signals.before_task_publish.connect(
        drop_sender_time_limits, weak=False, dispatch_uid="waardhaven-time-limits"
    )
    prefork.install()  # cheap child replacement (worker_max_tasks_per_child)
    return celery


app = create_app()
