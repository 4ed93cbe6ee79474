"""The synthetic provider, the in-process rate limiter and get_provider (tasks.market_data).

Pure: no server. The Redis-shared limiter is tested in tests/integration/test_rate_limiter.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest

from limiter_load import hammer, max_in_any_window
from tasks.market_data import (
    SEED_ASSETS,
    Bar,
    FetchResult,
    LocalRateLimiter,
    MarketDataProvider,
    ProviderConfigError,
    SyntheticProvider,
    TwelveDataProvider,
    get_provider,
)
from tasks.market_data.base import bars_from_columns
from tasks.market_data.synthetic import ANCHOR, ORIGIN, SEED_PARAMS, asset_params
from tasks.settings import Settings

D = dt.date
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SEED_SYMBOLS = [a["symbol"] for a in SEED_ASSETS]


def by_symbol(result: FetchResult) -> dict[str, list[Bar]]:
    out: dict[str, list[Bar]] = defaultdict(list)
    for bar in result.bars:
        out[bar.symbol].append(bar)
    return out


# --- synthetic: determinism ----------------------------------------------------------------


def test_a_days_bar_does_not_depend_on_the_requested_window() -> None:
    wide = SyntheticProvider().fetch_daily(["AAPL", "TLT", "ZZZ"], D(2005, 1, 1), D(2026, 12, 31))
    index = {(b.symbol, b.date): b for b in wide.bars}
    for start, end in [(D(2021, 3, 1), D(2021, 3, 5)), (D(2010, 6, 30), D(2010, 7, 2))]:
        for symbol in ("AAPL", "TLT", "ZZZ"):
            narrow = SyntheticProvider().fetch_daily([symbol], start, end).bars
            assert narrow and narrow == [index[(symbol, b.date)] for b in narrow]


def test_a_cached_path_extended_later_equals_one_drawn_at_once() -> None:
    growing = SyntheticProvider()
    early = growing.fetch_daily(["MSFT"], D(2001, 1, 1), D(2001, 1, 31)).bars
    late = growing.fetch_daily(["MSFT"], D(2040, 1, 1), D(2040, 1, 31)).bars  # extends the path
    fresh = SyntheticProvider()
    assert fresh.fetch_daily(["MSFT"], D(2040, 1, 1), D(2040, 1, 31)).bars == late
    assert fresh.fetch_daily(["MSFT"], D(2001, 1, 1), D(2001, 1, 31)).bars == early


def test_prices_are_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import datetime as d; from tasks.market_data import SyntheticProvider as S;"
        "r = S().fetch_daily(['QWERTY', 'AAPL'], d.date(2024, 5, 1), d.date(2024, 5, 3));"
        "print(repr([(b.symbol, b.close, b.volume) for b in r.bars]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    here = SyntheticProvider().fetch_daily(["QWERTY", "AAPL"], D(2024, 5, 1), D(2024, 5, 3))
    assert out.strip() == repr([(b.symbol, b.close, b.volume) for b in here.bars])


def test_fast_built_bars_are_genuine_frozen_bars() -> None:
    [fast] = bars_from_columns("X", [D(2024, 1, 2)], [2.5], [2.0], [3.0], [1.5], [10])
    slow = Bar("X", D(2024, 1, 2), 2.5, 2.0, 3.0, 1.5, 10)
    assert type(fast) is Bar and fast == slow and hash(fast) == hash(slow)
    assert dataclasses.astuple(fast) == ("X", D(2024, 1, 2), 2.5, 2.0, 3.0, 1.5, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.close = 1.0  # type: ignore[misc]


# --- synthetic: shape of the data ----------------------------------------------------------


def test_bars_are_the_business_days_of_the_window_both_ends_included() -> None:
    start, end = D(2024, 1, 1), D(2024, 3, 29)  # Monday .. Friday
    result = SyntheticProvider().fetch_daily(["NVDA", "GLD"], start, end)
    days = by_symbol(result)
    expected = int(np.busday_count(start, end + dt.timedelta(days=1)))
    for bars in days.values():
        dates = [b.date for b in bars]
        assert len(dates) == expected == 65
        assert dates[0] == start and dates[-1] == end
        assert all(d.weekday() < 5 for d in dates)
        assert dates == sorted(set(dates))
    weekend = SyntheticProvider().fetch_daily(["NVDA"], D(2024, 1, 6), D(2024, 1, 7))
    assert weekend.bars == [] and weekend.unknown == []


def test_windows_outside_the_history_or_reversed_are_empty() -> None:
    p = SyntheticProvider()
    assert p.fetch_daily(["AAPL"], D(1990, 1, 1), D(1999, 12, 31)).bars == []
    assert p.fetch_daily(["AAPL"], D(2024, 2, 1), D(2024, 1, 1)).bars == []
    first = p.fetch_daily(["AAPL"], D(1990, 1, 1), D(2000, 1, 7)).bars
    assert [b.date for b in first] == [ORIGIN + dt.timedelta(days=i) for i in range(5)]


def test_ohlc_volume_are_consistent_for_every_bar() -> None:
    symbols = [*SEED_SYMBOLS, "ABC", "XYZ.L", "BRK.B"]
    result = SyntheticProvider().fetch_daily(symbols, D(2000, 1, 1), D(2026, 12, 31))
    assert len(result.bars) == len(symbols) * int(np.busday_count(ORIGIN, D(2027, 1, 1)))
    for bar in result.bars:
        assert bar.open is not None and bar.high is not None and bar.low is not None
        assert 0 < bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high
        assert isinstance(bar.volume, int) and bar.volume > 0
        assert math.isfinite(bar.close) and round(bar.close, 4) == bar.close


def test_seed_assets_close_at_their_reference_price_and_move_with_their_volatility() -> None:
    result = SyntheticProvider().fetch_daily(SEED_SYMBOLS, D(2000, 1, 1), D(2025, 12, 31))
    for symbol, bars in by_symbol(result).items():
        params = SEED_PARAMS[symbol]
        anchor = next(b for b in bars if b.date == ANCHOR)
        assert anchor.close == pytest.approx(params.price, abs=1e-4)
        closes = np.array([b.close for b in bars])
        vol = float(np.std(np.diff(np.log(closes))) * math.sqrt(252))
        assert vol == pytest.approx(params.vol, rel=0.1), symbol
        # 2018 onwards (the default history) stays above the strategy's 1.0 min_price
        assert min(b.close for b in bars if b.date >= ANCHOR) > 1.0, symbol


def test_symbols_differ_and_spy_tracks_the_sp500() -> None:
    bars = by_symbol(SyntheticProvider().fetch_daily(SEED_SYMBOLS, D(2023, 1, 1), D(2023, 12, 31)))
    returns = {s: np.diff(np.log([b.close for b in bs])) for s, bs in bars.items() if s != "SPY"}
    corr = np.corrcoef(np.array(list(returns.values())))
    off_diagonal = corr[~np.eye(len(returns), dtype=bool)]
    assert np.all(np.abs(off_diagonal) < 0.5)  # independent paths
    ratio = [s.close / g.close for s, g in zip(bars["SPY"], bars["^GSPC"], strict=True)]
    assert max(ratio) - min(ratio) < 1e-3  # SPY is a tenth of the index, day by day


def test_unknown_symbols_get_a_stable_class_and_level() -> None:
    a, b = asset_params("FOO"), asset_params("FOO")
    assert a == b and 10 <= a.price < 500 and a.asset_class in {
        "technology", "consumer_discretionary", "communication", "benchmark", "commodities",
        "bonds",
    }  # fmt: skip
    assert len({asset_params(f"S{i}").asset_class for i in range(60)}) > 3


def test_invalid_looking_symbols_are_reported_unknown_and_duplicates_fetched_once() -> None:
    p = SyntheticProvider(unknown_symbols=["DELISTED"])
    result = p.fetch_daily(
        ["AAPL", "INVALID_X", "invalid2", "", "not a ticker", "DELISTED", "AAPL", "MSFT"],
        D(2024, 1, 2),
        D(2024, 1, 3),
    )
    assert result.unknown == ["INVALID_X", "invalid2", "", "not a ticker", "DELISTED"]
    assert [(b.symbol, b.date) for b in result.bars] == [
        ("AAPL", D(2024, 1, 2)), ("AAPL", D(2024, 1, 3)),
        ("MSFT", D(2024, 1, 2)), ("MSFT", D(2024, 1, 3)),
    ]  # fmt: skip
    assert result.invalid == {}


def test_many_symbols_over_ten_years_are_fast() -> None:
    p = SyntheticProvider()
    symbols = [f"BENCH{i}" for i in range(300)]
    started = time.process_time()
    result = p.fetch_daily(symbols, D(2015, 1, 1), D(2024, 12, 31))
    spent = time.process_time() - started
    assert len(result.bars) == 300 * int(np.busday_count(D(2015, 1, 1), D(2025, 1, 1)))
    # ~0.6 s on an idle core (500 symbols: ~1 s); CPU time, so a busy machine does not count
    assert spent < 4.0


def test_seed_universe_matches_the_domain() -> None:
    assert SEED_SYMBOLS == [
        "AAPL", "MSFT", "GOOGL", "NVDA", "AMZN", "TSLA", "META", "SPY", "^GSPC",
        "GLD", "SLV", "USO", "TLT", "IEF",
    ]  # fmt: skip
    classes = {a["symbol"]: a["asset_class"] for a in SEED_ASSETS}
    assert {s for s, c in classes.items() if c == "technology"} == {"AAPL", "MSFT", "GOOGL", "NVDA"}
    assert {s for s, c in classes.items() if c == "bonds"} == {"TLT", "IEF"}
    assert {s for s, c in classes.items() if c == "commodities"} == {"GLD", "SLV", "USO"}
    assert [a["symbol"] for a in SEED_ASSETS if a["is_benchmark"]] == ["^GSPC"]
    assert all(a["is_active"] and a["name"] and a["sector"] for a in SEED_ASSETS)
    assert next(a for a in SEED_ASSETS if a["symbol"] == "^GSPC")["name"] == "S&P 500"


# --- rate limiters ---------------------------------------------------------------------------


def test_local_limiter_has_the_same_contract() -> None:
    limiter = LocalRateLimiter(limit=2, period=0.5)
    assert limiter.acquire() == 0.0 and limiter.acquire() == 0.0
    wait = limiter.acquire()
    assert 0.3 < wait <= 0.5
    time.sleep(wait + 0.01)
    assert limiter.acquire() == 0.0
    shared = LocalRateLimiter(limit=4, period=0.3)
    grants = hammer(lambda: shared, 6, 0.8)
    assert max_in_any_window(grants, 0.3 - 0.01) <= 4 and len(grants) >= 8


def test_local_limiter_caps_the_day_and_waits_until_midnight_utc() -> None:
    limiter = LocalRateLimiter(limit=20, period=60.0, per_day=10)
    assert limiter.acquire(8) == 0.0
    wait = limiter.acquire(3)  # 11 > 10 a day, though the minute has credits left
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert wait == pytest.approx((midnight - now).total_seconds(), abs=2)
    assert limiter.acquire(2) == 0.0  # exactly the day's 10


def test_limiters_refuse_a_negative_day_cap() -> None:
    with pytest.raises(ValueError, match="per_day"):
        LocalRateLimiter(limit=8, per_day=-1)


# --- get_provider --------------------------------------------------------------------------


def test_get_provider_defaults_to_synthetic_and_reuses_it() -> None:
    settings = Settings(market_data_provider="synthetic")
    provider = get_provider(settings)
    assert isinstance(provider, SyntheticProvider) and provider.name == "synthetic"
    assert isinstance(provider, MarketDataProvider)
    assert get_provider(settings) is provider


def test_twelvedata_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ProviderConfigError, match="TWELVEDATA_API_KEY"):
        TwelveDataProvider(api_key="", base_url="http://127.0.0.1:9")
