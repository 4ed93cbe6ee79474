"""The index algorithm written plainly: DOMAIN.md compute_index steps 1-5, read line by line.

Loops over days and assets, plain floats, no running sums and no vectorisation, so that each
rule can be checked by reading it. The property tests compare `tasks.index.compute_index` with
it. Where DOMAIN.md is silent, it follows the documented choices of tasks.index: a rebalance
happens at the close of its date, an asset without a usable volatility gets the median inverse
volatility of the others, and the index starts on the first date an asset is eligible.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from tasks.index import StrategyParams

REBALANCE_DAYS = {"daily": 1, "weekly": 7, "monthly": 30, "quarterly": 91, "yearly": 365}
LOOKBACK = 60  # trading days before a rebalance date
MOMENTUM = 20  # the last days of the lookback
OUTLIER_WINDOW = 60  # past returns an outlier is judged against
OUTLIER_MIN_HISTORY = 20  # past returns needed before the outlier rule applies
MAX_MISSING = 0.10  # of the lookback's days
MIN_LISTED = 20  # days since its first close a late listing needs


@dataclass
class ReferenceIndex:
    dates: list[np.datetime64]  # from the first rebalance date
    values: list[float]
    rebalance_dates: list[np.datetime64]
    weights: list[list[float]]  # per rebalance date, one weight per symbol


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def reference_index(
    dates: np.ndarray, closes: np.ndarray, params: StrategyParams
) -> ReferenceIndex | None:
    """None when no asset is ever eligible."""
    n, m = closes.shape

    # 1. The close matrix: invalid closes (<= 0, not finite) are missing.
    close: list[list[float | None]] = [[None] * m for _ in range(n)]
    for t in range(n):
        for j in range(m):
            c = float(closes[t, j])
            if math.isfinite(c) and c > 0:
                close[t][j] = c
    # Forward fill at most max_forward_fill_days after the last close.
    filled: list[list[float | None]] = [[None] * m for _ in range(n)]
    for j in range(m):
        last, last_row = None, -1
        for t in range(n):
            if close[t][j] is not None:
                last, last_row = close[t][j], t
                filled[t][j] = last
            elif last is not None and t - last_row <= params.max_forward_fill_days:
                filled[t][j] = last

    # Eligible at the close of day t, from what is known on day t.
    def eligible(t: int, j: int) -> bool:
        price = filled[t][j]
        if price is None or price < params.min_price:
            return False
        first_close = next(s for s in range(n) if filled[s][j] is not None)
        window = range(max(t - LOOKBACK, first_close), t)  # the lookback, or since listing
        if len(window) < MIN_LISTED:
            return False
        missing = sum(1 for s in window if filled[s][j] is None)
        return missing < MAX_MISSING * len(window)

    # 2. Simple daily returns, clipped; then outliers against the past returns only.
    clipped: list[list[float | None]] = [[None] * m for _ in range(n)]
    for t in range(1, n):
        for j in range(m):
            before, now = filled[t - 1][j], filled[t][j]
            if before is not None and now is not None:
                r = now / before - 1.0
                clipped[t][j] = min(max(r, params.min_daily_return), params.max_daily_return)
    returns = [row[:] for row in clipped]
    for t in range(n):
        for j in range(m):
            r = clipped[t][j]
            if r is None:
                continue
            past = [
                clipped[s][j]
                for s in range(max(t - OUTLIER_WINDOW, 0), t)
                if clipped[s][j] is not None
            ]
            if len(past) < OUTLIER_MIN_HISTORY:
                continue
            centre, spread = mean(past), sample_std(past)  # type: ignore[arg-type]
            if spread > 0 and abs(r - centre) > params.outlier_std_threshold * spread:
                returns[t][j] = statistics.median(past)  # type: ignore[type-var]

    # 3. Rebalance on the first date an asset is eligible, then on the first such date at least
    # N calendar days after the previous rebalance.
    step = np.timedelta64(REBALANCE_DAYS[params.rebalance_frequency], "D")
    rebalances: list[int] = []
    for t in range(n):
        due = not rebalances or dates[t] >= dates[rebalances[-1]] + step
        if due and any(eligible(t, j) for j in range(m)):
            rebalances.append(t)
    if not rebalances:
        return None

    # 4. Target weights from the lookback ending the day before the rebalance date.
    def weights_at(t: int) -> list[float]:
        ok = [eligible(t, j) for j in range(m)]
        count = sum(ok)
        equal = [1.0 / count if ok[j] else 0.0 for j in range(m)]

        def normalised(scores: list[float]) -> list[float]:
            total = sum(scores)
            return [s / total for s in scores] if total > 0 else equal

        lookback = range(max(t - LOOKBACK, 0), t)
        momentum_days = range(max(t - MOMENTUM, 0), t)
        momentum_scores, inverse_vols = [], []
        for j in range(m):
            growth = 1.0
            for s in momentum_days:
                if returns[s][j] is not None:
                    growth *= 1.0 + returns[s][j]  # type: ignore[operator]
            momentum = growth - 1.0
            qualifies = ok[j] and momentum > params.daily_drop_threshold
            momentum_scores.append(max(momentum, 0.0) if qualifies else 0.0)
            known = [returns[s][j] for s in lookback if returns[s][j] is not None]
            vol = sample_std(known) if len(known) >= 2 else 0.0  # type: ignore[arg-type]
            inverse_vols.append(1.0 / vol if ok[j] and vol > 0 else None)
        w_momentum = normalised(momentum_scores)
        w_cap = equal  # no market-cap data
        usable = [v for v in inverse_vols if v is not None]
        if usable:
            neutral = statistics.median(usable)
            risk = [
                (inverse_vols[j] if inverse_vols[j] is not None else neutral) if ok[j] else 0.0
                for j in range(m)
            ]
            w_risk = normalised(risk)  # type: ignore[arg-type]
        else:
            w_risk = equal
        mixed = [
            params.momentum_weight * w_momentum[j]
            + params.market_cap_weight * w_cap[j]
            + params.risk_parity_weight * w_risk[j]
            for j in range(m)
        ]
        return normalised(mixed)

    # 5. Holdings (money per asset) bought at the close of each rebalance date and left to
    # drift with prices; a missing return counts 0. Base 100 on the first rebalance date.
    weights: list[list[float]] = []
    holdings = [0.0] * m
    values: list[float] = []
    for t in range(rebalances[0], n):
        for j in range(m):
            if returns[t][j] is not None:
                holdings[j] *= 1.0 + returns[t][j]  # type: ignore[operator]
        value = 100.0 if t == rebalances[0] else sum(holdings)
        values.append(value)
        if t in rebalances:
            target = weights_at(t)
            weights.append(target)
            holdings = [value * w for w in target]
    return ReferenceIndex(
        dates=list(dates[rebalances[0] :]),
        values=values,
        rebalance_dates=[dates[t] for t in rebalances],
        weights=weights,
    )
