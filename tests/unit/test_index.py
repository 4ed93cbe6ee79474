"""Index computation against hand-computed values (tasks.index)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tasks.index import (
    StrategyParams,
    clean_returns,
    compute_index,
    forward_fill,
    lookback_stats,
    missing_fractions,
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


def test_missing_share_counts_only_the_listed_period() -> None:
    # Asset 0 listed from day 6 of 10, never missing since: 0%. The original measured over the
    # whole window (60% missing) and dropped such late listings.
    closes = np.full((10, 2), 1.0)
    closes[:6, 0] = nan
    closes[3, 1] = nan  # 1 of 10 days
    np.testing.assert_allclose(missing_fractions(closes), [0.0, 0.1])


def test_late_listing_is_kept_and_a_gappy_asset_dropped() -> None:
    closes = np.full((20, 3), 10.0)
    closes[:12, 0] = nan  # listed on day 12: kept
    closes[2:8:2, 1] = nan  # 3 isolated gaps: filled, kept
    closes[5:10, 2] = nan  # a 5-day gap: 3 days stay missing = 15% -> dropped
    result = compute_index(days(20), ["LATE", "GAPPY", "HOLE"], closes)
    assert result.symbols == ["LATE", "GAPPY"]
    assert "HOLE" in result.dropped and "15%" in result.dropped["HOLE"]


def test_closes_below_min_price_count_as_missing() -> None:
    closes = np.array([[2.0, 10.0], [0.5, 10.0], [2.0, 10.0]] * 4)
    result = compute_index(days(12), ["PENNY", "OK"], closes, StrategyParams(min_price=1.0))
    # 0.5 -> missing, forward-filled with 2.0: the penny asset never moves.
    assert result.values[-1] == pytest.approx(100.0)


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


def test_lookback_ends_the_day_before_the_rebalance() -> None:
    # Asset B jumps +40% on the second rebalance date itself (day 5). Weights chosen that day
    # must not know it: with the jump excluded A and B look the same and get equal weights.
    closes = np.ones((10, 2)) * 100
    closes[5:, 1] = 140.0
    params = StrategyParams(momentum_weight=0.0, market_cap_weight=0.0, risk_parity_weight=1.0)
    result = compute_index(days(10), ["A", "B"], closes, params)
    np.testing.assert_allclose(result.weights[1], [0.5, 0.5])


def test_holdings_drift_between_rebalances() -> None:
    # Two assets, 50/50 on day 0, no rebalance in 3 days. A: +10% then +10%; B: 0 then -50%.
    # Drifted: day1 = 0.5*1.1 + 0.5*1.0 = 1.05; day2 = 0.5*1.21 + 0.5*0.5 = 0.855.
    # (Fixed target weights would give 1.05 * (1 + 0.5*0.1 + 0.5*-0.5) = 0.84.)
    closes = np.array([[100.0, 100.0], [110.0, 100.0], [121.0, 50.0]])
    params = StrategyParams(rebalance_frequency="monthly", min_daily_return=-0.6)
    result = compute_index(days(3), ["A", "B"], closes, params)
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
    with pytest.raises(ValueError, match="at least 2 dates"):
        compute_index(days(1), ["A"], np.ones((1, 1)))
    with pytest.raises(ValueError, match="no asset"):
        compute_index(days(5), ["A"], np.full((5, 1), nan))
