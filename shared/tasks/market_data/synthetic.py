"""The offline provider: deterministic daily bars, no network (the default; tests, benchmarks).

Each symbol follows a geometric Brownian motion on business days (Monday to Friday, no holiday
calendar) from ``ORIGIN``. Its random shocks come in blocks of ``BLOCK`` business days, each
block drawn from a generator seeded by (a stable hash of the symbol, the block number), so the
path is generated from the origin forwards and sliced: the bar of a (symbol, day) never
depends on the requested window, overlapping refreshes upsert identical values, and extending
a cached path later gives the same numbers as generating it at once.

Levels are anchored on ``ANCHOR`` (2018-01-02, the default history start): a seed asset closes
near its real split-adjusted price that day and wanders from there with the drift and
volatility of its asset class. SPY shares the shocks of ^GSPC (a tracker, one tenth of the
index), as in the market. Unknown symbols get a class and a price level from their hash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.market_data.base import Bar, FetchResult, bars_from_columns

ORIGIN = dt.date(2000, 1, 3)  # a Monday: business day 0
ANCHOR = dt.date(2018, 1, 2)  # business day whose close is the asset's reference price
BLOCK = 1024  # business days drawn from one seeded generator
TRADING_DAYS = 252

_ORIGIN64 = np.datetime64(ORIGIN, "D")

# asset class -> (annual drift, annual volatility), used by symbols outside the seed universe
CLASS_PARAMS: dict[str, tuple[float, float]] = {
    "technology": (0.18, 0.32),
    "consumer_discretionary": (0.12, 0.35),
    "communication": (0.10, 0.32),
    "benchmark": (0.08, 0.18),
    "commodities": (0.03, 0.25),
    "bonds": (0.02, 0.08),
}

_SECTORS = {
    "technology": "Information Technology",
    "consumer_discretionary": "Consumer Discretionary",
    "communication": "Communication Services",
    "benchmark": "Broad Market",
    "commodities": "Commodities",
    "bonds": "Fixed Income",
}


@dataclass(frozen=True, slots=True)
class AssetParams:
    """How a symbol's synthetic path is drawn."""

    asset_class: str
    price: float  # close on ANCHOR
    drift: float  # annual
    vol: float  # annual
    volume: float  # typical shares a day
    path_of: str | None = None  # draw the shocks of another symbol (a tracker)


# symbol, name, class, kind, split-adjusted close on 2018-01-02, drift, volatility, volume
_SEED_TABLE: list[tuple[str, str, str, str, float, float, float, float]] = [
    ("AAPL", "Apple Inc.", "technology", "stock", 43.07, 0.20, 0.28, 1.0e8),
    ("MSFT", "Microsoft Corporation", "technology", "stock", 85.95, 0.20, 0.26, 2.5e7),
    ("GOOGL", "Alphabet Inc. Class A", "technology", "stock", 53.66, 0.15, 0.28, 3.0e7),
    ("NVDA", "NVIDIA Corporation", "technology", "stock", 4.98, 0.35, 0.50, 4.0e8),
    ("AMZN", "Amazon.com, Inc.", "consumer_discretionary", "stock", 59.45, 0.15, 0.32, 6.0e7),
    ("TSLA", "Tesla, Inc.", "consumer_discretionary", "stock", 21.37, 0.30, 0.60, 1.0e8),
    ("META", "Meta Platforms, Inc.", "communication", "stock", 181.42, 0.12, 0.38, 1.8e7),
    ("SPY", "SPDR S&P 500 ETF Trust", "benchmark", "etf", 268.77, 0.10, 0.18, 8.0e7),
    ("^GSPC", "S&P 500", "benchmark", "index", 2695.81, 0.10, 0.18, 3.5e9),
    ("GLD", "SPDR Gold Shares", "commodities", "etf", 125.15, 0.07, 0.15, 8.0e6),
    ("SLV", "iShares Silver Trust", "commodities", "etf", 16.27, 0.05, 0.28, 1.5e7),
    ("USO", "United States Oil Fund", "commodities", "etf", 97.60, -0.02, 0.40, 4.0e6),
    ("TLT", "iShares 20+ Year Treasury Bond ETF", "bonds", "etf", 126.24, 0.01, 0.15, 1.0e7),
    ("IEF", "iShares 7-10 Year Treasury Bond ETF", "bonds", "etf", 105.50, 0.015, 0.07, 4.0e6),
]

BENCHMARK_SYMBOLS = frozenset({"^GSPC"})

#: The seed universe (DOMAIN.md): what ``waardhaven-tasks seed`` inserts.
SEED_ASSETS: list[dict[str, Any]] = [
    {
        "symbol": symbol,
        "name": name,
        "asset_class": asset_class,
        "sector": _SECTORS[asset_class],
        "kind": kind,
        "is_active": True,
        "is_benchmark": symbol in BENCHMARK_SYMBOLS,
    }
    for symbol, name, asset_class, kind, *_ in _SEED_TABLE
]

SEED_PARAMS: dict[str, AssetParams] = {
    symbol: AssetParams(asset_class, price, drift, vol, volume)
    for symbol, _, asset_class, _, price, drift, vol, volume in _SEED_TABLE
}
SEED_PARAMS["SPY"] = AssetParams("benchmark", 268.77, 0.10, 0.18, 8.0e7, path_of="^GSPC")

# What a ticker looks like: letters, digits, a leading ^ (indices), . - / = : _ inside.
_TICKER = re.compile(r"^\^?[A-Za-z0-9][A-Za-z0-9.\-/=:_]{0,19}$")


def stable_hash(text: str) -> int:
    """64 bits of SHA-256: the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def asset_params(symbol: str) -> AssetParams:
    """The seed table's entry, or a class, level and volume derived from the symbol's hash."""
    if symbol in SEED_PARAMS:
        return SEED_PARAMS[symbol]
    h = stable_hash(symbol)
    classes = sorted(CLASS_PARAMS)
    asset_class = classes[h % len(classes)]
    drift, vol = CLASS_PARAMS[asset_class]
    price = 10.0 + (h >> 8) % 49_000 / 100.0  # 10.00 .. 499.99
    volume = 10 ** (5 + (h >> 24) % 300 / 100.0)  # 1e5 .. 1e8
    return AssetParams(asset_class, price, drift, vol, volume)


def _rng(seed: int, block: int, stream: int) -> np.random.Generator:
    """Stream 0: the close shocks of a block; stream 1: its intraday decorations."""
    return np.random.default_rng([seed, block, stream])


def _day_index(day: dt.date) -> int:
    """Business days in [ORIGIN, day): the index of `day` if it is a business day."""
    return int(np.busday_count(_ORIGIN64, np.datetime64(day, "D")))


_ANCHOR_INDEX = _day_index(ANCHOR)


class _Calendar:
    """Business days from ORIGIN as ``datetime.date`` objects, shared by every symbol."""

    def __init__(self) -> None:
        self.days: list[dt.date] = []

    def ensure(self, n: int) -> list[dt.date]:
        if len(self.days) < n:
            n = max(n, len(self.days) + BLOCK)
            offsets = np.arange(len(self.days), n)
            new = np.busday_offset(_ORIGIN64, offsets, roll="forward").astype(object)
            self.days.extend(new.tolist())
        return self.days


class SyntheticProvider:
    """Deterministic geometric Brownian motion per symbol; see the module docstring.

    ``unknown_prefixes`` / ``unknown_symbols``: symbols reported as unknown (case-insensitive),
    besides anything that does not look like a ticker; tests use them to exercise that path.
    """

    name = "synthetic"
    credits_per_minute: int | None = None  # no quota: a large refresh runs as chunk tasks

    def __init__(
        self,
        batch_size: int = 100,
        unknown_prefixes: Iterable[str] = ("INVALID",),
        unknown_symbols: Iterable[str] = (),
        max_cached_symbols: int = 2000,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.unknown_prefixes = tuple(p.upper() for p in unknown_prefixes)
        self.unknown_symbols = frozenset(s.upper() for s in unknown_symbols)
        self._max_cached = max_cached_symbols
        self._calendar = _Calendar()
        # seed symbol -> cumulative log returns X[0..n) (X[-1] = 0): the close path
        self._paths: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def is_known(self, symbol: str) -> bool:
        if not isinstance(symbol, str) or not _TICKER.match(symbol):
            return False
        upper = symbol.upper()
        return upper not in self.unknown_symbols and not upper.startswith(self.unknown_prefixes)

    # --- paths --------------------------------------------------------------------------

    def _log_path(self, seed_symbol: str, params: AssetParams, n: int) -> np.ndarray:
        """Cumulative log returns of the first >= n business days (cached, extended by block)."""
        path = self._paths.get(seed_symbol)
        if path is not None and len(path) >= n:
            self._paths.move_to_end(seed_symbol)
            return path
        have = 0 if path is None else len(path)
        blocks = range(have // BLOCK, math.ceil(n / BLOCK))
        mu = (params.drift - params.vol**2 / 2) / TRADING_DAYS
        sigma = params.vol / math.sqrt(TRADING_DAYS)
        seed = stable_hash(seed_symbol)
        shocks = [_rng(seed, k, 0).standard_normal(BLOCK) for k in blocks]
        start = 0.0 if path is None or not have else float(path[-1])
        new = start + np.cumsum(mu + sigma * np.concatenate(shocks))
        path = new if path is None else np.concatenate((path, new))
        self._paths[seed_symbol] = path
        while len(self._paths) > self._max_cached:
            self._paths.popitem(last=False)
        return path

    def _bars(self, symbol: str, a: int, b: int) -> list[Bar]:
        """Bars of business days [a, b)."""
        params = asset_params(symbol)
        seed_symbol = params.path_of or symbol
        with self._lock:
            x = self._log_path(seed_symbol, params, max(b, _ANCHOR_INDEX + 1))
            days = self._calendar.ensure(b)
        sigma = params.vol / math.sqrt(TRADING_DAYS)
        level = math.log(params.price) - float(x[_ANCHOR_INDEX])
        x_close = x[a:b]
        x_prev = np.concatenate(([x[a - 1] if a else 0.0], x_close[:-1]))
        # Intraday decorations: their own generator per block, drawn only for what is asked.
        seed = stable_hash(seed_symbol)
        k0 = a // BLOCK
        blocks = range(k0, math.ceil(b / BLOCK))
        draws = [_rng(seed, k, 1).standard_normal((4, BLOCK), dtype=np.float32) for k in blocks]
        deco = np.concatenate(draws, axis=1)[:, a - k0 * BLOCK : b - k0 * BLOCK]
        gap, up, down, vol_noise = deco
        close = np.round(np.exp(level + x_close), 4)
        open_ = np.round(np.exp(level + x_prev + 0.3 * sigma * gap), 4)
        high = np.round(np.maximum(open_, close) * np.exp(0.5 * sigma * np.abs(up)), 4)
        low = np.round(np.minimum(open_, close) * np.exp(-0.5 * sigma * np.abs(down)), 4)
        floor = 0.0001
        close, open_ = np.maximum(close, floor), np.maximum(open_, floor)
        high = np.maximum(high, np.maximum(open_, close))  # rounding must not break the order
        low = np.maximum(np.minimum(low, np.minimum(open_, close)), floor / 2)
        surprise = np.abs(x_close - x_prev - (params.drift / TRADING_DAYS)) / sigma
        volume = (params.volume * np.exp(0.25 * vol_noise + 0.3 * surprise - 0.2)).astype(np.int64)
        return bars_from_columns(
            symbol,
            days[a:b],
            close.tolist(),
            open_.tolist(),
            high.tolist(),
            low.tolist(),
            np.maximum(volume, 1).tolist(),
        )

    # --- provider -----------------------------------------------------------------------

    def fetch_daily(self, symbols: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        result = FetchResult()
        first = max(start, ORIGIN)
        a, b = 0, 0
        if first <= end:
            a, b = _day_index(first), _day_index(end + dt.timedelta(days=1))
        with _gc_paused((b - a) * len(symbols) > 50_000):
            for symbol in dict.fromkeys(symbols):  # each symbol once, in order
                if not self.is_known(symbol):
                    result.unknown.append(symbol)
                elif b > a:
                    result.bars.extend(self._bars(symbol, a, b))
        return result


@contextlib.contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Millions of Bars are acyclic; the cyclic collector scanning them doubles the cost."""
    was_enabled = gc.isenabled()
    if pause and was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if pause and was_enabled:
            gc.enable()
