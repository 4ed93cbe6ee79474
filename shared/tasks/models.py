"""SQLAlchemy 2 models (DOMAIN.md "Data model"). The schema is created by Alembic only."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Asset(Base):
    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    symbol: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    asset_class: Mapped[str] = mapped_column(String(64))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The benchmark (^GSPC) is stored and refreshed but never weighted in the index.
    is_benchmark: Mapped[bool] = mapped_column(Boolean, default=False)


class Price(Base):
    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("asset_id", "date", name="uq_prices_asset_date"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"))
    date: Mapped[dt.date] = mapped_column(Date, index=True)
    close: Mapped[float] = mapped_column(Float)
    open: Mapped[float | None] = mapped_column(Float)
    high: Mapped[float | None] = mapped_column(Float)
    low: Mapped[float | None] = mapped_column(Float)
    volume: Mapped[int | None] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, server_default=func.now()
    )


class IndexValue(Base):
    __tablename__ = "index_values"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, unique=True)
    value: Mapped[float] = mapped_column(Float)


class Allocation(Base):
    __tablename__ = "allocations"
    __table_args__ = (UniqueConstraint("date", "asset_id", name="uq_allocations_date_asset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, index=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"))
    weight: Mapped[float] = mapped_column(Float)


class StrategyConfig(Base):
    __tablename__ = "strategy_config"
    __table_args__ = (
        CheckConstraint(
            "abs(momentum_weight + market_cap_weight + risk_parity_weight - 1.0) <= 0.001",
            name="ck_strategy_weights_sum",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    momentum_weight: Mapped[float] = mapped_column(Float, default=0.4)
    market_cap_weight: Mapped[float] = mapped_column(Float, default=0.3)
    risk_parity_weight: Mapped[float] = mapped_column(Float, default=0.3)
    rebalance_frequency: Mapped[str] = mapped_column(String(16), default="weekly")
    daily_drop_threshold: Mapped[float] = mapped_column(Float, default=-0.01)
    min_price: Mapped[float] = mapped_column(Float, default=1.0)
    max_daily_return: Mapped[float] = mapped_column(Float, default=0.5)
    min_daily_return: Mapped[float] = mapped_column(Float, default=-0.5)
    max_forward_fill_days: Mapped[int] = mapped_column(Integer, default=2)
    outlier_std_threshold: Mapped[float] = mapped_column(Float, default=3.0)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now, server_default=func.now()
    )


class RiskMetric(Base):
    __tablename__ = "risk_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    date: Mapped[dt.date] = mapped_column(Date, unique=True)
    total_return: Mapped[float | None] = mapped_column(Float)
    annualized_return: Mapped[float | None] = mapped_column(Float)
    volatility: Mapped[float | None] = mapped_column(Float)
    sharpe: Mapped[float | None] = mapped_column(Float)
    sortino: Mapped[float | None] = mapped_column(Float)
    max_drawdown: Mapped[float | None] = mapped_column(Float)
    current_drawdown: Mapped[float | None] = mapped_column(Float)
    var_95: Mapped[float | None] = mapped_column(Float)
    var_99: Mapped[float | None] = mapped_column(Float)
    beta: Mapped[float | None] = mapped_column(Float)
    correlation: Mapped[float | None] = mapped_column(Float)
    information_ratio: Mapped[float | None] = mapped_column(Float)


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    period_start: Mapped[dt.date | None] = mapped_column(Date)
    period_end: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, server_default=func.now(), index=True
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    body: Mapped[str] = mapped_column(Text)
    # The id of the task that wrote it: a redelivered task updates its report, never adds one.
    task_id: Mapped[str | None] = mapped_column(String(64), unique=True)


class TaskRun(Base):
    __tablename__ = "task_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    queue: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    rows_written: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # Who triggered it: "api:<token name>", "beat", "cli:<user>" (the `requested_by` header).
    requested_by: Mapped[str | None] = mapped_column(String(128))
