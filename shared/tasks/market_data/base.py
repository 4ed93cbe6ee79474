"""What every market-data provider returns and raises.

Errors keep their constructor arguments in ``args``: Celery stores a failed or retried task's
exception as JSON and rebuilds it from them, so ``RateLimited("...", 17.0)`` round-trips.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from itertools import repeat
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Bar:
    """One trading day of one symbol. Only ``close`` is required (and always > 0)."""

    symbol: str
    date: dt.date
    close: float
    open: float | None = None
    high: float | None = None
    low: float | None = None
    volume: int | None = None


# Building a frozen dataclass costs a generic object.__setattr__ per field (about 2 us a Bar);
# the synthetic provider makes millions. This twin has the same slots but a plain __init__;
# switching an instance's class to Bar afterwards is allowed (identical layout) and yields a
# genuine, immutable Bar four times faster.
_MutableBar: Any = make_dataclass(
    "_MutableBar", [(f.name, f.type) for f in fields(Bar)], slots=True
)


def _as_bar(*values: Any) -> Bar:
    bar = _MutableBar(*values)
    bar.__class__ = Bar
    return bar


def bars_from_columns(
    symbol: str,
    dates: Iterable[dt.date],
    closes: Iterable[float],
    opens: Iterable[float | None],
    highs: Iterable[float | None],
    lows: Iterable[float | None],
    volumes: Iterable[int | None],
) -> list[Bar]:
    """Bars of one symbol from columns of equal length (plain Python values)."""
    return list(map(_as_bar, repeat(symbol), dates, closes, opens, highs, lows, volumes))


@dataclass
class FetchResult:
    """What one ``fetch_daily`` call got.

    ``unknown`` and ``invalid`` symbols are reported to the operator and never retried: asking
    again gives the same answer. ``rows_dropped`` counts rows of otherwise good series that
    failed validation (no date, no positive close, duplicate date).
    """

    bars: list[Bar] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    rows_dropped: int = 0

    def extend(self, other: FetchResult) -> None:
        self.bars.extend(other.bars)
        self.unknown.extend(s for s in other.unknown if s not in self.unknown)
        self.invalid.update(other.invalid)
        self.rows_dropped += other.rows_dropped


class ProviderError(Exception):
    """Base of provider failures."""


class TransientProviderError(ProviderError):
    """Timeout, HTTP 5xx, connection error: the task retries with backoff."""


class RateLimited(TransientProviderError):
    """Out of provider credits: retry after ``retry_after`` seconds (a countdown, not a sleep)."""

    def __init__(self, message: str, retry_after: float = 60.0) -> None:
        retry_after = max(0.0, float(retry_after))
        super().__init__(message, retry_after)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.args[0]} (retry after {self.retry_after:.1f}s)"


class DailyQuotaExhausted(ProviderError):
    """The day's credits are spent: stop and go on tomorrow (``retry_after`` s), never retry."""

    def __init__(self, message: str, retry_after: float) -> None:
        retry_after = max(0.0, float(retry_after))
        super().__init__(message, retry_after)
        self.retry_after = retry_after

    def __str__(self) -> str:
        hours, rest = divmod(int(self.retry_after), 3600)
        return f"{self.args[0]} (credits return in {hours}h{rest // 60:02d}m)"


class ProviderConfigError(ProviderError):
    """A missing or refused API key, a bad URL: retrying cannot help."""


@runtime_checkable
class MarketDataProvider(Protocol):
    """Fetches daily bars; declares how many symbols one request may carry and its credits
    per minute (None: unlimited)."""

    name: str
    batch_size: int
    credits_per_minute: int | None

    def fetch_daily(self, symbols: Sequence[str], start: dt.date, end: dt.date) -> FetchResult:
        """Bars of ``symbols`` for every trading day in [start, end] (both included)."""
        ...
