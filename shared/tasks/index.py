"""Index computation: pure functions on NumPy arrays (DOMAIN.md, compute_index).

Kept from the original: the cleaning rules, the three-way weight mix, base 100. Fixed:
- point in time: which assets may be held is decided at each rebalance date from the data
  known that day (`eligibility`), so prices dated after D change no value or weight dated
  <= D, and assets that stop trading or are no longer refreshed stay in every past value;
- `min_price` is an eligibility rule, not a data filter: a crash below it shows in the index;
- outliers are judged against a trailing window of past returns only (no look-ahead);
- quarterly (91 days) and yearly (365 days) rebalancing happen;
- momentum with no qualifying asset falls back to equal weight (no division by zero);
- holdings drift with prices between rebalances (the original re-applied the target weights
  every day, a daily rebalance in effect). A held asset whose prices stop earns nothing (it
  keeps its last close) until the next rebalance, where it is not eligible and its value
  goes to the others.

Timing: a rebalance happens at the close of its date t. Eligibility reads the close of t, the
lookback ends at t-1 (as DOMAIN.md says), and the new holdings earn the returns from t+1 on:
nothing decided at t uses later data, and a crash on t is borne by the holdings before it.

Anchored: `compute_index(..., anchor=Anchor(date, value))` continues a stored series from one of
its rebalance dates at its stored level instead of starting at 100, for when the older prices
are gone (cleanup_old_data). Every value and weight from the anchor on equals the full
history's as long as the matrix holds `warmup_rows(params)` rows before the anchor, which is
all the price history a value needs (the property test checks it, and that one row less fails).

tests/support/index_reference.py is the same algorithm written plainly, and property tests
check this one against it. The trailing statistics come from running sums, so the cost is
O(days x assets) whatever the rebalance frequency.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from tasks.errors import NotEnoughData

REBALANCE_DAYS: dict[str, int] = {
    "daily": 1,
    "weekly": 7,
    "monthly": 30,
    "quarterly": 91,
    "yearly": 365,
}
LOOKBACK_DAYS = 60
MOMENTUM_DAYS = 20
MIN_OUTLIER_HISTORY = 20  # past returns needed before the outlier rule applies
MAX_MISSING_FRACTION = 0.10  # of the lookback's days, for an asset to be eligible
MIN_LISTED_DAYS = 20  # days since its first close a late listing needs to be eligible
COLUMN_BLOCK = 32  # assets cleaned at a time (bench/run.py, index section)
_MIX = ("momentum_weight", "market_cap_weight", "risk_parity_weight")


@dataclass(frozen=True)
class StrategyParams:
    """The strategy (a `strategy_config` row); a bad value raises ValueError naming the field."""

    momentum_weight: float = 0.4
    market_cap_weight: float = 0.3
    risk_parity_weight: float = 0.3
    rebalance_frequency: str = "weekly"
    daily_drop_threshold: float = -0.01
    min_price: float = 1.0
    max_daily_return: float = 0.5
    min_daily_return: float = -0.5
    max_forward_fill_days: int = 2
    outlier_std_threshold: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rebalance_frequency":
                if value not in REBALANCE_DAYS:
                    raise ValueError(
                        f"rebalance_frequency must be one of {', '.join(REBALANCE_DAYS)}, "
                        f"not {value!r}"
                    )
            elif f.name == "max_forward_fill_days":
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"max_forward_fill_days must be an integer, not {value!r}")
                if value < 0:
                    raise ValueError("max_forward_fill_days must not be negative")
            elif (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{f.name} must be a finite number, not {value!r}")
        for name in _MIX:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        total = sum(getattr(self, name) for name in _MIX)
        if abs(total - 1.0) > 0.001:
            raise ValueError(
                f"momentum_weight + market_cap_weight + risk_parity_weight is {total:g}, not 1"
            )
        if not -1.0 < self.min_daily_return < 0.0:
            raise ValueError("min_daily_return must be between -1 and 0 (exclusive)")
        if self.max_daily_return <= 0.0:
            raise ValueError("max_daily_return must be positive")
        if self.min_price < 0:
            raise ValueError("min_price must not be negative")
        if self.outlier_std_threshold <= 0:
            raise ValueError("outlier_std_threshold must be positive")
        if self.daily_drop_threshold <= -1.0:
            raise ValueError("daily_drop_threshold must be above -1")


def warmup_rows(params: StrategyParams) -> int:
    """Rows of price history a value or weight needs before its date, so that older prices
    cannot change it: the lookback of a rebalance reads the LOOKBACK_DAYS returns before it,
    each judged for outliers against the LOOKBACK_DAYS returns before it, the oldest of which
    needs the previous close, forward filled from up to max_forward_fill_days earlier. (The
    late-listing rule's first close is covered: MIN_LISTED_DAYS < LOOKBACK_DAYS.)"""
    return 2 * LOOKBACK_DAYS + 1 + params.max_forward_fill_days


@dataclass(frozen=True)
class Anchor:
    """Where an anchored computation starts: a rebalance date of a stored series and its value."""

    date: dt.date | np.datetime64
    value: float


@dataclass(frozen=True)
class IndexResult:
    dates: np.ndarray  # datetime64[D], from the first rebalance date
    values: np.ndarray  # float64, 100.0 on the first rebalance date
    symbols: list[str]  # every asset of the close matrix; the columns of `weights`
    rebalance_dates: np.ndarray  # datetime64[D]
    weights: np.ndarray  # (rebalances, symbols) target weights; rows sum to 1, 0 if ineligible

    def between(self, start: dt.date | None, end: dt.date | None) -> IndexResult:
        """The values and weights dated in [start, end] (None: unbounded), nothing rebased:
        what a partial recompute writes."""
        lo = np.datetime64(start or "NaT", "D")
        hi = np.datetime64(end or "NaT", "D")

        def inside(dates: np.ndarray) -> np.ndarray:
            keep = np.ones(len(dates), dtype=bool)
            if start:
                keep &= dates >= lo
            if end:
                keep &= dates <= hi
            return keep

        days, rebalances = inside(self.dates), inside(self.rebalance_dates)
        return IndexResult(
            dates=self.dates[days],
            values=self.values[days],
            symbols=self.symbols,
            rebalance_dates=self.rebalance_dates[rebalances],
            weights=self.weights[rebalances],
        )

    def never_held(self) -> list[str]:
        """The assets with no weight at any rebalance date."""
        held = np.any(self.weights > 0, axis=0)
        return [s for j, s in enumerate(self.symbols) if not held[j]]


# --- 1. cleaning ----------------------------------------------------------------------------


def forward_fill(closes: np.ndarray, limit: int) -> np.ndarray:
    """Fill each gap with the last close for at most `limit` consecutive days (longer gaps stay
    partly missing: a stale price must not pass for a traded one)."""
    filled = np.array(closes, dtype=float)  # a copy; columns without a gap stay as they are
    gappy = np.flatnonzero(np.isnan(filled).any(axis=0))
    if len(gappy) == 0:
        return filled
    part = filled[:, gappy]
    rows = np.arange(part.shape[0])[:, None]
    valid = ~np.isnan(part)
    last = np.maximum.accumulate(np.where(valid, rows, -1), axis=0)  # row of the last close
    carried = np.take_along_axis(part, np.maximum(last, 0), axis=0)
    keep = valid | ((last >= 0) & (rows - last <= limit))
    filled[:, gappy] = np.where(keep, carried, np.nan)
    return filled


def eligibility(filled: np.ndarray, min_price: float) -> np.ndarray:
    """Whether each asset may be bought at the close of each date, from data known then.

    Eligible on day t: a close on t (forward fill allowed) >= min_price, and fewer than
    MAX_MISSING_FRACTION of its lookback days missing. Its lookback: the LOOKBACK_DAYS days
    before t, or for a late listing the days since its first close, which must number at least
    MIN_LISTED_DAYS. `filled` is the forward-filled close matrix (a filled day counts as
    known); returns bool (days, assets).
    """
    n = filled.shape[0]
    known = ~np.isnan(filled)
    first = np.where(known.any(axis=0), known.argmax(axis=0), n)  # row of the first close
    with np.errstate(invalid="ignore"):
        ok = filled >= min_price  # NaN compares False: a close is needed
    rows = np.arange(n)[:, None]
    ok &= rows - first >= MIN_LISTED_DAYS
    # The missing-day rule, for the assets with a missing day after their first close.
    gappy = np.flatnonzero(n - first - known.sum(axis=0) > 0)
    if len(gappy):
        first = first[gappy]
        listed = np.clip(rows - first, 0, LOOKBACK_DAYS)  # days in the lookback of row t
        # gaps[t]: missing days in rows < t. Every row before the first close is missing, so
        # the count at the lookback's first row max(t - LOOKBACK_DAYS, first) is
        # max(gaps[t - LOOKBACK_DAYS], first), without gathering per cell.
        gaps = np.zeros((n + 1, len(gappy)), dtype=np.int32)
        np.cumsum(~known[:, gappy], axis=0, out=gaps[1:])
        before = np.maximum(gaps[np.maximum(np.arange(n) - LOOKBACK_DAYS, 0)], first)
        ok[:, gappy] &= gaps[:-1] - before < MAX_MISSING_FRACTION * listed
    return ok


# --- 2. returns -----------------------------------------------------------------------------


def _running(values: np.ndarray, window: int = 0) -> np.ndarray:
    """Row window + t holds the column sums of rows < t (rows before it are zeros), so the sum
    of rows [t - window, t) is row window + t minus row t."""
    out = np.zeros((window + 1 + values.shape[0], values.shape[1]), order="F")
    np.cumsum(values, axis=0, out=out[window + 1 :])
    return out


def _prefix_sums(values: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Column sums of rows < e for each e in `ends` (0 <= e <= len(values)), one row per end.

    What _running gives at a few rows, without the full running-sum matrix: one reading pass
    (np.add.reduceat over the segments between the sorted ends), then a cumsum of the small
    matrix of segment sums. Used when only the rebalance rows are wanted.
    """
    n, m = values.shape
    ends = np.asarray(ends, dtype=np.intp)
    cuts = np.unique(ends[(ends > 0) & (ends <= n)])
    sums = np.zeros((len(cuts) + 1, m))
    if len(cuts):
        # Segments [0, cuts[0]), [cuts[0], cuts[1]), ...; reduceat's last one runs to the end.
        starts = np.concatenate(([0], cuts[cuts < n]))
        segments = np.add.reduceat(values, starts, axis=0)[: len(cuts)]
        np.cumsum(segments, axis=0, out=sums[1:])
    return sums[np.searchsorted(cuts, np.clip(ends, 0, n), side="right")]


def _prefix_log_products(growth: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """_prefix_sums of log(growth) at `ends`, taking logs of segment products only (a log per
    segment, not per cell); falls back to a log per cell should a product leave float range."""
    n, m = growth.shape
    ends = np.asarray(ends, dtype=np.intp)
    cuts = np.unique(ends[(ends > 0) & (ends <= n)])
    sums = np.zeros((len(cuts) + 1, m))
    if len(cuts):
        starts = np.concatenate(([0], cuts[cuts < n]))
        products = np.multiply.reduceat(growth, starts, axis=0)[: len(cuts)]
        if np.all((products > np.finfo(float).tiny) & np.isfinite(products)):
            np.cumsum(np.log(products), axis=0, out=sums[1:])
        else:
            return _prefix_sums(np.log(growth), ends)
    return sums[np.searchsorted(cuts, np.clip(ends, 0, n), side="right")]


def trailing_stats(
    x: np.ndarray, window: int = LOOKBACK_DAYS, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and sample std (ddof=1) of the valid values of rows [t - window, t), for each
    row t in `rows` (default every row): strictly before t, so day t never sees day t or later.

    Mean is NaN without values, std NaN with fewer than 2. A window whose sum of squared
    deviations is within the rounding error of the running sums has std 0 (constant values).
    """
    n = x.shape[0]
    valid = ~np.isnan(x)
    z = np.where(valid, x, 0.0)
    sources = (valid.astype(float), z, z * z, np.abs(z))
    if rows is None:
        lo, hi = slice(0, n), slice(window, window + n)
        c0, c1, c2, c_abs = (_running(v, window) for v in sources)
        count = c0[hi] - c0[lo]
        s1, s2, total_sq, total_abs = c1[hi] - c1[lo], c2[hi] - c2[lo], c2[hi], c_abs[hi]
    else:
        # Only the rows asked: the running sums at the window bounds (rows t - window and t).
        ends = np.asarray(rows, dtype=np.intp)
        both = np.concatenate([ends - window, ends])
        p0, p1, p2, p_abs = (_prefix_sums(v, both) for v in sources)
        k = len(ends)
        count = p0[k:] - p0[:k]
        s1, s2, total_sq, total_abs = p1[k:] - p1[:k], p2[k:] - p2[:k], p2[k:], p_abs[k:]
    # In place where possible: each step is a pass over the whole matrix.
    known_mean = s1 / np.maximum(count, 1.0)  # 0 without values (s1 is 0 then)
    mean = known_mean.copy()
    mean[count == 0] = np.nan
    squares = np.multiply(s1, known_mean)
    np.subtract(s2, squares, out=squares)
    # Each window sum adds at most `window` terms to running sums of this size.
    size = np.abs(known_mean, out=known_mean)
    size *= total_abs
    size += total_sq
    size *= 4 * window * np.finfo(float).eps
    squares[~(squares > size)] = 0.0
    squares /= np.maximum(count - 1.0, 1.0)
    std = np.sqrt(squares, out=squares)
    std[count < 2] = np.nan
    return count, mean, std


def clean_returns(closes: np.ndarray, params: StrategyParams) -> np.ndarray:
    """Simple daily returns, clipped to [min, max] daily return, outliers replaced.

    Outlier: a return farther than outlier_std_threshold x std from the mean of the
    LOOKBACK_DAYS clipped returns before it (at least MIN_OUTLIER_HISTORY of them, std > 0);
    it becomes the median of that same window. Only past data is used, so a later price never
    changes an earlier return. Row 0 is NaN (no previous close), as is every return whose
    closes are not both known.
    """
    returns = np.full(closes.shape, np.nan, order="F")  # column-major: fast per-asset sums
    with np.errstate(invalid="ignore", divide="ignore"):
        returns[1:] = closes[1:] / closes[:-1] - 1.0
    returns = np.clip(returns, params.min_daily_return, params.max_daily_return)
    count, mean, std = trailing_stats(returns)
    with np.errstate(invalid="ignore"):
        outlier = (
            (count >= MIN_OUTLIER_HISTORY)
            & (std > 0)
            & (np.abs(returns - mean) > params.outlier_std_threshold * std)
        )
    days, assets = np.nonzero(outlier)
    if len(days):
        # Row d + k of `padded` is return row d - LOOKBACK_DAYS + k: the window before day d.
        padded = np.vstack([np.full((LOOKBACK_DAYS, closes.shape[1]), np.nan), returns])
        windows = padded[days[:, None] + np.arange(LOOKBACK_DAYS), assets[:, None]]
        gaps = np.isnan(windows).any(axis=1)
        medians = np.empty(len(days))
        medians[~gaps] = np.median(windows[~gaps], axis=1)  # quicker than nanmedian
        if gaps.any():
            medians[gaps] = np.nanmedian(windows[gaps], axis=1)
        returns[days, assets] = medians
    return returns


# --- 3. rebalance dates and lookback statistics ---------------------------------------------


def rebalance_rows(
    dates: np.ndarray, frequency: str, allowed: np.ndarray | None = None, first: int | None = None
) -> np.ndarray:
    """Rows of the rebalance dates: the first allowed date, then each time the first allowed
    date at least N calendar days after the previous rebalance (N = REBALANCE_DAYS[frequency]).

    `allowed` (bool per date, default all) excludes dates on which nothing can be held.
    `first`: the row of the first rebalance (an anchor) instead of the first allowed row.
    """
    n = len(dates)
    allowed = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    # next_allowed[i]: the first allowed row >= i (n when none).
    next_allowed = np.minimum.accumulate(np.where(allowed, np.arange(n), n)[::-1])[::-1]
    next_allowed = np.append(next_allowed, n)
    step = np.timedelta64(REBALANCE_DAYS[frequency], "D")
    rows: list[int] = []
    row = int(next_allowed[0]) if first is None else first
    while row < n:
        rows.append(row)
        row = int(next_allowed[np.searchsorted(dates, dates[row] + step)])
    return np.array(rows, dtype=int)


def lookback_stats(
    returns: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Momentum, volatility and number of returns of the lookback of each rebalance row.

    Lookback of row t: the LOOKBACK_DAYS returns of rows [t - LOOKBACK_DAYS, t), i.e. ending
    the day before the rebalance. Momentum: compound return of its last MOMENTUM_DAYS returns
    (a missing return counts 0). Volatility: sample std of its returns (NaN with fewer than 2).
    """
    count, _, std = trailing_stats(returns, LOOKBACK_DAYS, rows)
    rows = np.asarray(rows, dtype=np.intp)
    growth = np.where(np.isnan(returns), 1.0, 1.0 + returns)
    ends = _prefix_log_products(growth, np.concatenate([rows - MOMENTUM_DAYS, rows]))
    momentum = np.expm1(ends[len(rows) :] - ends[: len(rows)])
    return momentum, std, count


# --- 4. target weights ----------------------------------------------------------------------


def _equal(eligible: np.ndarray) -> np.ndarray:
    return eligible / np.maximum(eligible.sum(axis=-1, keepdims=True), 1)


def _normalise(scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Scores (NaN or negative count 0) over the eligible assets summing to 1; equal weight
    over the eligible assets when they sum to 0. Works on the last axis."""
    scores = np.where(eligible, np.nan_to_num(scores, nan=0.0, posinf=0.0), 0.0)
    scores = np.maximum(scores, 0.0)
    total = scores.sum(axis=-1, keepdims=True)
    return np.where(total > 0, scores / np.where(total > 0, total, 1.0), _equal(eligible))


def _median_ignoring_nan(values: np.ndarray) -> np.ndarray:
    """np.nanmedian over the last axis (keepdims), np.median for the rows without NaN:
    nanmedian's NaN handling costs 3x and most rows have none."""
    if values.ndim == 1:
        return np.asarray(np.nanmedian(values, keepdims=True))
    gaps = np.isnan(values).any(axis=-1)
    out = np.empty((*values.shape[:-1], 1))
    if (~gaps).any():
        out[~gaps] = np.median(values[~gaps], axis=-1, keepdims=True)
    if gaps.any():
        out[gaps] = np.nanmedian(values[gaps], axis=-1, keepdims=True)
    return out


def target_weights(
    momentum: np.ndarray,
    volatility: np.ndarray,
    eligible: np.ndarray,
    params: StrategyParams,
    market_caps: np.ndarray | None = None,
) -> np.ndarray:
    """Mix of momentum, market-cap and risk-parity weights over the eligible assets.

    Arrays are (assets,) or (rebalances, assets). Momentum: assets above daily_drop_threshold,
    negative momentum as 0, normalised; equal weight if that leaves nothing. Market cap: caps
    normalised, equal weight without caps. Risk parity: inverse volatility, normalised; an
    asset without a usable volatility (< 2 returns, or 0) gets the median inverse volatility of
    the others (neutral), and equal weight when no asset has one.
    """
    eligible = np.asarray(eligible, dtype=bool)
    equal = _equal(eligible)
    qualifies = eligible & (momentum > params.daily_drop_threshold)
    scores = np.where(qualifies, np.clip(np.nan_to_num(momentum), 0.0, None), 0.0)
    total = scores.sum(axis=-1, keepdims=True)
    w_momentum = np.where(total > 0, scores / np.where(total > 0, total, 1.0), equal)
    w_cap = equal if market_caps is None else _normalise(market_caps, eligible)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(eligible & (volatility > 0), 1.0 / volatility, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no asset has a vol
        # np.median when nothing is missing: nanmedian's NaN handling costs 3x on big arrays
        neutral = _median_ignoring_nan(inverse)
    inverse = np.where(eligible & np.isnan(inverse), neutral, inverse)
    w_risk = _normalise(inverse, eligible)  # all NaN -> equal weight
    mixed = (
        params.momentum_weight * w_momentum
        + params.market_cap_weight * w_cap
        + params.risk_parity_weight * w_risk
    )
    return _normalise(mixed, eligible)


# --- 5. the index ---------------------------------------------------------------------------


def index_values(
    returns: np.ndarray, rows: np.ndarray, weights: np.ndarray, base: float = 100.0
) -> np.ndarray:
    """Index level from rows[0] (`base`) to the last row, holdings drifting between rebalances.

    Weights k are bought at the close of rows[k] and held (buy and hold) to the close of
    rows[k + 1]: w_i(t+1) = w_i(t)(1 + r_i(t+1)) / (1 + R_p(t+1)), R_p = sum w_i r_i, which is
    level x sum_i w_i x prod(1 + r_i). A missing return counts 0 (the last close is kept).
    """
    growth = np.where(np.isnan(returns), 1.0, 1.0 + returns)
    first = int(rows[0])
    values = np.empty(returns.shape[0] - first)
    values[0] = base
    bounds = [*rows.tolist(), returns.shape[0] - 1]
    for k in range(len(rows)):
        held, until = bounds[k], bounds[k + 1]  # earns the returns of rows held+1 .. until
        if until > held:
            level = values[held - first]
            grown = np.cumprod(growth[held + 1 : until + 1], axis=0) @ weights[k]
            values[held + 1 - first : until + 1 - first] = level * grown
    return values


def compute_index(
    dates: np.ndarray,
    symbols: Sequence[str],
    closes: np.ndarray,
    params: StrategyParams | None = None,
    market_caps: np.ndarray | None = None,
    anchor: Anchor | None = None,
) -> IndexResult:
    """Index values (base 100) and target weights at each rebalance date (DOMAIN.md steps 1-5).

    The index starts on the first date an asset is eligible. A date on which none is, is never
    a rebalance date (the holdings keep drifting). With an anchor it starts on the anchor's
    date at the anchor's value instead, a rebalance date, and the rebalances go on from it as
    from any other; the anchor needs warmup_rows(params) rows of prices before it. Raises
    NotEnoughData when no asset is ever eligible (or none on the anchor's date), ValueError on
    inconsistent arrays or an unusable anchor.
    """
    params = params or StrategyParams()
    dates = np.asarray(dates, dtype="datetime64[D]")
    closes = np.array(closes, dtype=float, order="F")  # a copy, column-major: per-asset sums
    if closes.ndim != 2 or closes.shape != (len(dates), len(symbols)):
        raise ValueError(
            f"closes has shape {closes.shape}, expected ({len(dates)}, {len(symbols)})"
        )
    if market_caps is not None:
        market_caps = np.asarray(market_caps, dtype=float)
        if market_caps.shape != closes.shape:
            raise ValueError(f"market_caps has shape {market_caps.shape}, expected {closes.shape}")
    if np.any(np.diff(dates) <= np.timedelta64(0, "D")):
        raise ValueError("dates must be strictly increasing")
    anchor_row = None if anchor is None else _anchor_row(dates, anchor, params)

    # 1. Cleaning: invalid closes (<= 0, not finite) are missing; short gaps filled.
    with np.errstate(invalid="ignore"):
        closes[~((closes > 0) & (closes != np.inf))] = np.nan
    filled = forward_fill(closes, params.max_forward_fill_days)
    eligible = eligibility(filled, params.min_price)

    # 2.-3. Returns, rebalance dates, lookback statistics (data up to the day before).
    # Column blocks: every step of the cleaning is per asset, and a block's temporaries stay
    # in the CPU cache (a third quicker than whole-matrix passes on 500 assets x 10 years).
    returns = np.empty(filled.shape, order="F")
    for first in range(0, filled.shape[1], COLUMN_BLOCK):
        block = slice(first, first + COLUMN_BLOCK)
        returns[:, block] = clean_returns(filled[:, block], params)
    allowed = np.any(eligible, axis=1)
    if anchor_row is not None and not allowed[anchor_row]:
        raise NotEnoughData(f"no asset is eligible on the anchor date {dates[anchor_row]}")
    rows = rebalance_rows(dates, params.rebalance_frequency, allowed, anchor_row)
    if len(rows) == 0:
        raise NotEnoughData(
            f"no asset is eligible on any of the {len(dates)} dates: one needs a close >= "
            f"min_price {params.min_price:g} and {MIN_LISTED_DAYS} days of prices with fewer "
            f"than {MAX_MISSING_FRACTION:.0%} missing"
        )
    momentum, volatility, _ = lookback_stats(returns, rows)

    # 4. Target weights.
    weights = target_weights(
        momentum,
        volatility,
        eligible[rows],
        params,
        None if market_caps is None else market_caps[rows],
    )

    # 5. Index values.
    return IndexResult(
        dates=dates[rows[0] :],
        values=index_values(returns, rows, weights, 100.0 if anchor is None else anchor.value),
        symbols=list(symbols),
        rebalance_dates=dates[rows],
        weights=weights,
    )


def _anchor_row(dates: np.ndarray, anchor: Anchor, params: StrategyParams) -> int:
    """The row of the anchor's date, checked: a date of the matrix with enough rows before it."""
    value = anchor.value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < np.inf:
        raise ValueError(f"anchor value must be a positive finite number, not {value!r}")
    day = np.datetime64(anchor.date, "D")
    row = int(np.searchsorted(dates, day))
    if row == len(dates) or dates[row] != day:
        raise ValueError(f"anchor date {day} is not one of the dates")
    need = warmup_rows(params)
    if row < need:
        raise ValueError(
            f"anchor date {day} has {row} rows of prices before it, fewer than the "
            f"{need} an anchored index needs (warmup_rows)"
        )
    return row
