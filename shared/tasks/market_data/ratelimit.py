"""Provider credits per period, shared by every worker process through Redis.

The original application read its counter, compared and wrote it back in three round trips,
so two workers could both spend the last credit. Here one Lua script looks and spends
atomically (Redis runs a script alone), on Redis's own clock (``TIME``), so the workers' clocks
do not matter. The window is a sliding log: a sorted set of spent credits scored by the
millisecond they were spent; at most ``limit`` of them lie within any ``period``.

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

# KEYS[1]: the log. ARGV: period (ms), limit, cost, a unique id of this call.
# Returns 0 (granted, `cost` entries added) or the milliseconds to wait (nothing added).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period, limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local used = redis.call('ZCARD', KEYS[1])
if used + cost <= limit then
  for i = 1, cost do
    redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i)
  end
  redis.call('PEXPIRE', KEYS[1], period)
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

    def acquire(self, cost: int = 1) -> float:
        """Spend ``cost`` credits and return 0.0, or spend none and return seconds to wait."""
        ...


def _check(limit: int, period: float) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")


def _check_cost(cost: int, limit: int) -> None:
    if not 0 < cost <= limit:
        raise ValueError(f"cost {cost} must be between 1 and the limit {limit}")


class RedisRateLimiter:
    """At most ``limit`` credits per ``period`` seconds across all processes sharing ``key``."""

    def __init__(self, redis_client: Any, key: str, limit: int, period: float = 60.0) -> None:
        _check(limit, period)
        self.key, self.limit, self.period = key, limit, float(period)
        self._script = redis_client.register_script(_ACQUIRE)  # EVALSHA, reloads on NOSCRIPT

    def acquire(self, cost: int = 1) -> float:
        _check_cost(cost, self.limit)
        args = [max(1, round(self.period * 1000)), self.limit, cost, uuid.uuid4().hex]
        return int(self._script(keys=[self.key], args=args)) / 1000.0


class LocalRateLimiter:
    """The same contract inside one process (CLI, tests, a provider built without Redis)."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        _check(limit, period)
        self.limit, self.period = limit, float(period)
        self._spent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self, cost: int = 1) -> float:
        _check_cost(cost, self.limit)
        with self._lock:
            now = time.monotonic()
            while self._spent and self._spent[0] <= now - self.period:
                self._spent.popleft()
            if len(self._spent) + cost <= self.limit:
                self._spent.extend([now] * cost)
                return 0.0
            oldest = self._spent[len(self._spent) + cost - self.limit - 1]
            return max(0.001, oldest + self.period - now)
