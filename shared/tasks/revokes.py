"""Revokes that outlive the broadcast: recorded in Redis, loaded by every worker that starts.

Celery's revoke is a broadcast heard only by the workers running at that moment, each keeping
the id in memory (`celery.worker.state.revoked`). Workers run `--without-mingle` and pods come
and go (autoscaling, OOM kills, rollouts), so a worker that starts later would run a revoked
task. Celery's own remedies do not fit: mingle asks the running workers (slow at scale, nothing
when all restarted), `--statedb` is a file per worker (a new pod has none). So `revoke` records
the id in one sorted set (member: task id, score: when the record expires), then broadcasts;
`LoadRevokes` loads the unexpired ids into the worker's set when its consumer starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import bootsteps
from celery.utils.collections import LimitedSet
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from tasks import redis_conn
from tasks.settings import get_settings

KEY = "waardhaven:revoked"
# A worker's reads at start: a Redis that does not answer must not hold the worker up long.
READ_TIMEOUT = 5.0

logger = get_logger(__name__)


def ttl(conf: Mapping[str, Any]) -> int:
    """Seconds a revoke is kept: as long as the revoked message may still be delivered.

    The longest of
    - the visibility timeout: a message a worker had taken (reserved, or running when revoked
      without terminate) comes back that long after that worker died;
    - the longest `expires` of beat's entries: a worker discards a beat message past it anyway;
    - the result expiry: while the task's result can be read as REVOKED, it stays revoked.
    Messages from the CLI or the API carry no `expires`: one still waiting in a queue after
    this (hours; WaardhavenQueueMessageTooOld fires after minutes) would run.
    """
    beat = [
        int(entry.get("options", {}).get("expires") or 0)
        for entry in (conf.get("beat_schedule") or {}).values()
    ]
    visibility = int((conf.get("broker_transport_options") or {}).get("visibility_timeout", 0))
    return max(visibility, int(conf.get("result_expires") or 0), *beat)


def record(client: redis.Redis, task_id: str, seconds: int, now: float | None = None) -> None:
    """Record a revoke until now + seconds; drop the expired ones on the way."""
    now = time.time() if now is None else now
    pipe = client.pipeline()  # MULTI/EXEC: the set and its key expiry change together
    pipe.zadd(KEY, {task_id: now + seconds})
    pipe.zremrangebyscore(KEY, "-inf", now)
    pipe.expire(KEY, seconds + 1)  # every member expires by then: an idle key goes away
    pipe.execute()


def unexpired(client: redis.Redis, now: float | None = None) -> dict[str, float]:
    """Task id -> the wall-clock time its revoke expires, for the revokes still in force."""
    now = time.time() if now is None else now
    rows = client.zrangebyscore(KEY, f"({now}", "+inf", withscores=True)
    return {(m.decode() if isinstance(m, bytes) else str(m)): float(s) for m, s in rows}


def revoke(
    app: Any, task_id: str, terminate: bool = False, client: redis.Redis | None = None
) -> None:
    """Revoke for every worker, running or to come: record first, then broadcast (a worker that
    starts in between and misses the broadcast reads the record)."""
    own = client is None
    client = client or redis_conn.client(get_settings())
    try:
        record(client, task_id, ttl(app.conf))
    finally:
        if own:
            client.close()
    # The workers run with REMAP_SIGTERM=SIGQUIT (soft shutdown), so their pool children ignore
    # SIGTERM: SIGQUIT is what stops a running task there.
    app.control.revoke(task_id, terminate=terminate, signal="SIGQUIT")


def add_until(
    revoked: LimitedSet, ids: Mapping[str, float], wall_now: float, mono_now: float
) -> None:
    """Add ids to a worker's LimitedSet so each expires at its own wall-clock time.

    The set expires an item `revoked.expires` seconds after its stamp (time.monotonic()), so the
    stamp is set back from the expiry by that much. Purging happens only when the set is full
    (50,000 ids by default); until then an id stays revoked in this worker regardless.
    """
    for task_id, expires_at in ids.items():
        if revoked.expires:
            revoked.add(task_id, now=mono_now + (expires_at - wall_now) - revoked.expires)
        else:
            revoked.add(task_id)


def load(reason: str) -> int | None:
    """Load the recorded revokes into this worker; the number loaded, None when Redis failed."""
    try:
        client = redis_conn.client(
            get_settings(), socket_timeout=READ_TIMEOUT, socket_connect_timeout=READ_TIMEOUT
        )
        try:
            wall_now, mono_now = time.time(), time.monotonic()
            ids = unexpired(client, wall_now)
        finally:
            client.close()
    except redis.RedisError as exc:
        # The broker is the same Redis, so a worker that cannot read here rarely consumes either;
        # it goes on with the broadcasts only, as Celery alone would.
        logger.warning("revokes: could not read %s (%s): %s", KEY, reason, exc)
        return None
    add_until(worker_state.revoked, ids, wall_now, mono_now)
    logger.info("revokes: %d revoked task ids loaded (%s)", len(ids), reason)
    return len(ids)


class LoadRevokes(bootsteps.StartStopStep):
    """Loads the recorded revokes when the consumer starts (and restarts, after a lost
    connection), twice:

    1. at start: every step starts before the event loop (Evloop is always last), and task
       messages are consumed only from the loop, so nothing is taken before this read;
    2. on the loop's second tick: kombu's Redis transport subscribes to the broadcasts in the
       first tick (with the task queues' BRPOP), so a revoke recorded between the two reads,
       whose broadcast came before the subscription, is read here. Left open: a message taken
       in that same first tick, milliseconds after the start, for a revoke made in them.
    """

    requires = {"celery.worker.consumer.control:Control"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.on_tick: Any = None

    def start(self, parent: Any) -> None:
        load("worker start")
        hub = getattr(parent, "hub", None)
        if hub is None:  # no event loop (a transport without one): the broadcasts only
            return
        self._remove(hub)  # a restart (lost connection) before the last one's second tick
        ticks = [0]

        def on_tick() -> None:
            ticks[0] += 1
            if ticks[0] >= 2:
                self._remove(hub)
                load("after subscribing to broadcasts")

        self.on_tick = on_tick
        hub.on_tick.add(on_tick)

    def _remove(self, hub: Any) -> None:
        if self.on_tick is not None:
            hub.on_tick.discard(self.on_tick)
            self.on_tick = None

    def stop(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        if hub is not None:
            self._remove(hub)

    shutdown = stop
