"""Market-data providers: ``get_provider(settings, redis_client)`` returns the configured one.

- ``synthetic`` (default): deterministic prices, no network (tests, benchmarks, local runs).
- ``twelvedata``: the real API; credits (per minute and per UTC day) shared by all workers
  through Redis.

Every provider answers ``fetch_daily(symbols, start, end) -> FetchResult`` in batches of at
most ``provider.batch_size`` symbols, and raises ``TransientProviderError`` (retry with backoff;
``RateLimited`` carries the wait for credits), ``DailyQuotaExhausted`` (stop until tomorrow)
or ``ProviderConfigError`` (do not retry). ``plan.py`` plans a refresh.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tasks.market_data.base import (
    Bar,
    DailyQuotaExhausted,
    FetchResult,
    MarketDataProvider,
    ProviderConfigError,
    ProviderError,
    RateLimited,
    TransientProviderError,
)
from tasks.market_data.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from tasks.market_data.synthetic import SEED_ASSETS, SyntheticProvider
from tasks.market_data.twelvedata import TwelveDataProvider, limiter_key
from tasks.settings import Settings

__all__ = [
    "SEED_ASSETS",
    "Bar",
    "DailyQuotaExhausted",
    "FetchResult",
    "LocalRateLimiter",
    "MarketDataProvider",
    "ProviderConfigError",
    "ProviderError",
    "RateLimited",
    "RateLimiter",
    "RedisRateLimiter",
    "SyntheticProvider",
    "TransientProviderError",
    "TwelveDataProvider",
    "get_provider",
]

SYNTHETIC_BATCH_SIZE = 100
CREDIT_PERIOD = 60.0  # PROVIDER_CREDITS_PER_MINUTE

_cache: dict[tuple[Any, ...], MarketDataProvider] = {}
_cache_lock = threading.Lock()


def _redis_identity(client: Any) -> tuple[Any, ...]:
    """Which Redis a client talks to (callers may pass a fresh client each time)."""
    if client is None:
        return ()
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {})
    keys = ("host", "port", "db", "path", "username", "password")
    # A Sentinel-managed pool has no host: it names the master it follows.
    return (getattr(pool, "service_name", None), *((k, kwargs.get(k)) for k in keys))


def build_provider(settings: Settings, redis_client: Any = None) -> MarketDataProvider:
    """A new provider as the settings describe it (``get_provider`` caches these)."""
    if settings.market_data_provider == "synthetic":
        return SyntheticProvider(batch_size=SYNTHETIC_BATCH_SIZE)
    api_key = settings.twelvedata_api_key
    if not api_key:
        raise ProviderConfigError("TWELVEDATA_API_KEY is required with the twelvedata provider")
    credits, per_day = settings.provider_credits_per_minute, settings.provider_credits_per_day
    limiter: RateLimiter = (
        RedisRateLimiter(redis_client, limiter_key(api_key), credits, CREDIT_PERIOD, per_day)
        if redis_client is not None
        else LocalRateLimiter(credits, CREDIT_PERIOD, per_day)  # one process only: CLI, tests
    )
    return TwelveDataProvider(
        api_key=api_key,
        base_url=settings.twelvedata_url,
        limiter=limiter,
        batch_size=settings.provider_batch_size,
        timeout=settings.provider_timeout,
    )


def get_provider(settings: Settings, redis_client: Any = None) -> MarketDataProvider:
    """The provider MARKET_DATA_PROVIDER names, one per process, settings and Redis.

    Reused across tasks: it keeps HTTP connections and the synthetic price paths. Keyed by
    the process id too, so a forked worker child never shares its parent's connections.
    Without ``redis_client`` the TwelveData limit is counted in this process only.
    """
    key = (os.getpid(), settings, _redis_identity(redis_client))
    with _cache_lock:
        provider = _cache.get(key)
        if provider is None:
            provider = _cache[key] = build_provider(settings, redis_client)
        return provider
