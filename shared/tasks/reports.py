"""Performance metrics of the index and the Markdown body of reports (DOMAIN.md).

Differences from the original: the annualised return uses 252 trading days per year
((V_last / V_first) ** (252 / N) - 1 with N daily returns; the original raised to 365 / N, mixing
calendar days with a count of trading days); the benchmark is aligned by date, not by position;
without benchmark data the benchmark figures are None and everything else is still computed.
Every value is JSON-safe: a Python float, int, str or None, never NaN or infinity.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RISK_FREE_RATE = 0.05
TRADING_DAYS = 252
REPORT_KINDS = ("performance", "allocation", "risk")

Metrics = dict[str, float | str | None]


def _f(value: float | np.floating[Any] | None) -> float | None:
    """JSON-safe: a finite Python float, else None."""
    return float(value) if value is not None and math.isfinite(value) else None


def drawdowns(values: np.ndarray) -> np.ndarray:
    """(V - running max) / running max for each value (0 at a new high, negative below it)."""
    peaks = np.maximum.accumulate(values)
    return (values - peaks) / peaks


def _series(name: str, dates: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dates = np.asarray(dates, dtype="datetime64[D]")
    values = np.asarray(values, dtype=float)
    if dates.shape != values.shape or values.ndim != 1:
        raise ValueError(f"{name}: {dates.shape} dates for {values.shape} values")
    return dates, values


def performance_metrics(
    dates: np.ndarray,
    values: np.ndarray,
    benchmark_dates: np.ndarray | None = None,
    benchmark_values: np.ndarray | None = None,
) -> Metrics:
    """Return, risk and (when a benchmark is given) relative figures of an index series.

    Percent: total_return, annualized_return, max_drawdown, current_drawdown. Fractions:
    volatility, var_95, var_99, alpha. Sharpe/Sortino/information ratio annualised by
    sqrt(252), population std (ddof=0) throughout; VaR is numpy's linear-interpolated quantile.
    """
    dates, values = _series("index", dates, values)
    if len(values) < 2:
        raise ValueError(f"need at least 2 index values for performance metrics, got {len(values)}")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError("index values must be finite and positive")
    if np.any(np.diff(dates) <= np.timedelta64(0, "D")):
        raise ValueError("index dates must be strictly increasing")
    returns = values[1:] / values[:-1] - 1.0
    n = len(returns)
    rf = RISK_FREE_RATE / TRADING_DAYS
    excess = returns - rf
    std = excess.std()
    sharpe = 0.0 if std == 0 else excess.mean() / std * math.sqrt(TRADING_DAYS)
    downside = excess[excess < 0]
    sortino = (
        excess.mean() / math.sqrt(np.mean(downside**2)) * math.sqrt(TRADING_DAYS)
        if len(downside)
        else None
    )
    growth = values[-1] / values[0]
    annualized = (growth ** (TRADING_DAYS / n) - 1.0) * 100
    dd = drawdowns(values)
    trough = int(dd.argmin())  # the first date of the deepest drawdown
    peak = int(values[: trough + 1].argmax())  # the high it fell from
    max_dd = float(dd[trough] * 100)
    metrics: Metrics = {
        "start_date": str(dates[0]),
        "end_date": str(dates[-1]),
        "days": n,
        "start_value": _f(values[0]),
        "end_value": _f(values[-1]),
        "total_return": _f((growth - 1.0) * 100),
        "annualized_return": _f(annualized),
        "volatility": _f(returns.std() * math.sqrt(TRADING_DAYS)),
        "sharpe": _f(sharpe),
        "sortino": _f(sortino),
        "max_drawdown": _f(max_dd),
        "max_drawdown_peak_date": str(dates[peak]),
        "max_drawdown_trough_date": str(dates[trough]),
        "current_drawdown": _f(dd[-1] * 100),
        "calmar": _f(annualized / abs(max_dd)) if max_dd != 0 else None,
        "var_95": _f(np.quantile(returns, 0.05)),
        "var_99": _f(np.quantile(returns, 0.01)),
        "beta": None,
        "correlation": None,
        "information_ratio": None,
        "alpha": None,
    }
    if benchmark_dates is not None and benchmark_values is not None:
        bench_dates, bench = _series("benchmark", benchmark_dates, benchmark_values)
        usable = np.isfinite(bench) & (bench > 0)
        metrics.update(_versus_benchmark(dates, values, bench_dates[usable], bench[usable]))
    return metrics


def _versus_benchmark(
    dates: np.ndarray, values: np.ndarray, bench_dates: np.ndarray, bench_values: np.ndarray
) -> Metrics:
    """Beta, correlation, information ratio and Jensen's alpha on the dates both series have.

    Returns are taken between consecutive common dates, so a date missing from either series
    merges two days into one return on both sides rather than pairing different days.
    """
    _, mine, theirs = np.intersect1d(dates, bench_dates, return_indices=True)
    if len(mine) < 2:
        return {}
    index = values[mine]
    bench = bench_values[theirs] / bench_values[theirs][0] * 100  # rebased to 100
    r, rb = index[1:] / index[:-1] - 1.0, bench[1:] / bench[:-1] - 1.0
    var_b = rb.var()  # ddof=0, as the covariance below
    beta = float(np.mean((r - r.mean()) * (rb - rb.mean())) / var_b) if var_b > 0 else None
    correlation = (
        float(np.corrcoef(r, rb)[0, 1]) if var_b > 0 and r.std() > 0 else None  # undefined
    )
    active = r - rb
    information = (
        active.mean() / active.std() * math.sqrt(TRADING_DAYS) if active.std() > 0 else None
    )
    rf = RISK_FREE_RATE / TRADING_DAYS
    alpha = (r.mean() - rf - beta * (rb.mean() - rf)) * TRADING_DAYS if beta is not None else None
    return {
        "beta": _f(beta),
        "correlation": _f(correlation),
        "information_ratio": _f(information),
        "alpha": _f(alpha),
    }


# --- rendering ------------------------------------------------------------------------------

_PERCENT = {"total_return", "annualized_return", "max_drawdown", "current_drawdown"}
_FRACTION = {"volatility", "var_95", "var_99", "alpha"}  # shown as percent
_VALUES = {"start_value", "end_value"}


def _cell(key: str, value: Any) -> str:
    """A metric with its unit; None is "n/a"; Markdown table pipes escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if key in _PERCENT:
            return f"{value:.2f}%"
        if key in _FRACTION:
            return f"{value * 100:.2f}%"
        if key in _VALUES:
            return f"{value:,.2f}"
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def render_report(
    kind: str, title: str, metrics: dict[str, Any], rows: list[dict[str, Any]] | None = None
) -> str:
    """A Markdown body: the metrics as a table, and for an allocation the weights by symbol."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}: one of {', '.join(REPORT_KINDS)}")
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {_cell(k, v)} |" for k, v in metrics.items()]
    if rows:
        lines += ["", "| symbol | name | class | weight |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {_cell('symbol', r['symbol'])} | {_cell('name', r.get('name') or '')} "
            f"| {_cell('class', r.get('asset_class') or '')} | {r['weight'] * 100:.2f}% |"
            for r in rows
        ]
    elif kind == "allocation":
        lines += ["", "No allocation stored yet: run compute_index."]
    return "\n".join(lines) + "\n"
