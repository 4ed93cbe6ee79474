"""A soft shutdown gives back the deliveries of the tasks it requeues (they are not poison
deliveries), in Sentinel mode too: on the master the Sentinels name, not on REDIS_URL's
default, which names no server of ours in that mode."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import SentinelCluster


@pytest.fixture
def sentinel_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    from tasks import base
    from tasks.settings import get_settings

    cluster = SentinelCluster().start()
    monkeypatch.delenv("REDIS_URL", raising=False)
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    base._redis.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
    base._redis.cache_clear()
    cluster.close()


def test_requeued_deliveries_are_given_back_on_the_sentinel_master(
    sentinel_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import base, redis_conn

    requeued = SimpleNamespace(
        id="requeued-1",
        time_start=time.time(),  # it started: the shutdown cancelled it
        acknowledged=False,  # acks_late: its message goes back to the queue
        request_dict={"retries": 0},
    )
    monkeypatch.setattr(base, "_started", {requeued.id: requeued})
    key = base.DELIVERY_KEY.format(id=requeued.id, retries=0, nesting=0)
    master = redis_conn.client(sentinel_settings)
    master.set(key, 1)  # counted when the worker took it

    base.excuse_requeued_deliveries()

    assert int(master.get(key) or 0) == 0
    master.close()
