"""compute_index against PostgreSQL through the real task: point in time, partial recomputes,
inactive assets, min_price as eligibility, errors naming their real cause."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from tasks import background_tasks, store
from tasks.celery_app import app
from tasks.db import session_scope
from tasks.errors import InvalidStrategy, InvalidTaskArguments, NotEnoughData
from tasks.market_data import Bar
from tasks.models import Allocation, Asset, IndexValue, StrategyConfig, TaskRun

DAYS = np.busday_offset("2024-01-01", np.arange(220), roll="forward").astype("datetime64[D]")
SYMBOLS = ["AAPL", "MSFT", "GLD", "TLT"]


def day(row: int) -> dt.date:
    return DAYS[row].astype(dt.date)


def random_closes(seed: int, rows: int = len(DAYS), assets: int = len(SYMBOLS)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 40 * np.exp(np.cumsum(rng.normal(0.0005, 0.015, (rows, assets)), axis=0))


def store_prices(closes: dict[str, dict[int, float]]) -> None:
    """Upsert {symbol: {row: close}} through the refresh's own writer (NaN: no row)."""
    with session_scope() as session:
        ids = {s: i for s, i in session.execute(select(Asset.symbol, Asset.id))}
        bars = [
            Bar(symbol, day(r), float(c))
            for symbol, series in closes.items()
            for r, c in series.items()
            if not np.isnan(c)
        ]
        store.upsert_prices(session, ids, bars, "test")


def columns(closes: np.ndarray, rows: range, symbols: list[str] = SYMBOLS) -> dict:
    return {s: {r: closes[r, j] for r in rows} for j, s in enumerate(symbols)}


def compute(**kwargs: Any) -> Any:
    """The task, in this process (eagerly), through Celery's tracer: its hooks and audit row."""
    result = background_tasks.compute_index.apply(kwargs=kwargs)
    if result.state != "SUCCESS":
        raise result.result
    return result.result


def stored() -> tuple[dict[dt.date, float], dict[tuple[dt.date, str], float]]:
    with session_scope() as session:
        values = {d: v for d, v in session.execute(select(IndexValue.date, IndexValue.value))}
        weights = {
            (d, s): w
            for d, s, w in session.execute(
                select(Allocation.date, Asset.symbol, Allocation.weight).join(
                    Asset, Asset.id == Allocation.asset_id
                )
            )
        }
    return values, weights


def test_a_partial_recompute_writes_only_its_span_and_continues_the_series(
    clean_db: str,
) -> None:
    closes = random_closes(1)
    closes[:70, 3] = np.nan  # TLT listed late
    closes[120:126, 2] = np.nan  # a gap in GLD
    store_prices(columns(closes, range(len(DAYS))))
    full = compute()
    values, weights = stored()
    assert full["days"] == len(values) and min(values) == day(20)  # 20 days of prices first
    # Spoil everything stored, then recompute [start, end] only.
    with session_scope() as session:
        session.execute(update(IndexValue).values(value=-1.0))
        session.execute(update(Allocation).values(weight=-1.0))
    start, end = day(130), day(180)
    partial = compute(start=start.isoformat(), end=end.isoformat())
    assert (partial["start"], partial["end"]) == (str(start), str(end))
    again, again_weights = stored()
    for d, v in again.items():
        if start <= d <= end:
            assert v == pytest.approx(values[d], rel=1e-12), d  # not rebased to 100 at start
        else:
            assert v == -1.0, d  # outside the span: untouched
    assert values[start] != pytest.approx(100.0)
    for key, w in again_weights.items():
        expected = weights[key] if start <= key[0] <= end else -1.0
        assert w == pytest.approx(expected, rel=1e-12), key
    inside = {k for k in weights if start <= k[0] <= end}
    assert inside and inside <= again_weights.keys()
    # Without end: from start to the newest price.
    compute(start=day(200).isoformat())
    tail, _ = stored()
    assert all(tail[d] == pytest.approx(values[d], rel=1e-12) for d in tail if d >= day(200))


def test_later_prices_change_no_published_value(clean_db: str) -> None:
    """Prices dated after D (new days, a delisting, a new listing) leave every value and
    allocation dated <= D as published on D; an inactive asset stays in past values."""
    closes = random_closes(2, assets=5)
    symbols = [*SYMBOLS, "NVDA"]
    closes[:, 4] = np.nan
    closes[160:, 4] = 500 * np.exp(np.cumsum(np.full(len(DAYS) - 160, 0.002)))  # listed after D
    closes[110:, 0] = np.nan  # AAPL delisted after D
    d = 100
    store_prices(columns(closes, range(d + 1), symbols))
    compute()
    published_values, published_weights = stored()
    assert any(s == "AAPL" for _, s in published_weights)
    # AAPL is no longer refreshed; the days after D arrive, with NVDA's listing.
    with session_scope() as session:
        session.execute(update(Asset).where(Asset.symbol == "AAPL").values(is_active=False))
    store_prices(columns(closes, range(d + 1, len(DAYS)), symbols))
    later = compute()
    values, weights = stored()
    assert later["days"] > len(published_values)
    for date, v in published_values.items():
        assert values[date] == pytest.approx(v, rel=1e-12), date
    assert {k: w for k, w in weights.items() if k[0] <= day(d)} == pytest.approx(
        published_weights, rel=1e-12
    )
    held = {s for (date, s) in weights if date > day(d)}
    assert "NVDA" in held  # the new listing, once it has 20 days of prices
    last_aapl = max(date for date, s in weights if s == "AAPL")
    assert day(d) < last_aapl < day(111)  # held until its prices stop, gone after


def test_a_crash_below_min_price_shows_in_the_index(clean_db: str) -> None:
    closes = np.full((40, 2), 10.0)
    closes[30:, 0] = 0.5  # AAPL falls below min_price (1.0 by default) on a rebalance date
    store_prices(columns(closes, range(40), ["AAPL", "MSFT"]))  # the refresh keeps low closes
    compute()
    values, weights = stored()
    # Held 50/50 from day 20; the fall is clipped to the -50 % daily floor: 0.5 x 0.5 + 0.5.
    assert values[day(29)] == pytest.approx(100.0)
    assert values[day(30)] == pytest.approx(75.0)
    assert weights[(day(30), "MSFT")] == pytest.approx(1.0) and (day(30), "AAPL") not in weights


def failure(**kwargs: Any) -> BaseException:
    result = background_tasks.compute_index.apply(kwargs=kwargs)
    assert result.state == "FAILURE"
    return result.result


def test_errors_name_their_real_cause(clean_db: str) -> None:
    inverted = failure(start="2024-03-01", end="2024-02-01")
    assert isinstance(inverted, InvalidTaskArguments) and inverted.field == "end"
    assert "2024-02-01 is before start 2024-03-01" in str(inverted)
    bad_end = failure(end="2024-02-30")
    assert isinstance(bad_end, InvalidTaskArguments) and bad_end.field == "end"

    nothing = failure()
    assert isinstance(nothing, NotEnoughData) and "no prices stored" in str(nothing)
    store_prices(columns(random_closes(3), range(10)))  # 10 days: no asset eligible yet
    short = failure()
    assert type(short) is NotEnoughData and "'start'" not in str(short)
    assert "20 days of prices" in str(short)
    store_prices(columns(random_closes(3), range(60)))
    too_late = failure(start="2030-01-01")
    assert isinstance(too_late, InvalidTaskArguments) and too_late.field == "start"

    with session_scope() as session:
        session.execute(update(StrategyConfig).values(rebalance_frequency="hourly"))
    strategy = failure()
    assert isinstance(strategy, InvalidStrategy) and "rebalance_frequency" in str(strategy)
    assert "'start'" not in str(strategy)
    with session_scope() as session:
        runs = session.execute(select(TaskRun.state, TaskRun.error)).all()
    assert len(runs) == 6 and all(r.state == "FAILURE" for r in runs)
    assert any("InvalidStrategy" in (r.error or "") for r in runs)


def test_a_worker_reports_the_cause_to_the_caller(worker: Any) -> None:
    """Through a real worker and the result backend: the caller gets the error type back."""
    store_prices(columns(random_closes(4), range(10)))
    short = app.send_task("compute_index")
    outcome = short.get(timeout=60, propagate=False)
    assert short.state == "FAILURE" and type(outcome).__name__ == "NotEnoughData"
    assert "'start'" not in str(outcome)
    inverted = app.send_task("compute_index", kwargs={"start": "2024-03-01", "end": "2024-02-01"})
    outcome = inverted.get(timeout=60, propagate=False)
    assert type(outcome).__name__ == "InvalidTaskArguments" and "'end'" in str(outcome)
