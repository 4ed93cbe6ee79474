"""Property tests of tasks.index on random data sets with gaps, late listings, delistings and
crashes below min_price (Hypothesis): no look-ahead, partial recomputes, anchored continuations
after older prices are gone, and agreement with the plain reference implementation
(tests/support/index_reference.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from index_reference import reference_index
from tasks import index
from tasks.errors import NotEnoughData
from tasks.index import (
    REBALANCE_DAYS,
    Anchor,
    IndexResult,
    StrategyParams,
    compute_index,
    warmup_rows,
)

nan = np.nan
# Small matrices and a bounded number of examples: tests/unit stays within seconds.
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Market:
    dates: np.ndarray
    symbols: list[str]
    closes: np.ndarray  # NaN where the store has no price
    params: StrategyParams

    def until(self, row: int) -> Market:
        """The data set as stored on the day of `row`: nothing dated later, and no column for
        an asset without a price yet (the store's close matrix has only assets with prices)."""
        closes = self.closes[: row + 1]
        listed = ~np.isnan(closes).all(axis=0)
        return Market(
            self.dates[: row + 1],
            [s for s, keep in zip(self.symbols, listed, strict=True) if keep],
            closes[:, listed],
            self.params,
        )

    def since(self, row: int) -> Market:
        """The data set after the rows before `row` were deleted (cleanup_old_data): the store
        has no column for an asset without a price left."""
        closes = self.closes[row:]
        listed = ~np.isnan(closes).all(axis=0)
        return Market(
            self.dates[row:],
            [s for s, keep in zip(self.symbols, listed, strict=True) if keep],
            closes[:, listed],
            self.params,
        )

    def index(self) -> IndexResult:
        return compute_index(self.dates, self.symbols, self.closes, self.params)

    def index_anchored(self, anchor: Anchor) -> IndexResult:
        return compute_index(self.dates, self.symbols, self.closes, self.params, anchor=anchor)


@st.composite
def markets(
    draw: st.DrawFn, max_days: int = 130, max_assets: int = 5, min_days: int = 25
) -> Market:
    n = draw(st.integers(min_days, max_days))
    m = draw(st.integers(1, max_assets))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    closes = rng.uniform(2, 80, m) * np.exp(
        np.cumsum(rng.normal(0.0005, rng.uniform(0.004, 0.05, m), (n, m)), axis=0)
    )
    for j in range(m):
        if draw(st.booleans()):  # a late listing
            closes[: draw(st.integers(1, n - 1)), j] = nan
        if draw(st.booleans()):  # a delisting
            closes[draw(st.integers(1, n - 1)) :, j] = nan
        for _ in range(draw(st.integers(0, 3))):  # gaps of a few days
            first = draw(st.integers(0, n - 1))
            closes[first : first + draw(st.integers(1, 8)), j] = nan
        if draw(st.booleans()):  # a crash below min_price (which it may recover from)
            first = draw(st.integers(1, n - 1))
            closes[first : first + draw(st.integers(1, n)), j] *= 0.01
    if draw(st.booleans()):  # a few invalid closes (zero, negative, infinite)
        cells = rng.random(closes.shape) < 0.01
        closes[cells] = rng.choice([0.0, -1.0, np.inf], cells.sum())
    # Calendar days between trading days: 1 to 4 (weekends, holidays).
    steps = rng.integers(1, 5, n)
    dates = np.datetime64("2023-01-02") + np.cumsum(steps).astype("timedelta64[D]")
    # The store's matrix has a date only where some asset has a price, an asset only if it
    # has prices.
    priced = ~np.isnan(closes)
    stored, listed = priced.any(axis=1), priced.any(axis=0)
    assume(stored.any())
    mix = draw(st.sampled_from([(0.4, 0.3, 0.3), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]))
    params = StrategyParams(
        momentum_weight=mix[0],
        market_cap_weight=mix[1],
        risk_parity_weight=mix[2],
        rebalance_frequency=draw(st.sampled_from(sorted(REBALANCE_DAYS))),
        min_price=draw(st.sampled_from([0.0, 1.0, 5.0])),
        max_forward_fill_days=draw(st.integers(0, 3)),
        daily_drop_threshold=draw(st.sampled_from([-0.01, -0.2])),
    )
    symbols = [f"S{j}" for j in range(m) if listed[j]]
    return Market(dates[stored], symbols, closes[np.ix_(stored, listed)], params)


def computed(market: Market) -> IndexResult | None:
    try:
        return market.index()
    except NotEnoughData:
        return None


def weights_by_date(result: IndexResult) -> dict[np.datetime64, dict[str, float]]:
    return {
        d: {s: w for s, w in zip(result.symbols, row, strict=True) if w > 0}
        for d, row in zip(result.rebalance_dates, result.weights, strict=True)
    }


def assert_same_weights(
    a: dict[np.datetime64, dict[str, float]],
    b: dict[np.datetime64, dict[str, float]],
    rel: float = 1e-12,
) -> None:
    assert a.keys() == b.keys()
    for day in a:
        assert a[day].keys() == b[day].keys(), day
        for symbol in a[day]:
            assert a[day][symbol] == pytest.approx(b[day][symbol], rel=rel, abs=1e-15)


@PROPERTY
@given(markets(), st.data())
def test_prices_dated_after_d_change_nothing_dated_up_to_d(market: Market, data: st.DataObject):
    """Appending days, delistings and new listings after D leaves every value and allocation
    dated <= D as it was on D (a published value never changes)."""
    d = data.draw(st.integers(0, len(market.dates) - 1), label="D")
    then = market.until(d)
    if not then.symbols:
        return
    before, after = computed(then), computed(market)
    if before is None:  # no index yet on D: nothing published that could change
        return
    assert after is not None
    upto = np.datetime64(market.dates[d])
    kept = after.between(None, upto.astype(dt.date))
    np.testing.assert_array_equal(kept.dates, before.dates)
    np.testing.assert_allclose(kept.values, before.values, rtol=1e-12)
    assert_same_weights(weights_by_date(kept), weights_by_date(before))


@PROPERTY
@given(markets(), st.data())
def test_a_partial_recompute_equals_the_full_one(market: Market, data: st.DataObject) -> None:
    """compute_index(start, end): all the history up to end, written from start: the values
    and weights on [start, end] are the full recompute's (no new base 100 at start)."""
    full = computed(market)
    if full is None:
        return
    i = data.draw(st.integers(0, len(full.dates) - 1), label="start row")
    j = data.draw(st.integers(i, len(full.dates) - 1), label="end row")
    start, end = full.dates[i].astype(dt.date), full.dates[j].astype(dt.date)
    end_row = int(np.searchsorted(market.dates, full.dates[j]))
    partial = market.until(end_row).index().between(start, end)
    expected = full.between(start, end)
    np.testing.assert_array_equal(partial.dates, expected.dates)
    np.testing.assert_allclose(partial.values, expected.values, rtol=1e-12)
    assert_same_weights(weights_by_date(partial), weights_by_date(expected))


def rebalance_rows_of(market: Market, result: IndexResult) -> np.ndarray:
    return np.searchsorted(market.dates, result.rebalance_dates)


def assert_continues(anchored: IndexResult, full: IndexResult, rel: float = 1e-9) -> None:
    expected = full.between(anchored.dates[0].astype(dt.date), None)
    np.testing.assert_array_equal(anchored.dates, expected.dates)
    np.testing.assert_allclose(anchored.values, expected.values, rtol=rel)
    np.testing.assert_array_equal(anchored.rebalance_dates, expected.rebalance_dates)
    assert_same_weights(weights_by_date(anchored), weights_by_date(expected), rel=rel)


@PROPERTY
@given(markets(max_days=330, min_days=140), st.data())
def test_an_anchored_index_continues_the_full_one(market: Market, data: st.DataObject) -> None:
    """The rows before a cut row c deleted (cleanup_old_data), compute_index anchored at a
    rebalance date A of the full computation, with warmup_rows rows of prices before it, and
    its stored value: every value, rebalance date and weight from A on is the full one's."""
    full = computed(market)
    if full is None:
        return
    need = warmup_rows(market.params)
    rows = [int(r) for r in rebalance_rows_of(market, full) if r >= need]
    if not rows:
        return
    a = data.draw(st.sampled_from(rows), label="anchor row")
    # Half the time the latest cut the anchor allows: where a short warm-up shows.
    c = data.draw(st.one_of(st.just(a - need), st.integers(0, a - need)), label="cut row")
    first = int(np.searchsorted(market.dates, full.dates[0]))
    kept = market.since(c)
    anchor = Anchor(market.dates[a], float(full.values[a - first]))
    anchored = compute_index(kept.dates, kept.symbols, kept.closes, kept.params, anchor=anchor)
    assert anchored.dates[0] == market.dates[a] and anchored.values[0] == anchor.value
    assert_continues(anchored, full)
    event("anchored, the shortest warm-up" if a - c == need else "anchored")


def steady_market(frequency: str, max_forward_fill_days: int) -> tuple[Market, int]:
    """Two assets with small alternating returns, a daily return of +50 % at row a - 120 and
    of +15 % at row a - 60, for the anchor row a. Judged against the 60 returns before it, the
    +15 % is no outlier while the +50 % is among them and an outlier once it is not: so the
    lookback of the rebalance at a (its volatility) needs the close at row a - 121, which with
    max_forward_fill_days f is only known from row a - 121 - f (the f rows after it missing)."""
    a, f = 200, max_forward_fill_days
    n = a + 30
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    returns = sign * [0.001, 0.002]
    returns[a - 120, 0], returns[a - 60, 0] = 0.5, 0.15
    returns[a - 120 - f : a - 120, 0] = 0.0  # flat where the closes are missing: as filled
    closes = 40.0 * np.cumprod(1.0 + returns, axis=0)
    closes[a - 120 - f : a - 120, 0] = nan
    dates = np.busday_offset("2023-01-02", np.arange(n), roll="forward").astype("datetime64[D]")
    params = StrategyParams(rebalance_frequency=frequency, max_forward_fill_days=f)
    return Market(dates, ["A", "B"], closes, params), a


@pytest.mark.parametrize("max_forward_fill_days", [0, 1, 2, 3])
def test_one_row_of_warmup_less_changes_the_weights(
    max_forward_fill_days: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warmup_rows is the shortest warm-up that works: with one row less the weights of the
    anchor date differ from the full computation's."""
    market, a = steady_market("daily", max_forward_fill_days)
    full = market.index()
    need = warmup_rows(market.params)
    anchor = Anchor(
        market.dates[a], float(full.values[a - int(np.searchsorted(market.dates, full.dates[0]))])
    )
    kept = market.since(a - need)
    assert_continues(kept.index_anchored(anchor), full)
    shorter = market.since(a - need + 1)
    monkeypatch.setattr(index, "warmup_rows", lambda params: need - 1)
    anchored = shorter.index_anchored(anchor)
    ours, theirs = weights_by_date(anchored), weights_by_date(full)
    day = market.dates[a]
    assert ours[day]["A"] != pytest.approx(theirs[day]["A"], rel=1e-3)


def test_an_anchor_must_be_a_date_with_its_warmup_before_it() -> None:
    market, a = steady_market("weekly", 2)
    need = warmup_rows(market.params)
    assert need == 2 * index.LOOKBACK_DAYS + 1 + 2
    with pytest.raises(ValueError, match="anchor date 2022-12-31 is not one of the dates"):
        market.index_anchored(Anchor(dt.date(2022, 12, 31), 100.0))
    early = market.dates[need - 1]
    with pytest.raises(
        ValueError,
        match=f"anchor date {early} has {need - 1} rows of prices before it, fewer than the {need}",
    ):
        market.index_anchored(Anchor(early, 100.0))
    for value in (0.0, -5.0, nan, np.inf, True):
        with pytest.raises(ValueError, match="anchor value must be a positive finite number"):
            market.index_anchored(Anchor(market.dates[a], value))
    nothing = market.since(0)
    nothing.closes[need - 2 : need + 1] = nan  # no close, even forward filled: none eligible
    with pytest.raises(NotEnoughData, match="no asset is eligible on the anchor date"):
        nothing.index_anchored(Anchor(market.dates[need], 100.0))
    # On the row warmup_rows itself it works, at the level given.
    result = market.index_anchored(Anchor(market.dates[need], 250.0))
    assert result.dates[0] == market.dates[need] and result.values[0] == 250.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markets(max_days=110, max_assets=4))
def test_the_fast_index_agrees_with_the_reference(market: Market) -> None:
    fast = computed(market)
    plain = reference_index(market.dates, market.closes, market.params)
    if plain is None:
        assert fast is None
        return
    assert fast is not None
    np.testing.assert_array_equal(fast.dates, plain.dates)
    np.testing.assert_allclose(fast.values, plain.values, rtol=1e-9)
    np.testing.assert_array_equal(fast.rebalance_dates, plain.rebalance_dates)
    np.testing.assert_allclose(fast.weights, plain.weights, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("frequency", sorted(REBALANCE_DAYS))
def test_the_reference_agrees_on_a_long_series_at_every_frequency(frequency: str) -> None:
    """Two years, so that quarterly and yearly rebalances happen more than once."""
    rng = np.random.default_rng(11)
    n, m = 520, 4
    closes = 30 * np.exp(np.cumsum(rng.normal(0, 0.02, (n, m)), axis=0))
    closes[:150, 1] = nan  # a late listing
    closes[400:, 2] = nan  # a delisting
    closes[200:206, 3] = nan  # a gap
    closes[300:, 0] *= 0.02  # a crash below min_price
    dates = np.busday_offset("2022-01-03", np.arange(n), roll="forward").astype("datetime64[D]")
    params = StrategyParams(rebalance_frequency=frequency)
    fast = compute_index(dates, ["A", "B", "C", "D"], closes, params)
    plain = reference_index(dates, closes, params)
    assert plain is not None
    np.testing.assert_allclose(fast.values, plain.values, rtol=1e-9)
    np.testing.assert_array_equal(fast.rebalance_dates, plain.rebalance_dates)
    np.testing.assert_allclose(fast.weights, plain.weights, rtol=1e-9, atol=1e-12)
    assert len(fast.rebalance_dates) >= {"yearly": 2, "quarterly": 5}.get(frequency, 10)
