"""Every setting of waardhaven-tasks, typed, read from environment variables.

One place for configuration: the Celery app, the services, the CLI and the chart all use these
names. A bad value stops the process at start with a message naming the variable
(``load_settings`` turns pydantic's error into ``SettingsError``).
"""

from __future__ import annotations

import functools
from typing import Literal

from celery.schedules import crontab
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def parse_crontab(expr: str) -> crontab:
    """'minute hour day-of-month month day-of-week' (UTC) -> celery crontab; ValueError if bad."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"crontab needs 5 fields (minute hour dom month dow), got {expr!r}")
    minute, hour, dom, month, dow = fields
    try:
        return crontab(minute, hour, dow, dom, month)
    except Exception as exc:
        raise ValueError(f"bad crontab {expr!r}: {exc}") from None


class SettingsError(SystemExit):
    """Raised at start-up when an environment variable holds a bad value."""


class Settings(BaseSettings):
    """Environment variables (names are the field names in upper case)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- connections -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Broker URL (redis:// or rediss://, password in the URL).",
    )
    result_backend_url: str | None = Field(
        None, description="Result backend URL; defaults to REDIS_URL."
    )
    redis_sentinels: str = Field(
        "", description="Sentinels, host:port,host:port; set, Redis is found through them."
    )
    redis_sentinel_master: str = Field(
        "mymaster", description="Name of the master the Sentinels watch (Sentinel mode)."
    )
    redis_password: str | None = Field(
        None, description="Password of the Redis servers (Sentinel mode; else in REDIS_URL)."
    )
    redis_sentinel_password: str | None = Field(
        None, description="Password of the Sentinels (Sentinel mode, required there)."
    )
    database_url: str = Field(
        "sqlite:///var/waardhaven.db",
        description="SQLAlchemy URL: postgresql+psycopg2://... in production, SQLite locally.",
    )
    database_pool_size: int = Field(5, ge=1, le=100, description="SQLAlchemy pool size.")
    database_reconnect_wait: float = Field(
        30.0, ge=0, description="Seconds a new connection waits for PostgreSQL to come back."
    )

    # --- Celery (DESIGN.md section 3; the seed's values are the floor) ------------------------
    task_soft_time_limit: int = Field(1500, ge=1, description="Soft time limit, seconds.")
    task_time_limit: int = Field(1800, ge=1, description="Hard time limit, seconds.")
    result_expires: int = Field(3600, ge=60, description="Seconds a task result is kept.")
    visibility_timeout: int = Field(
        7200, ge=1, description="Seconds before an unacknowledged message is redelivered."
    )
    worker_prefetch_multiplier: int = Field(
        1, ge=1, le=64, description="Messages a worker process reserves ahead (1: fair dispatch)."
    )
    worker_max_tasks_per_child: int = Field(50, ge=0, description="0 disables recycling.")
    worker_max_memory_per_child: int = Field(
        0, ge=0, description="KiB of resident memory before a child is replaced; 0 = off."
    )
    worker_soft_shutdown_timeout: float = Field(
        60.0, ge=0, description="Seconds running tasks get on SIGTERM before they are requeued."
    )
    broker_pool_limit: int = Field(10, ge=1, description="Broker and result-backend connections.")
    max_deliveries: int = Field(
        3, ge=1, description="Deliveries of one message before it is failed as poison."
    )
    retry_backoff_max: int = Field(600, ge=1, description="Cap of the exponential backoff, s.")
    max_retries: int = Field(5, ge=0, description="Retries of a transient failure.")
    progress_interval: float = Field(
        0.5, ge=0, description="Minimum seconds between two PROGRESS updates of one task."
    )
    task_always_eager: bool = Field(
        False,
        description="Debugging only: run tasks in the calling process (no worker; a worker "
        "refuses to start with it).",
    )

    # --- beat ---------------------------------------------------------------------------------
    schedule_refresh_market_data: str = Field(
        "0 22 * * *", description="Crontab (UTC) of the daily market-data refresh."
    )
    schedule_compute_index: str = Field("15 * * * *", description="Crontab of the index run.")
    schedule_cleanup_old_data: str = Field(
        "0 3 * * 0", description="Crontab of the weekly cleanup."
    )
    beat_lock_timeout: int = Field(
        60, ge=5, description="Seconds a dead beat's RedBeat lock blocks a standby."
    )

    # --- market data --------------------------------------------------------------------------
    market_data_provider: Literal["synthetic", "twelvedata"] = Field(
        "synthetic", description="synthetic (offline, deterministic) or twelvedata (HTTP)."
    )
    twelvedata_api_key: str | None = Field(None, description="API key (from a Secret).")
    twelvedata_url: str = Field("https://api.twelvedata.com", description="API base URL.")
    provider_timeout: float = Field(30.0, gt=0, description="Seconds per provider request.")
    provider_credits_per_minute: int = Field(
        8, ge=1, description="Provider credits per minute (TwelveData free tier: 8)."
    )
    provider_credits_per_day: int = Field(
        800, ge=0, description="Provider credits per UTC day (free tier: 800); 0 = no cap."
    )
    provider_batch_size: int = Field(8, ge=1, le=120, description="Symbols per request.")
    history_start: str = Field(
        "2018-01-01",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="First day a full refresh fetches.",
    )
    refresh_overlap_days: int = Field(5, ge=0, description="Days re-fetched by a smart refresh.")
    retention_days: int = Field(
        365, ge=1, description="Days of data cleanup keeps; smart refresh never fetches older."
    )
    refresh_chunk_size: int = Field(
        25, ge=1, description="Symbols per chunk task (unlimited providers); larger -> a group."
    )
    refresh_task_seconds: int = Field(
        600,
        ge=1,
        description="Seconds a quota-bound refresh runs before it continues as a new message "
        "(keep it well under TASK_SOFT_TIME_LIMIT).",
    )

    # --- services -----------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of every service."
    )
    metrics_port: int = Field(9808, ge=0, le=65535, description="Worker /metrics port; 0 = off.")
    metrics_address: str = Field(
        "0.0.0.0", description="Address the worker /metrics server binds (make run: 127.0.0.1)."
    )
    cluster_metrics_port: int = Field(
        9541, ge=1, le=65535, description="/metrics port of the cluster probes (exporter pod)."
    )
    waardhaven_extra_task_modules: str = Field(
        "", description="Comma-separated extra modules the worker imports (test-only tasks)."
    )

    # --- signed task messages (tasks.signing) ------------------------------------------------
    task_signing: bool = Field(
        False, description="Sign every task message; workers run only signed ones (chart: on)."
    )
    task_signing_key: str | None = Field(
        None, description="PEM RSA private key this process signs with (a Secret file)."
    )
    task_signing_cert: str | None = Field(
        None, description="PEM certificate of that key (its id goes into every message)."
    )
    task_signing_cert_store: str | None = Field(
        None, description="Directory of the PEM certificates whose signatures are accepted."
    )

    # --- HTTP API (services/api) --------------------------------------------------------------
    api_tokens_file: str | None = Field(
        None, description="Tokens file of the API (hashes and permissions; re-read on change)."
    )
    api_rate_limit: int = Field(
        120, ge=1, description="Requests per token per API_RATE_PERIOD, shared through Redis."
    )
    api_rate_period: float = Field(60.0, gt=0, description="Seconds of the API rate limit.")
    api_max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest request body the API reads (413 above)."
    )

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str) -> str:
        for item in filter(None, (i.strip() for i in value.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port (e.g. redis-sentinel:26379)")
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _master_name(cls, value: str) -> str:
        if not value or any(c.isspace() or c in ";/:@" for c in value):
            raise ValueError("must be a name without spaces or any of ; / : @")
        return value

    @field_validator(
        "schedule_refresh_market_data", "schedule_compute_index", "schedule_cleanup_old_data"
    )
    @classmethod
    def _crontab(cls, value: str) -> str:
        parse_crontab(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("TASK_SOFT_TIME_LIMIT must be below TASK_TIME_LIMIT")
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                "VISIBILITY_TIMEOUT must exceed TASK_TIME_LIMIT, or long tasks run twice"
            )
        if self.task_signing:
            for name in ("task_signing_key", "task_signing_cert", "task_signing_cert_store"):
                if not getattr(self, name):
                    raise ValueError(f"{name.upper()} is required with TASK_SIGNING=true")
        if self.redis_sentinels.strip():
            # One way to name Redis: a URL that would be silently ignored is an error.
            if {"redis_url", "result_backend_url"} & self.model_fields_set:
                raise ValueError(
                    "REDIS_SENTINELS replaces REDIS_URL and RESULT_BACKEND_URL: unset them"
                )
            if not self.redis_password or not self.redis_sentinel_password:
                raise ValueError(
                    "REDIS_SENTINELS needs REDIS_PASSWORD and REDIS_SENTINEL_PASSWORD"
                    " (no Redis without a password)"
                )
        if self.market_data_provider == "twelvedata" and not self.twelvedata_api_key:
            raise ValueError("TWELVEDATA_API_KEY is required with MARKET_DATA_PROVIDER=twelvedata")
        return self

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url


def load_settings() -> Settings:
    """Read the environment; exit with a message naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            lines.append(f"  {name}: {err['msg']}")
        raise SettingsError("waardhaven-tasks: bad configuration\n" + "\n".join(lines)) from None


@functools.cache
def get_settings() -> Settings:
    return load_settings()
