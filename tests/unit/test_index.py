"""Index computation against hand-computed values (tasks.index)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tasks.errors import NotEnoughData
from tasks.index import (
    MIN_LISTED_DAYS,
    StrategyParams,
    clean_returns,
    compute_index,
    eligibility,
    forward_fill,
    lookback_stats,
    rebalance_rows,
    target_weights,
)

nan = np.nan


def days(n: int, start: str = "2024-01-01") -> np.ndarray:
    return np.busday_offset(start, np.arange(n), roll="forward").astype("datetime64[D]")


def test_forward_fill_stops_after_the_limit() -> None:
    closes = np.array([[1.0], [nan], [nan], [nan], [5.0], [nan]])
    filled = forward_fill(closes, limit=2)
    np.testing.assert_array_equal(filled[:, 0], [1.0, 1.0, 1.0, nan, 5.0, 5.0])


def test_forward_fill_never_fills_before_the_first_close() -> None:
    closes = np.array([[nan], [nan], [2.0]])
    np.testing.assert_array_equal(forward_fill(closes, 5)[:, 0], [nan, nan, 2.0])


def test_a_late_listing_is_eligible_after_20_days_of_prices() -> None:
    closes = np.full((40, 1), 10.0)
    closes[:7, 0] = nan  # first close on day 7
    eligible = eligibility(closes, min_price=1.0)[:, 0]
    assert MIN_LISTED_DAYS == 20
    assert not eligible[: 7 + 20].any() and eligible[7 + 20 :].all()


def test_eligibility_needs_fewer_than_10_percent_of_the_lookback_missing() -> None:
    # 100 days; asset 0 misses 5 days, asset 1 misses 6, both on days 30-35 (filled: NaN).
    closes = np.full((100, 2), 10.0)
    closes[30:35, 0] = nan
    closes[30:36, 1] = nan
    eligible = eligibility(closes, min_price=1.0)
    # Day 80: the lookback is days 20-79, holding 5 (8.3 %) and 6 (10 %) missing days.
    assert eligible[80, 0] and not eligible[80, 1]
    # Day 96: the gap has left the lookback (days 36-95): both eligible again.
    assert eligible[96].all()


def test_eligibility_reads_the_close_of_the_day_against_min_price() -> None:
    closes = np.full((30, 1), 10.0)
    closes[25, 0] = 0.9  # below min_price on day 25 only
    closes[27:, 0] = nan  # prices stop after day 26; forward fill covers 27-28 here
    eligible = eligibility(forward_fill(closes, 2), min_price=1.0)[:, 0]
    assert eligible[24] and not eligible[25] and eligible[26]
    assert eligible[27] and eligible[28] and not eligible[29]  # forward fill allowed, then gone


def test_a_gap_keeps_an_asset_out_only_while_it_is_in_the_lookback() -> None:
    # The original dropped an asset from the whole history for gaps anywhere.
    closes = np.full((200, 2), 10.0)
    closes[100:110, 1] = nan  # 10 days, 8 of them stay missing after forward fill
    params = StrategyParams(rebalance_frequency="daily")
    result = compute_index(days(200), ["A", "GAPPY"], closes, params)
    held = dict(zip(result.rebalance_dates, result.weights[:, 1] > 0, strict=True))
    dates = days(200)
    # Missing after the fill: days 102-109. Day 164's lookback (days 104-163) holds 6 of them
    # (10 %), day 165's holds 5.
    assert held[dates[99]] and not held[dates[102]] and not held[dates[110]]
    assert not held[dates[164]] and held[dates[165]]


def test_a_crash_below_min_price_shows_in_the_index() -> None:
    # A and B flat at 10; the index starts on day 20 (20 days of prices), 50/50. On day 25, a
    # rebalance date, A crashes to 0.5, below min_price: the holdings bought on day 20 bear
    # it, then A is no longer eligible and B takes everything.
    closes = np.full((35, 2), 10.0)
    closes[25:, 0] = 0.5
    params = StrategyParams(min_price=1.0, min_daily_return=-0.99)
    result = compute_index(days(35), ["A", "B"], closes, params)
    assert result.dates[0] == days(35)[20]
    np.testing.assert_allclose(result.values[:5], 100.0)
    np.testing.assert_allclose(result.values[5:], 100 * (0.5 * 0.05 + 0.5))  # 52.5
    np.testing.assert_allclose(result.weights, [[0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])


def test_a_stopped_asset_is_held_frozen_until_the_next_rebalance() -> None:
    # A rises 10 % on day 21, then its prices stop (last close day 22; filled to day 24). Its
    # position keeps its last close until the rebalance of day 25, where it is not eligible
    # and its value goes to B; B then rises 10 % on day 27.
    closes = np.full((30, 2), 100.0)
    closes[21:23, 0] = 110.0
    closes[23:, 0] = nan
    closes[27:, 1] = 110.0
    params = StrategyParams(outlier_std_threshold=100)
    result = compute_index(days(30), ["A", "B"], closes, params)
    np.testing.assert_allclose(result.values[:7], [100, 105, 105, 105, 105, 105, 105])
    np.testing.assert_allclose(result.values[7:], 115.5)
    np.testing.assert_allclose(result.weights[1], [0.0, 1.0])


def test_returns_are_clipped() -> None:
    closes = np.array([[1.0], [3.0], [0.3]])  # +200%, -90%
    returns = clean_returns(closes, StrategyParams(outlier_std_threshold=100))
    np.testing.assert_allclose(returns[1:, 0], [0.5, -0.5])


def test_outliers_use_only_past_data() -> None:
    rng = np.random.default_rng(7)
    steps = rng.normal(0, 0.01, 80)
    steps[60] = 0.2  # a 20-sigma jump on day 60
    closes = np.cumprod(1 + np.concatenate([[0.0], steps]))[:, None]
    returns = clean_returns(closes, StrategyParams())
    past = np.concatenate([[0.0], steps])[61 - 60 : 61]  # the 60 returns before the jump
    assert returns[61, 0] == pytest.approx(np.median(past))
    # No look-ahead: a spike at the end changes no earlier return.
    spiked = closes.copy()
    spiked[-1] *= 1.4
    again = clean_returns(spiked, StrategyParams())
    np.testing.assert_array_equal(again[:-1], returns[:-1])


def test_no_outlier_rule_without_20_past_returns() -> None:
    closes = np.cumprod(np.r_[1.0, [1.001] * 10, 1.3])[:, None]
    returns = clean_returns(closes, StrategyParams())
    assert returns[-1, 0] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("frequency", "expected"),
    [
        ("daily", list(range(10))),
        ("weekly", [0, 5]),  # Mon 1 Jan, then Mon 8 Jan
        ("monthly", [0]),
    ],
)
def test_rebalance_rows(frequency: str, expected: list[int]) -> None:
    np.testing.assert_array_equal(rebalance_rows(days(10), frequency), expected)


def test_quarterly_and_yearly_rebalances_happen() -> None:
    dates = days(600)  # ~2.3 years of business days
    quarterly = dates[rebalance_rows(dates, "quarterly")]
    yearly = dates[rebalance_rows(dates, "yearly")]
    assert len(quarterly) == 10 and len(yearly) == 3
    assert all(np.diff(quarterly).astype(int) >= 91)
    assert all(np.diff(yearly).astype(int) >= 365)


def weights_after(returns: np.ndarray, params: StrategyParams) -> np.ndarray:
    """Target weights at the row after `returns` (its lookback is exactly those returns)."""
    row = np.array([returns.shape[0]])
    momentum, volatility, _ = lookback_stats(returns, row)
    eligible = np.ones(returns.shape[1], dtype=bool)
    return target_weights(momentum[0], volatility[0], eligible, params)


def test_momentum_falls_back_to_equal_weight_when_nothing_qualifies() -> None:
    returns = np.full((30, 3), -0.01)  # everything falling: no momentum anywhere
    params = StrategyParams(momentum_weight=1.0, market_cap_weight=0.0, risk_parity_weight=0.0)
    np.testing.assert_allclose(weights_after(returns, params), [1 / 3] * 3)


def test_momentum_weights_by_positive_momentum() -> None:
    # 20-day compound momentum: asset 0 (1.01^20 - 1), asset 1 twice as strong in log terms,
    # asset 2 negative (clipped to 0).
    returns = np.column_stack([np.full(20, 0.01), np.full(20, 0.0201), np.full(20, -0.002)])
    params = StrategyParams(momentum_weight=1.0, market_cap_weight=0.0, risk_parity_weight=0.0)
    m0, m1 = 1.01**20 - 1, 1.0201**20 - 1
    expected = [m0 / (m0 + m1), m1 / (m0 + m1), 0.0]
    np.testing.assert_allclose(weights_after(returns, params), expected)


def test_risk_parity_is_inverse_volatility() -> None:
    returns = np.column_stack([np.tile([0.01, -0.01], 10), np.tile([0.02, -0.02], 10)])
    params = StrategyParams(momentum_weight=0.0, market_cap_weight=0.0, risk_parity_weight=1.0)
    # 1/std : 1/(2 std) -> 2/3 : 1/3
    np.testing.assert_allclose(weights_after(returns, params), [2 / 3, 1 / 3])


def test_a_delisting_changes_no_value_published_before_it() -> None:
    # Issue 9: an asset stops trading, 25 more days arrive, and a value published earlier
    # moved (123.13 -> 128.40): its missing days after the stop were counted over the whole
    # window and it was dropped from all history.
    rng = np.random.default_rng(9)
    closes = 40 * np.exp(np.cumsum(rng.normal(0.001, 0.02, (150, 4)), axis=0))
    closes[126:, 2] = nan  # stops after day 125
    symbols = ["A", "B", "GONE", "D"]
    published = compute_index(days(126), symbols, closes[:126])
    later = compute_index(days(150), symbols, closes)
    np.testing.assert_allclose(later.values[: len(published.values)], published.values)
    assert published.weights[-1, 2] > 0  # it was held
    assert later.weights[-1, 2] == 0  # and is no longer


def test_lookback_ends_the_day_before_the_rebalance() -> None:
    # B jumps +40% on the second rebalance date itself (day 25). Weights chosen that day must
    # not know it: without the jump A and B have the same (zero) momentum: equal weights.
    closes = np.ones((31, 2)) * 100
    closes[25:, 1] = 140.0
    params = StrategyParams(momentum_weight=1.0, market_cap_weight=0.0, risk_parity_weight=0.0)
    result = compute_index(days(31), ["A", "B"], closes, params)
    assert result.rebalance_dates[1] == days(31)[25]
    np.testing.assert_allclose(result.weights[1], [0.5, 0.5])
    np.testing.assert_allclose(result.weights[2], [0.0, 1.0])  # day 30 knows it


def test_holdings_drift_between_rebalances() -> None:
    # Two assets, 50/50 on day 20, no rebalance after. A: +10% then +10%; B: 0 then -50%.
    # Drifted: day 21 = 0.5*1.1 + 0.5*1.0 = 1.05; day 22 = 0.5*1.21 + 0.5*0.5 = 0.855.
    # (Fixed target weights would give 1.05 * (1 + 0.5*0.1 + 0.5*-0.5) = 0.84.)
    closes = np.full((23, 2), 100.0)
    closes[21] = [110.0, 100.0]
    closes[22] = [121.0, 50.0]
    params = StrategyParams(
        rebalance_frequency="monthly", min_daily_return=-0.6, outlier_std_threshold=100
    )
    result = compute_index(days(23), ["A", "B"], closes, params)
    np.testing.assert_allclose(result.values, [100.0, 105.0, 85.5])


def test_result_invariants_on_random_data() -> None:
    rng = np.random.default_rng(3)
    closes = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, (300, 12)), axis=0))
    closes[rng.random(closes.shape) < 0.02] = nan
    closes[:100, 3] = nan  # a late listing
    result = compute_index(days(300), [f"S{i}" for i in range(12)], closes)
    assert result.values[0] == 100.0
    assert np.all(np.isfinite(result.values)) and np.all(result.values > 0)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0)
    assert np.all(result.weights >= 0)
    assert result.weights[0, 3] == 0  # not listed yet on the first rebalance
    assert result.weights[-1, 3] > 0


def test_between_keeps_the_values_and_weights_of_the_span() -> None:
    rng = np.random.default_rng(5)
    closes = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, (120, 3)), axis=0))
    result = compute_index(days(120), ["A", "B", "C"], closes)
    start, end = days(120)[50].astype(object), days(120)[80].astype(object)
    part = result.between(start, end)
    assert part.dates[0] == days(120)[50] and part.dates[-1] == days(120)[80]
    np.testing.assert_array_equal(part.values, result.values[30:61])  # the index starts on day 20
    inside = (result.rebalance_dates >= days(120)[50]) & (result.rebalance_dates <= days(120)[80])
    np.testing.assert_array_equal(part.weights, result.weights[inside])
    assert len(result.between(None, None).dates) == len(result.dates)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"momentum_weight": 0.5}, "momentum_weight + market_cap_weight"),
        ({"rebalance_frequency": "hourly"}, "rebalance_frequency"),
        ({"momentum_weight": 1.4, "market_cap_weight": -0.4}, "momentum_weight"),
        ({"min_daily_return": 0.1}, "min_daily_return"),
        ({"max_forward_fill_days": -1}, "max_forward_fill_days"),
    ],
)
def test_strategy_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        StrategyParams(**changes)  # type: ignore[arg-type]


def test_degenerate_inputs_are_clear_errors() -> None:
    with pytest.raises(NotEnoughData, match="no asset is eligible"):
        compute_index(days(1), ["A"], np.ones((1, 1)))
    with pytest.raises(NotEnoughData, match="no asset is eligible on any of the 5 dates"):
        compute_index(days(5), ["A"], np.full((5, 1), nan))
    with pytest.raises(NotEnoughData, match=r"min_price 1 and 20 days"):
        compute_index(days(30), ["PENNY"], np.full((30, 1), 0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        compute_index(days(3)[::-1], ["A"], np.ones((3, 1)))
