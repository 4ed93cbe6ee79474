"""The Redis-shared rate limiter and the provider that uses it, against a real Redis.

The test session's own server (REDIS_URL), each test on a key of its own.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from limiter_load import hammer, max_in_any_window
from tasks.market_data import (
    LocalRateLimiter,
    RedisRateLimiter,
    TwelveDataProvider,
    get_provider,
)
from tasks.settings import Settings

REDIS_URL = os.environ["REDIS_URL"]


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def new_key() -> str:
    return f"test:ratelimit:{uuid.uuid4().hex}"


def test_redis_limiter_grants_the_limit_then_says_how_long_to_wait(rds: redis.Redis) -> None:
    limiter = RedisRateLimiter(rds, new_key(), limit=8, period=1.0)
    assert limiter.acquire(5) == 0.0
    assert limiter.acquire(3) == 0.0
    wait = limiter.acquire(1)
    assert 0.5 < wait <= 1.0
    assert limiter.acquire(1) > 0  # a refusal spends nothing, and nothing was freed yet
    time.sleep(max(0.0, wait - 0.25))
    assert limiter.acquire(1) > 0  # not before the promised time
    time.sleep(0.3)
    assert limiter.acquire(8) == 0.0  # the whole window is free again
    assert 0 < rds.pttl(limiter.key) <= 1000  # the log expires with the window


def test_redis_limiter_caps_the_utc_day_across_clients(rds: redis.Redis) -> None:
    key = new_key()
    first = RedisRateLimiter(rds, key, limit=20, period=60.0, per_day=10)
    second = RedisRateLimiter(
        redis.Redis.from_url(REDIS_URL), key, limit=20, period=60.0, per_day=10
    )
    assert first.acquire(8) == 0.0
    wait = second.acquire(3)  # 11 > 10 today, though the minute has credits left
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert wait == pytest.approx((midnight - now).total_seconds(), abs=2)
    assert wait > first.period  # how the provider tells the day from the minute
    assert second.acquire(2) == 0.0  # exactly the day's 10
    assert first.acquire(1) > first.period
    day_keys = list(rds.scan_iter(key + ":day:*"))
    assert len(day_keys) == 1 and int(rds.get(day_keys[0]) or 0) == 10
    assert 86400 * 1000 < rds.pttl(day_keys[0]) <= 2 * 86400 * 1000


def test_a_provider_stops_at_the_days_cap_without_a_request(rds: redis.Redis) -> None:
    from fake_twelvedata import FakeTwelveData
    from tasks.market_data import DailyQuotaExhausted

    fake = FakeTwelveData()
    try:
        limiter = RedisRateLimiter(rds, new_key(), limit=8, period=60.0, per_day=3)
        provider = TwelveDataProvider("test-key", fake.url, limiter, timeout=5)
        provider.fetch_daily(["A", "B"], dt.date(2024, 1, 1), dt.date(2024, 1, 5))
        with pytest.raises(DailyQuotaExhausted, match="for the day"):
            provider.fetch_daily(["C", "D"], dt.date(2024, 1, 1), dt.date(2024, 1, 5))
        assert len(fake.requests) == 1  # the refused batch was never sent
    finally:
        fake.close()


def test_redis_limiter_wait_is_for_enough_credits(rds: redis.Redis) -> None:
    limiter = RedisRateLimiter(rds, new_key(), limit=4, period=1.2)
    assert limiter.acquire(2) == 0.0
    time.sleep(0.5)
    assert limiter.acquire(2) == 0.0  # spent 0.5 s later
    one = limiter.acquire(1)  # freed when the first pair leaves: ~0.7 s
    three = limiter.acquire(3)  # needs the second pair gone too: ~1.2 s
    assert 0.5 < one < 0.8 and 1.0 < three <= 1.2


@pytest.mark.parametrize("cost", [0, -1, 9])
def test_limiters_reject_a_cost_that_can_never_be_granted(rds: redis.Redis, cost: int) -> None:
    for limiter in (RedisRateLimiter(rds, new_key(), 8), LocalRateLimiter(8)):
        with pytest.raises(ValueError, match="between 1 and the limit"):
            limiter.acquire(cost)
    with pytest.raises(ValueError):
        RedisRateLimiter(rds, new_key(), 0)
    with pytest.raises(ValueError):
        LocalRateLimiter(3, period=0)


def test_redis_limiter_is_atomic_across_concurrent_clients(rds: redis.Redis) -> None:
    key = new_key()
    # Each thread has its own connection, as each worker process would.
    grants = hammer(lambda: RedisRateLimiter(redis.Redis.from_url(REDIS_URL), key, 5, 0.4), 8, 1.3)
    # never more than the limit in any period (a little slack for the Redis round trip) ...
    assert max_in_any_window(grants, 0.4 - 0.03) <= 5
    # ... and the credits come back window after window
    assert len(grants) >= 3 * 5


def test_redis_limiter_grants_exactly_the_limit_to_a_burst(rds: redis.Redis) -> None:
    key = new_key()
    granted: list[int] = []
    barrier = threading.Barrier(10)

    def run() -> None:
        limiter = RedisRateLimiter(redis.Redis.from_url(REDIS_URL), key, 7, 30.0)
        barrier.wait()
        granted.extend(1 for _ in range(10) if limiter.acquire(1) == 0.0)

    workers = [threading.Thread(target=run) for _ in range(10)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(granted) == 7  # 100 attempts at once, exactly the limit granted
    assert rds.zcard(key) == 7


def test_get_provider_twelvedata_shares_credits_through_redis(rds: redis.Redis) -> None:
    api_key = f"key-{uuid.uuid4().hex}"
    settings = Settings(
        market_data_provider="twelvedata",
        twelvedata_api_key=api_key,
        provider_credits_per_minute=5,
        provider_batch_size=8,
        provider_timeout=3,
    )
    provider = get_provider(settings, rds)
    assert isinstance(provider, TwelveDataProvider) and provider.name == "twelvedata"
    assert provider.batch_size == 5  # a batch must fit in a minute's credits
    assert provider.timeout == 3
    # a fresh client to the same Redis (what a task passes) gets the same provider
    assert get_provider(settings, redis.Redis.from_url(REDIS_URL)) is provider
    limiter = provider._limiter
    assert isinstance(limiter, RedisRateLimiter) and limiter.limit == 5
    assert limiter.period == 60.0
    assert api_key not in limiter.key  # a hash of the key, not the key
    local = get_provider(settings)
    assert isinstance(local, TwelveDataProvider) and local is not provider
    assert isinstance(local._limiter, LocalRateLimiter)
