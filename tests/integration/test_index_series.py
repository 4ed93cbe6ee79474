"""compute_index against PostgreSQL through the real task: point in time, partial recomputes,
inactive assets, min_price as eligibility, errors naming their real cause, and cleanup_old_data
changing no published value."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from sqlalchemy import delete, func, select, update

from tasks import background_tasks, index, store
from tasks.celery_app import app
from tasks.db import session_scope
from tasks.errors import InvalidStrategy, InvalidTaskArguments, NotEnoughData
from tasks.market_data import Bar
from tasks.models import Allocation, Asset, IndexValue, Price, StrategyConfig, TaskRun

DAYS = np.busday_offset("2024-01-01", np.arange(220), roll="forward").astype("datetime64[D]")
SYMBOLS = ["AAPL", "MSFT", "GLD", "TLT"]


def day(row: int) -> dt.date:
    return DAYS[row].astype(dt.date)


def random_closes(seed: int, rows: int = len(DAYS), assets: int = len(SYMBOLS)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 40 * np.exp(np.cumsum(rng.normal(0.0005, 0.015, (rows, assets)), axis=0))


def store_prices(closes: dict[str, dict[int, float]], days: np.ndarray = DAYS) -> None:
    """Upsert {symbol: {row: close}} through the refresh's own writer (NaN: no row)."""
    with session_scope() as session:
        ids = {s: i for s, i in session.execute(select(Asset.symbol, Asset.id))}
        bars = [
            Bar(symbol, days[r].astype(dt.date), float(c))
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


# --- cleanup_old_data and the published index -------------------------------------------------

# About two years of business days up to three weeks ago (cleanup's cutoff is relative to today);
# the last RECENT rows arrive later.
TODAY = dt.datetime.now(dt.UTC).date()
RECENT = 15
HISTORY = np.busday_offset(TODAY, np.arange(-540 - RECENT, 0), roll="backward").astype(
    "datetime64[D]"
)
UNIVERSE = [*SYMBOLS, "NVDA"]


def history_closes() -> np.ndarray:
    closes = random_closes(5, rows=len(HISTORY), assets=len(UNIVERSE))
    closes[:150, 4] = np.nan  # NVDA listed late
    closes[300:306, 2] = np.nan  # a gap in GLD
    return closes


def cleanup(days_to_keep: int) -> Any:
    result = background_tasks.cleanup_old_data.apply(kwargs={"days_to_keep": days_to_keep})
    if result.state != "SUCCESS":
        raise result.result
    return result.result


def oldest_price() -> dt.date:
    with session_scope() as session:
        oldest = session.scalar(select(func.min(Price.date)))
    assert oldest is not None
    return oldest


def assert_unchanged(
    before: tuple[dict[dt.date, float], dict[tuple[dt.date, str], float]], since: dt.date
) -> None:
    """The stored index and allocations are those of `before` dated >= since, and no other."""
    values, weights = stored()
    expected_values = {d: v for d, v in before[0].items() if d >= since}
    expected_weights = {k: w for k, w in before[1].items() if k[0] >= since}
    assert values.keys() == expected_values.keys()
    for d, v in values.items():
        assert v == pytest.approx(expected_values[d], rel=1e-9), d
    assert weights.keys() == expected_weights.keys()
    assert weights == pytest.approx(expected_weights, rel=1e-9)


def test_cleanup_changes_no_published_value_and_the_index_goes_on(clean_db: str) -> None:
    """A full recompute after cleanup_old_data continues the stored series from an anchor
    (the old code restarted it at 100 on the kept prices and rewrote every value)."""
    closes = history_closes()
    old = len(HISTORY) - RECENT
    store_prices(columns(closes, range(old), UNIVERSE), HISTORY)
    assert compute().get("continued_from") is None
    published = stored()
    cleaned = cleanup(365)
    cutoff = dt.date.fromisoformat(cleaned["cutoff"])
    assert cleaned["deleted"]["prices"] > 0 and cleaned["deleted"]["index_values"] > 0
    assert cleaned.get("kept_for_index") is None  # weekly: an anchor is left after the cutoff
    assert oldest_price() >= cutoff
    again = compute()
    assert_unchanged(published, cutoff)  # nothing before the cutoff comes back
    # The anchor: the oldest rebalance date with warmup_rows kept price dates before it.
    kept = [d.astype(dt.date) for d in HISTORY[:old] if d.astype(dt.date) >= cutoff]
    ready = kept[index.warmup_rows(index.StrategyParams())]
    anchor = min(d for d, _ in published[1] if d >= ready)
    assert again["continued_from"] == anchor.isoformat() and again["start"] == str(anchor)
    assert published[0][anchor] != pytest.approx(100.0)
    # New days arrive: the old values stay, the new ones continue the series as if nothing had
    # been deleted (the full history's computation).
    store_prices(columns(closes, range(old, len(HISTORY)), UNIVERSE), HISTORY)
    later = compute()
    assert later["continued_from"] == anchor.isoformat()
    values, weights = stored()
    first_new = HISTORY[old].astype(dt.date)
    assert {d: v for d, v in values.items() if d < first_new} == pytest.approx(
        {d: v for d, v in published[0].items() if d >= cutoff}, rel=1e-9
    )
    assert {k: w for k, w in weights.items() if k[0] < first_new} == pytest.approx(
        {k: w for k, w in published[1].items() if k[0] >= cutoff}, rel=1e-9
    )
    everything = index.compute_index(HISTORY, UNIVERSE, closes, index.StrategyParams())
    continued = everything.between(first_new, None)
    assert sorted(d for d in values if d >= first_new) == [
        d.astype(dt.date) for d in continued.dates
    ]
    assert len(continued.dates) == RECENT and len(continued.rebalance_dates) >= 2
    for d, v in zip(continued.dates, continued.values, strict=True):
        assert values[d.astype(dt.date)] == pytest.approx(v, rel=1e-9), d
    for d, row in zip(continued.rebalance_dates, continued.weights, strict=True):
        for symbol, w in zip(UNIVERSE, row, strict=True):
            assert weights.get((d.astype(dt.date), symbol), 0.0) == pytest.approx(w, rel=1e-9)


@pytest.mark.parametrize(
    ("frequency", "days_to_keep"), [("yearly", 365), ("weekly", 30)], ids=["yearly", "short"]
)
def test_cleanup_keeps_what_the_index_needs(
    clean_db: str, frequency: str, days_to_keep: int
) -> None:
    """No stored rebalance date has warmup_rows price dates after the cutoff: cleanup keeps the
    newest rebalance date's warm-up of prices and the index from there, says so, and the next
    recompute changes nothing published."""
    with session_scope() as session:
        session.execute(update(StrategyConfig).values(rebalance_frequency=frequency))
    closes = history_closes()
    store_prices(columns(closes, range(len(HISTORY) - RECENT), UNIVERSE), HISTORY)
    compute()
    published = stored()
    cleaned = cleanup(days_to_keep)
    cutoff = dt.date.fromisoformat(cleaned["cutoff"])
    with session_scope() as session:
        index_from = session.scalar(select(func.min(IndexValue.date)))
    assert index_from is not None
    again = compute()
    assert_unchanged(published, index_from)  # the recompute changes nothing published
    kept = cleaned.get("kept_for_index")
    assert kept is not None and "warmup_rows" in kept["reason"], cleaned
    prices_from = dt.date.fromisoformat(kept["prices_from"])
    assert prices_from == dt.date.fromisoformat(kept["index_from"]) == index_from < cutoff
    assert cleaned["deleted"]["prices"] > 0 and oldest_price() == prices_from
    newest = max(d for d, _ in published[1])
    rows = [d.astype(dt.date) for d in HISTORY]
    warmup = index.warmup_rows(index.StrategyParams())
    assert rows.index(newest) - rows.index(prices_from) == warmup
    assert again["continued_from"] == newest.isoformat()
    # Cleanup again: it keeps the same, nothing more is deleted of the three tables.
    twice = cleanup(days_to_keep)
    assert twice["kept_for_index"] == kept
    assert twice["deleted"]["prices"] == twice["deleted"]["index_values"] == 0
    assert_unchanged(published, index_from)


def test_a_recompute_cannot_reach_before_its_anchor(clean_db: str) -> None:
    closes = history_closes()
    store_prices(columns(closes, range(len(HISTORY) - RECENT), UNIVERSE), HISTORY)
    compute()
    cutoff = dt.date.fromisoformat(cleanup(365)["cutoff"])
    again = compute()
    early = failure(start=cutoff.isoformat())
    assert isinstance(early, InvalidTaskArguments) and early.field == "start"
    anchor = dt.date.fromisoformat(again["continued_from"])
    assert "removed by cleanup_old_data" in str(early)
    assert f"the index can be recomputed from {anchor} on" in str(early)
    short = failure(end=(anchor - dt.timedelta(days=1)).isoformat())
    assert isinstance(short, InvalidTaskArguments) and short.field == "end"
    # From the anchor on it works, and writes the same values.
    published = stored()
    assert compute(start=anchor.isoformat())["start"] == str(anchor)
    assert_unchanged(published, cutoff)
    # Prices deleted by hand (an older cleanup): no rebalance date is left with its warm-up.
    with session_scope() as session:
        session.execute(delete(Price).where(Price.date < HISTORY[-RECENT - 100].astype(dt.date)))
    lost = failure()
    assert type(lost) is NotEnoughData and "RETENTION_DAYS" in str(lost)
    assert "warmup_rows" in str(lost)


def test_cleanup_keeps_the_warmup_of_a_young_index(clean_db: str) -> None:
    """The cutoff falls in the prices before the index's start (base 100): cleanup keeps the
    prices the start needs, and a recompute from the start gives the same values."""
    rows = 200
    closes = random_closes(6, rows=rows, assets=len(SYMBOLS))
    store_prices(columns(closes, range(rows)), HISTORY[-rows - RECENT :])
    assert compute().get("continued_from") is None
    published = stored()
    base = min(published[0])
    assert published[0][base] == 100.0
    first = HISTORY[-rows - RECENT].astype(dt.date)
    cutoff_row = HISTORY[-rows - RECENT + 10].astype(dt.date)  # 10 price dates after the first
    cleaned = cleanup((TODAY - cutoff_row).days)
    assert dt.date.fromisoformat(cleaned["cutoff"]) == cutoff_row < base
    again = compute()
    assert_unchanged(published, base)
    assert again.get("continued_from") is None and again["start"] == str(base)
    kept = cleaned.get("kept_for_index")
    assert kept is not None and kept["prices_from"] == first.isoformat(), cleaned
    assert cleaned["deleted"]["prices"] == 0 and oldest_price() == first
