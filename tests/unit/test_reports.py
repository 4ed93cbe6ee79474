"""Performance metrics against hand-computed values (tasks.reports)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tasks.reports import RISK_FREE_RATE, performance_metrics, render_report

RF = RISK_FREE_RATE / 252


def dates(n: int) -> np.ndarray:
    return np.busday_offset("2024-01-01", np.arange(n), roll="forward").astype("datetime64[D]")


def test_metrics_of_a_small_series_by_hand() -> None:
    values = np.array([100.0, 110.0, 99.0, 108.9])  # returns +10%, -10%, +10%
    m = performance_metrics(dates(4), values)
    r = np.array([0.1, -0.1, 0.1])
    assert m["total_return"] == pytest.approx(8.9)
    assert m["annualized_return"] == pytest.approx((1.089 ** (252 / 3) - 1) * 100)
    assert m["volatility"] == pytest.approx(r.std() * math.sqrt(252))
    excess = r - RF
    assert m["sharpe"] == pytest.approx(excess.mean() / excess.std() * math.sqrt(252))
    # Sortino: one negative excess return, -0.1 - RF.
    assert m["sortino"] == pytest.approx(excess.mean() / abs(-0.1 - RF) * math.sqrt(252))
    # Drawdown: peak 110 on day 1, trough 99 on day 2: -10%; now 108.9 vs peak 110: -1%.
    assert m["max_drawdown"] == pytest.approx(-10.0)
    assert m["max_drawdown_peak_date"] == "2024-01-02"
    assert m["max_drawdown_trough_date"] == "2024-01-03"
    assert m["current_drawdown"] == pytest.approx(-1.0)
    assert m["calmar"] == pytest.approx(m["annualized_return"] / 10.0)
    assert m["var_95"] == pytest.approx(np.quantile(r, 0.05))
    assert m["beta"] is None and m["correlation"] is None and m["alpha"] is None


def test_constant_series_has_zero_sharpe_and_no_nan() -> None:
    m = performance_metrics(dates(5), np.full(5, 100.0))
    assert m["sharpe"] == 0.0
    assert m["max_drawdown"] == 0.0 and m["calmar"] is None
    json.dumps(m, allow_nan=False)  # JSON-safe: never NaN or inf


def test_benchmark_is_aligned_by_date_not_position() -> None:
    index_dates = dates(6)
    index = np.array([100.0, 101.0, 99.0, 102.0, 103.0, 101.0])
    # The benchmark misses day 2 and has an extra day before: by position it would be
    # shifted; by date it is exactly twice the index on the shared days -> beta 1, corr 1.
    bench_dates = np.concatenate([[np.datetime64("2023-12-29")], index_dates[[0, 1, 3, 4, 5]]])
    bench = np.concatenate([[999.0], 2 * index[[0, 1, 3, 4, 5]]])
    m = performance_metrics(index_dates, index, bench_dates, bench)
    assert m["beta"] == pytest.approx(1.0)
    assert m["correlation"] == pytest.approx(1.0)
    # On common dates the index return series is the benchmark's: no active return.
    assert m["information_ratio"] is None
    assert m["alpha"] == pytest.approx(0.0, abs=1e-12)


def test_beta_of_a_leveraged_index() -> None:
    rb = np.array([0.01, -0.02, 0.015, 0.005, -0.01])
    bench = 100 * np.cumprod(np.r_[1.0, 1 + rb])
    index = 100 * np.cumprod(np.r_[1.0, 1 + 2 * rb])
    m = performance_metrics(dates(6), index, dates(6), bench)
    assert m["beta"] == pytest.approx(2.0)
    active = rb  # 2 rb - rb
    assert m["information_ratio"] == pytest.approx(active.mean() / active.std() * math.sqrt(252))
    assert m["alpha"] == pytest.approx((2 * rb.mean() - RF - 2 * (rb.mean() - RF)) * 252)


def test_too_short_series_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        performance_metrics(dates(1), np.array([100.0]))


def test_render_report() -> None:
    body = render_report(
        "allocation",
        "Allocation report",
        {"total_return": 8.9, "volatility": 0.2, "beta": None},
        [{"symbol": "AAPL", "name": "Apple", "asset_class": "technology", "weight": 0.25}],
    )
    assert "# Allocation report" in body
    assert "| total return | 8.90% |" in body
    assert "| volatility | 20.00% |" in body
    assert "| beta | n/a |" in body
    assert "| AAPL | Apple | technology | 25.00% |" in body
    with pytest.raises(ValueError, match="unknown report kind"):
        render_report("weekly", "x", {})
