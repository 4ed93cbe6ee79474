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
    database_url: str = Field(
        "sqlite:///var/waardhaven.db",
        description="SQLAlchemy URL: postgresql+psycopg2://... in production, SQLite locally.",
    )
    database_pool_size: int = Field(5, ge=1, le=100, description="SQLAlchemy pool size.")

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
    provider_credits_per_minute: int = Field(8, ge=1, description="Provider rate limit.")
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
        25, ge=1, description="Symbols per chunk task; larger refreshes become a group."
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

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
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
