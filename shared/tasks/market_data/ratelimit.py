"""Provider credits per period, shared by every worker process through Redis.

The original application read its counter, compared and wrote it back in three round trips,
so two workers could both spend the last credit. Here one Lua script looks and spends
atomically (Redis runs a script alone), on Redis's own clock (``TIME``), so the workers' clocks
do not matter. The window is a sliding log: a sorted set of spent credits scored by the
millisecond they were spent; at most ``limit`` of them lie within any ``period``. A sliding
window is at least as strict as the provider's calendar minute. An optional ``per_day`` caps
the credits of each UTC day (a counter per day): once spent, the wait is until midnight UTC,
longer than ``period``, which is how the caller tells the day's cap from the minute's.

``acquire(cost)`` never blocks: it returns 0.0 (granted, credits spent) or the seconds after
which the same call would be granted (nothing spent). The caller decides to sleep or to give
the worker slot back (see ``TwelveDataProvider``).
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from typing import Any, Protocol

DAY_MS = 86_400_000

# KEYS[1]: the log, KEYS[2]: prefix of the per-day counters. ARGV: period (ms), limit, cost,
# a unique id of this call, credits per day (0: no daily cap).
# Returns 0 (granted, `cost` entries added) or the milliseconds to wait (nothing added).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period, limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local per_day = tonumber(ARGV[5])
local day_ms = 86400000
local day_key = KEYS[2] .. ':' .. math.floor(now / day_ms)
if per_day > 0 and tonumber(redis.call('GET', day_key) or '0') + cost > per_day then
  return day_ms - now % day_ms
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local used = redis.call('ZCARD', KEYS[1])
if used + cost <= limit then
  for i = 1, cost do
    redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i)
  end
  redis.call('PEXPIRE', KEYS[1], period)
  if per_day > 0 then
    redis.call('INCRBY', day_key, cost)
    redis.call('PEXPIRE', day_key, 2 * day_ms)
  end
  return 0
end
-- Granted once the oldest (used + cost - limit) entries have left the window.
local nth = used + cost - limit - 1
local entry = redis.call('ZRANGE', KEYS[1], nth, nth, 'WITHSCORES')
return math.max(1, tonumber(entry[2]) + period - now)
"""


class RateLimiter(Protocol):
    limit: int
    period: float
    per_day: int

    def acquire(self, cost: int = 1) -> float:
        """Spend ``cost`` credits and return 0.0, or spend none and return seconds to wait."""
        ...


def _check(limit: int, period: float, per_day: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")
    if per_day < 0:
        raise ValueError(f"per_day must be 0 (no cap) or positive, got {per_day}")


def _check_cost(cost: int, limit: int) -> None:
    if not 0 < cost <= limit:
        raise ValueError(f"cost {cost} must be between 1 and the limit {limit}")


class RedisRateLimiter:
    """At most ``limit`` credits per ``period`` seconds (and ``per_day`` a UTC day) across all
    processes sharing ``key``."""

    def __init__(
        self, redis_client: Any, key: str, limit: int, period: float = 60.0, per_day: int = 0
    ) -> None:
        _check(limit, period, per_day)
        self.key, self.limit, self.period, self.per_day = key, limit, float(period), per_day
        self._script = redis_client.register_script(_ACQUIRE)  # EVALSHA, reloads on NOSCRIPT

    def acquire(self, cost: int = 1) -> float:
        _check_cost(cost, self.limit)
        args = [max(1, round(self.period * 1000)), self.limit, cost, uuid.uuid4().hex]
        keys = [self.key, self.key + ":day"]
        return int(self._script(keys=keys, args=[*args, self.per_day])) / 1000.0


class LocalRateLimiter:
    """The same contract inside one process (CLI, tests, a provider built without Redis)."""

    def __init__(self, limit: int, period: float = 60.0, per_day: int = 0) -> None:
        _check(limit, period, per_day)
        self.limit, self.period, self.per_day = limit, float(period), per_day
        self._spent: collections.deque[float] = collections.deque()
        self._days: dict[int, int] = {}  # UTC day number -> credits spent
        self._lock = threading.Lock()

    def acquire(self, cost: int = 1) -> float:
        _check_cost(cost, self.limit)
        with self._lock:
            wall_ms = time.time() * 1000
            day = int(wall_ms // DAY_MS)
            if self.per_day and self._days.get(day, 0) + cost > self.per_day:
                return (DAY_MS - wall_ms % DAY_MS) / 1000.0
            now = time.monotonic()
            while self._spent and self._spent[0] <= now - self.period:
                self._spent.popleft()
            if len(self._spent) + cost <= self.limit:
                self._spent.extend([now] * cost)
                self._days = {day: self._days.get(day, 0) + cost}
                return 0.0
            oldest = self._spent[len(self._spent) + cost - self.limit - 1]
            return max(0.001, oldest + self.period - now)
