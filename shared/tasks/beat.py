"""Beat scheduler: RedBeat (schedule and lock in Redis) plus a heartbeat file for the probe.

RedBeat's lock means a second beat (a rollout overlap) waits instead of sending every entry
twice; the schedule's state lives in Redis, not on the pod's disk, so a restart neither
replays nor skips a due entry.

RedBeat renews its lock at every tick and lets a Redis error escape, which ends the beat
process: a Redis restart would stop the schedule until someone restarts beat. Here a tick that
cannot reach Redis is retried, and a lock that expired meanwhile is acquired again (waiting as
a standby does if another beat took it) before anything is sent.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import redis.exceptions
from celery.utils.log import get_logger
from redbeat import RedBeatScheduler
from redbeat.schedulers import acquire_distributed_beat_lock

from tasks.health import touch

logger = get_logger(__name__)

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Scheduler(RedBeatScheduler):
    lock: Any  # redis.lock.Lock once acquired

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock_key and self.lock is None:
                acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=self))
            interval: float = super().tick(*args, **kwargs)
        except REDIS_DOWN as exc:
            logger.warning("beat: Redis unavailable (%s); retrying in %ss", exc, self.max_interval)
            return float(self.max_interval)
        except redis.exceptions.LockError as exc:
            logger.warning("beat: lock lost (%s); acquiring it again before sending", exc)
            self.lock = None
            return 0.1
        touch("beat-heartbeat")
        return interval
