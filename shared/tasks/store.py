"""Database reads and writes of the domain: what the tasks load and store, in bulk.

Every write is an upsert keyed on the natural key, so running a task twice leaves the same rows.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from tasks import metrics
from tasks.db import COPY_MIN_ROWS, can_copy, copy_upsert, upsert
from tasks.errors import InvalidStrategy
from tasks.index import IndexResult, StrategyParams
from tasks.market_data import SEED_ASSETS, Bar
from tasks.models import (
    Allocation,
    Asset,
    IndexValue,
    Price,
    Report,
    RiskMetric,
    StrategyConfig,
    TaskRun,
)

BENCHMARK_SYMBOL = "^GSPC"
DELETE_BATCH = 5000


def seed_assets(session: Session) -> int:
    """Insert or update the seed universe and the default strategy row. Idempotent."""
    rows = [
        {
            "symbol": a["symbol"],
            "name": a["name"],
            "asset_class": a["asset_class"],
            "is_active": a.get("is_active", True),
            "is_benchmark": a["symbol"] == BENCHMARK_SYMBOL,
        }
        for a in SEED_ASSETS
    ]
    upsert(session, Asset.__table__, rows, ["symbol"], ["name", "asset_class", "is_benchmark"])
    strategy_config(session)
    return len(rows)


def strategy_config(session: Session) -> StrategyParams:
    """The strategy from `strategy_config` (its one row, created with defaults if missing)."""
    row = session.scalars(select(StrategyConfig).order_by(StrategyConfig.id).limit(1)).first()
    if row is None:
        row = StrategyConfig(**{f: getattr(StrategyParams(), f) for f in _STRATEGY_FIELDS})
        session.add(row)
        session.flush()
    try:
        return StrategyParams(**{f: getattr(row, f) for f in _STRATEGY_FIELDS})
    except ValueError as exc:  # a row edited by hand: name the column, not a task argument
        raise InvalidStrategy(f"strategy_config: {exc}") from None


_STRATEGY_FIELDS = (
    "momentum_weight",
    "market_cap_weight",
    "risk_parity_weight",
    "rebalance_frequency",
    "daily_drop_threshold",
    "min_price",
    "max_daily_return",
    "min_daily_return",
    "max_forward_fill_days",
    "outlier_std_threshold",
)


def assets_for_refresh(session: Session, symbols: Sequence[str] | None) -> list[Asset]:
    query = select(Asset).order_by(Asset.symbol)
    if symbols is None:
        query = query.where(Asset.is_active.is_(True))
    else:
        query = query.where(Asset.symbol.in_(symbols))
    return list(session.scalars(query))


def newest_price_dates(session: Session, asset_ids: Sequence[int]) -> dict[int, dt.date]:
    rows = session.execute(
        select(Price.asset_id, func.max(Price.date))
        .where(Price.asset_id.in_(asset_ids))
        .group_by(Price.asset_id)
    )
    return {asset_id: newest for asset_id, newest in rows if newest is not None}


def upsert_prices(
    session: Session, asset_ids: dict[str, int], bars: Sequence[Bar], source: str
) -> tuple[int, int]:
    """Upsert bars, invalid closes (<= 0, not finite) dropped; real low prices are kept:
    `min_price` is an eligibility rule of the index, not a data filter. -> (inserted, updated)"""
    kept = [b for b in bars if b.symbol in asset_ids and b.close > 0 and math.isfinite(b.close)]
    if not kept:
        return 0, 0
    now = dt.datetime.now(dt.UTC)
    # One row per key (the last): a provider repeating a day must not make ON CONFLICT hit a
    # row twice.
    unique = list(
        {
            (asset_ids[b.symbol], b.date): {
                "asset_id": asset_ids[b.symbol],
                "date": b.date,
                "close": b.close,
                "open": b.open,
                "high": b.high,
                "low": b.low,
                "volume": b.volume,
                "source": source,
                "updated_at": now,
            }
            for b in kept
        }.values()
    )
    keys, update = (
        ["asset_id", "date"],
        ["close", "open", "high", "low", "volume", "source", "updated_at"],
    )
    if len(unique) >= COPY_MIN_ROWS and can_copy(session):
        # COPY into a temporary table; it counts the rows that existed before.
        # A re-fetched day with the same values is not rewritten (no new row version, no index
        # writes): a re-run or the smart refresh's overlap costs a comparison, not a write.
        inserted, updated = copy_upsert(
            session, Price.__table__, unique, keys, update, only_if_changed=update[:-1]
        )
    else:
        ids = sorted({asset_ids[b.symbol] for b in kept})
        first, last = min(b.date for b in kept), max(b.date for b in kept)
        existing = set(
            session.execute(
                select(Price.asset_id, Price.date).where(
                    Price.asset_id.in_(ids), Price.date >= first, Price.date <= last
                )
            ).tuples()
        )
        upsert(session, Price.__table__, unique, keys, update)
        inserted = sum(1 for r in unique if (r["asset_id"], r["date"]) not in existing)
        updated = len(unique) - inserted
    metrics.rows_upserted("prices", len(unique))
    return inserted, updated


def price_matrix(
    session: Session, start: dt.date | None, end: dt.date | None, *, benchmark: bool = False
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(dates as datetime64[D], symbols, closes with NaN where missing) of every asset with
    prices, active or not (an inactive one is no longer refreshed; its history stays)."""
    query = (
        select(Asset.symbol, Price.date, Price.close)
        .join(Price, Price.asset_id == Asset.id)
        .where(Asset.is_benchmark.is_(benchmark))
    )
    if start:
        query = query.where(Price.date >= start)
    if end:
        query = query.where(Price.date <= end)
    if can_copy(session):
        return _price_matrix_copy(session, start, end, benchmark)
    rows = session.execute(query).all()
    if not rows:
        return np.array([], dtype="datetime64[D]"), [], np.empty((0, 0))
    symbols_col = np.array([r[0] for r in rows])
    dates_col = np.array([r[1] for r in rows], dtype="datetime64[D]")
    closes_col = np.array([r[2] for r in rows], dtype=float)
    symbols, sym_idx = np.unique(symbols_col, return_inverse=True)
    dates, date_idx = np.unique(dates_col, return_inverse=True)
    closes = np.full((len(dates), len(symbols)), np.nan)
    closes[date_idx, sym_idx] = closes_col
    return dates, [str(s) for s in symbols], closes


# One row of `COPY (asset_id int4, day int4, close float8) TO STDOUT (FORMAT binary)`: the field
# count, then each field's length and value, big-endian (no NULLs: every column is NOT NULL).
_BINARY_ROW = np.dtype(
    [
        ("n", ">i2"),
        ("l1", ">i4"),
        ("asset", ">i4"),
        ("l2", ">i4"),
        ("day", ">i4"),
        ("l3", ">i4"),
        ("close", ">f8"),
    ]
)
_BINARY_HEADER = 19  # signature (11), flags (4), header extension length (4, zero)
_EPOCH = dt.date(2000, 1, 1)


def _price_matrix_copy(
    session: Session, start: dt.date | None, end: dt.date | None, benchmark: bool
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """price_matrix on PostgreSQL: the three columns as binary COPY, parsed by NumPy in one go
    (about 10x quicker than a million Python row tuples; bench/run.py, index section)."""
    conditions = ["a.is_benchmark = %(benchmark)s"]
    if start:
        conditions.append("p.date >= %(start)s")
    if end:
        conditions.append("p.date <= %(end)s")
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        query = cursor.mogrify(
            "SELECT p.asset_id, p.date - %(epoch)s, p.close FROM prices p "
            "JOIN assets a ON a.id = p.asset_id WHERE " + " AND ".join(conditions),
            {"epoch": _EPOCH, "benchmark": benchmark, "start": start, "end": end},
        ).decode()
        buffer = io.BytesIO()
        cursor.copy_expert(f"COPY ({query}) TO STDOUT (FORMAT binary)", buffer)
    finally:
        cursor.close()
    data = buffer.getbuffer()
    count = (len(data) - _BINARY_HEADER - 2) // _BINARY_ROW.itemsize
    if count <= 0:
        return np.array([], dtype="datetime64[D]"), [], np.empty((0, 0))
    rows = np.frombuffer(data, _BINARY_ROW, count, offset=_BINARY_HEADER)
    names = {i: symbol for i, symbol in session.execute(select(Asset.id, Asset.symbol))}
    ids = np.unique(rows["asset"])
    order = sorted(range(len(ids)), key=lambda i: names[int(ids[i])])  # by symbol
    column = np.empty(len(ids), dtype=np.intp)
    column[order] = np.arange(len(ids))
    days, date_idx = np.unique(rows["day"], return_inverse=True)
    closes = np.full((len(days), len(ids)), np.nan)
    closes[date_idx, column[np.searchsorted(ids, rows["asset"])]] = rows["close"]
    dates = np.datetime64(_EPOCH, "D") + days.astype("timedelta64[D]")
    return dates, [names[int(ids[i])] for i in order], closes


def write_index(
    session: Session, result: IndexResult, start: dt.date | None, end: dt.date | None
) -> int:
    """Make the stored index and allocations dated in [start, end] (None: unbounded) those of
    `result`: upserts, and deletes what the span holds beyond it. Rows outside stay."""

    values = [
        {"date": d.astype(object), "value": float(v)}
        for d, v in zip(result.dates, result.values, strict=True)
    ]
    kept = IndexValue.date.not_in([v["date"] for v in values])
    session.execute(delete(IndexValue).where(*_within(IndexValue.date, start, end), kept))
    written = upsert(session, IndexValue.__table__, values, ["date"], ["value"])
    ids = dict(
        session.execute(
            select(Asset.symbol, Asset.id).where(Asset.symbol.in_(result.symbols))
        ).all()
    )
    allocations = [
        {"date": d.astype(object), "asset_id": ids[s], "weight": float(w)}
        for d, row in zip(result.rebalance_dates, result.weights, strict=True)
        for s, w in zip(result.symbols, row, strict=True)
        if w > 0
    ]
    # A recomputation may choose other assets or dates: old allocations of the span go.
    session.execute(delete(Allocation).where(*_within(Allocation.date, start, end)))
    written += upsert(session, Allocation.__table__, allocations, ["date", "asset_id"], ["weight"])
    metrics.rows_upserted("index_values", len(values))
    metrics.rows_upserted("allocations", len(allocations))
    return written


def _within(column: Any, start: dt.date | None, end: dt.date | None) -> list[Any]:
    conditions = []
    if start:
        conditions.append(column >= start)
    if end:
        conditions.append(column <= end)
    return conditions


def oldest_index_date(session: Session) -> dt.date | None:
    return session.scalar(select(func.min(IndexValue.date)))


def index_value(session: Session, day: dt.date) -> float | None:
    return session.scalar(select(IndexValue.value).where(IndexValue.date == day))


def stored_rebalance_date(
    session: Session, since: dt.date | None = None, *, newest: bool = False
) -> dt.date | None:
    """The oldest (or newest) date dated >= since with allocations and an index value: a
    rebalance date of the stored series, where a computation can continue it (an anchor)."""
    pick = func.max if newest else func.min
    query = select(pick(Allocation.date)).join(IndexValue, IndexValue.date == Allocation.date)
    if since:
        query = query.where(Allocation.date >= since)
    return session.scalar(query)


def price_date(session: Session, day: dt.date | None, rows: int) -> dt.date | None:
    """The date `rows` rows after `day` (rows >= 0; row 0 is the first date >= day, or the
    oldest without one) or -rows rows before it (rows < 0; row 0 is the newest date <= day) in
    the close matrix: the distinct price dates of the non-benchmark assets. None: no such row."""
    query = (
        select(Price.date)
        .where(Price.asset_id.in_(select(Asset.id).where(Asset.is_benchmark.is_(False))))
        .distinct()
    )
    if rows >= 0:
        if day:
            query = query.where(Price.date >= day)
        query = query.order_by(Price.date)
    else:
        if day:
            query = query.where(Price.date <= day)
        query = query.order_by(Price.date.desc())
    return session.scalar(query.offset(abs(rows)).limit(1))


def index_series(session: Session, since: dt.date | None = None) -> tuple[np.ndarray, np.ndarray]:
    query = select(IndexValue.date, IndexValue.value).order_by(IndexValue.date)
    if since:
        query = query.where(IndexValue.date >= since)
    rows = session.execute(query).all()
    return (
        np.array([r[0] for r in rows], dtype="datetime64[D]"),
        np.array([r[1] for r in rows], dtype=float),
    )


def benchmark_series(
    session: Session, since: dt.date | None = None
) -> tuple[np.ndarray, np.ndarray]:
    query = (
        select(Price.date, Price.close)
        .join(Asset, Asset.id == Price.asset_id)
        .where(Asset.symbol == BENCHMARK_SYMBOL)
        .order_by(Price.date)
    )
    if since:
        query = query.where(Price.date >= since)
    rows = session.execute(query).all()
    return (
        np.array([r[0] for r in rows], dtype="datetime64[D]"),
        np.array([r[1] for r in rows], dtype=float),
    )


def latest_allocation(session: Session) -> tuple[dt.date | None, list[dict[str, Any]]]:
    newest = session.scalar(select(func.max(Allocation.date)))
    if newest is None:
        return None, []
    rows = session.execute(
        select(Asset.symbol, Asset.name, Asset.asset_class, Allocation.weight)
        .join(Asset, Asset.id == Allocation.asset_id)
        .where(Allocation.date == newest)
        .order_by(Allocation.weight.desc())
    ).all()
    return newest, [
        {"symbol": s, "name": n, "asset_class": c, "weight": float(w)} for s, n, c, w in rows
    ]


RISK_COLUMNS = (
    "total_return",
    "annualized_return",
    "volatility",
    "sharpe",
    "sortino",
    "max_drawdown",
    "current_drawdown",
    "var_95",
    "var_99",
    "beta",
    "correlation",
    "information_ratio",
)


def write_risk_metrics(session: Session, day: dt.date, values: dict[str, Any]) -> None:
    row = {"date": day, **{c: values.get(c) for c in RISK_COLUMNS}}
    upsert(session, RiskMetric.__table__, [row], ["date"], list(RISK_COLUMNS))


def latest_risk_metrics(session: Session) -> dict[str, Any] | None:
    row = session.scalars(select(RiskMetric).order_by(RiskMetric.date.desc()).limit(1)).first()
    if row is None:
        return None
    return {"date": row.date.isoformat(), **{c: getattr(row, c) for c in RISK_COLUMNS}}


def save_report(session: Session, task_id: str | None, values: dict[str, Any]) -> int:
    """Persist a report; the same task id (a redelivery) updates its report, never adds one."""
    row = {"task_id": task_id, "created_at": dt.datetime.now(dt.UTC), **values}
    if task_id is None:
        report = Report(**row)
        session.add(report)
        session.flush()
        return report.id
    upsert(session, Report.__table__, [row], ["task_id"], [k for k in row if k != "task_id"])
    report_id = session.scalar(select(Report.id).where(Report.task_id == task_id))
    assert report_id is not None
    return report_id


# (table, the column that dates a row)
RETENTION: tuple[tuple[Any, Any], ...] = (
    (Price, Price.date),
    (IndexValue, IndexValue.date),
    (Allocation, Allocation.date),
    (RiskMetric, RiskMetric.date),
    (Report, Report.created_at),
    (TaskRun, TaskRun.started_at),
)


def kept_for_index(session: Session, cutoff: dt.date, warmup: int) -> dict[str, Any] | None:
    """What cleanup_old_data must keep older than `cutoff` so that the next full compute_index
    changes no stored value, or None when nothing is needed.

    Deleting at the cutoff is enough when the stored series is cut there and continues from a
    stored rebalance date with `warmup` price dates kept before it (the oldest such date is
    the anchor compute_index will use). Otherwise keep a continuation: from the newest stored
    rebalance date, its warm-up of prices and the index from where those prices start (so the
    oldest kept value is older than the first the prices could give: compute_index sees the
    cut); or, when the series is younger than that, the series from its base of 100 and its
    base's warm-up of prices (compute_index recomputes it from the base).
    """
    base = oldest_index_date(session)
    if base is None:
        return None  # nothing published
    after = price_date(session, cutoff, warmup)
    if base < cutoff and after and stored_rebalance_date(session, after):
        return None
    newest = stored_rebalance_date(session, newest=True)
    before = price_date(session, newest, -warmup) if newest else None
    prices_from: dt.date | None
    if base < cutoff and newest and before and before >= base:
        prices_from = index_from = before
        why = (
            f"no stored rebalance date has {warmup} price dates after the cutoff: the index "
            f"continues from the newest, {newest}, and needs the {warmup} before it"
        )
    else:
        prices_from = price_date(session, base, -warmup) or price_date(session, None, 0)
        index_from = base
        why = (
            f"the index starts at {base}, fewer than {warmup} price dates after the cutoff"
            if base >= cutoff
            else f"no stored rebalance date after the index's start {base} has {warmup} "
            "price dates before it"
        ) + f": it is recomputed from its start, which needs the {warmup} price dates before it"
    if prices_from is None or (prices_from >= cutoff and index_from >= cutoff):
        return None
    return {
        "prices_from": min(prices_from, cutoff).isoformat(),
        "index_from": min(index_from, cutoff).isoformat(),
        "reason": f"{why} (warmup_rows)",
    }


def delete_batch(session: Session, model: Any, column: Any, cutoff: Any) -> int:
    """Delete at most DELETE_BATCH rows older than cutoff (short transactions, no long locks)."""
    if session.get_bind().dialect.name == "postgresql":
        # By physical row address (a TID scan), not by id through the primary key: 7x quicker
        # on 1.2 million prices, close to one DELETE of them all (bench/run.py, cleanup).
        preparer = session.get_bind().dialect.identifier_preparer
        table, name = preparer.format_table(model.__table__), preparer.quote(column.name)
        result = session.execute(
            text(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                f"WHERE {name} < :cutoff LIMIT {int(DELETE_BATCH)}))"
            ),
            {"cutoff": cutoff},
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
    ids = select(model.id).where(column < cutoff).limit(DELETE_BATCH).scalar_subquery()
    result = session.execute(delete(model).where(model.id.in_(ids)))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def record_task_run(session: Session, values: dict[str, Any]) -> None:
    upsert(session, TaskRun.__table__, [values], ["task_id"], [k for k in values if k != "task_id"])


def ping_database(session: Session) -> None:
    session.execute(text("SELECT 1"))


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
