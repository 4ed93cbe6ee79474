"""The cluster-wide figures, probed once per scrape in one place: `python -m tasks.metrics.cluster`.

Redis's health and memory, the age of the oldest message per queue, and beat's last and next
run per schedule entry (RedBeat keeps them in Redis) describe the whole deployment, not a
worker: they are served by this one process (a container in the exporter's pod, next to the
Celery exporter, which has its own registry and no hook for ours) on CLUSTER_METRICS_PORT
(9541), at METRICS_ADDRESS. Every probe of a scrape is bounded by REDIS_TIMEOUT, and an
unreachable Redis is reported as `waardhaven_redis_up 0`, never as a failed scrape.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tasks.metrics.families import SENT_AT_HEADER, UNKNOWN
from tasks.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds each Redis call of one scrape may take.
REDIS_TIMEOUT = 1.0
MAX_SCHEDULE_ENTRIES = 100


class ClusterCollector:
    """Asks Redis at scrape time; `queues` and `beat_prefix` come from the app."""

    def __init__(self, settings: Settings, queues: Iterable[str], beat_prefix: str) -> None:
        from tasks import redis_conn

        self.queues = sorted(queues)
        self.beat_prefix = beat_prefix
        self.redis = redis_conn.client(  # a single Redis or the Sentinels' current master
            settings,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=0,
        )

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily as Gauge

        up = Gauge("waardhaven_redis_up", "1 when the cluster probes reach Redis (the broker).")
        try:
            self.redis.ping()
        except Exception as exc:
            logger.debug("cluster metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        try:
            info = self.redis.info("memory")
            used = Gauge("waardhaven_redis_memory_used_bytes", "Redis used_memory.")
            used.add_metric([], float(info.get("used_memory", 0)))
            limit = Gauge("waardhaven_redis_memory_max_bytes", "Redis maxmemory (0: no limit set).")
            limit.add_metric([], float(info.get("maxmemory", 0)))
            found = [used, limit, self._oldest(Gauge), *self._beat(Gauge)]
        except Exception as exc:
            logger.warning("cluster metrics: Redis probe failed: %s", exc)
            return
        yield from found

    def _oldest(self, family: Any) -> Any:
        metric = family(
            "waardhaven_queue_oldest_message_age_seconds",
            "Age of the oldest message waiting in a queue (0 when empty).",
            labels=["queue"],
        )
        now = time.time()
        for queue in self.queues:
            raw = self.redis.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the oldest is last
            if raw is None:
                metric.add_metric([queue], 0.0)
                continue
            try:
                sent_at = json.loads(raw)["headers"][SENT_AT_HEADER]
                metric.add_metric([queue], max(0.0, now - float(sent_at)))
            except (ValueError, KeyError, TypeError):
                continue  # published without our header: unknown age
        return metric

    def _beat(self, family: Any) -> list[Any]:
        prefix = self.beat_prefix
        entries = self.redis.zrange(
            prefix + ":schedule", 0, MAX_SCHEDULE_ENTRIES - 1, withscores=True
        )
        next_run = family(
            "waardhaven_beat_next_run_timestamp_seconds",
            "When beat will next send a schedule entry (RedBeat's due time, UNIX seconds).",
            labels=["schedule", "task"],
        )
        last_run = family(
            "waardhaven_beat_last_run_timestamp_seconds",
            "When beat last sent a schedule entry (or created it), UNIX seconds.",
            labels=["schedule", "task"],
        )
        if not entries:
            return [next_run, last_run]
        from redbeat.decoder import RedBeatJSONDecoder

        pipe = self.redis.pipeline()
        for key, _score in entries:
            pipe.hmget(key, "definition", "meta")
        for (key, score), (definition, meta) in zip(entries, pipe.execute(), strict=True):
            name = key.decode() if isinstance(key, bytes) else str(key)
            name = name[len(prefix) :] if name.startswith(prefix) else name
            try:
                task = json.loads(definition or "{}").get("task") or UNKNOWN
                meta_d = json.loads(meta, cls=RedBeatJSONDecoder) if meta else {}
            except ValueError:
                continue
            if score >= 0:
                next_run.add_metric([name, str(task)], float(score))
            last = meta_d.get("last_run_at")
            if isinstance(last, dt.datetime):
                if last.tzinfo is None:
                    last = last.replace(tzinfo=dt.UTC)
                last_run.add_metric([name, str(task)], last.timestamp())
        return [next_run, last_run]


def main() -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from tasks.celery_app import QUEUES, app
    from tasks.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s")
    registry = CollectorRegistry(auto_describe=False)
    prefix = app.conf.get("redbeat_key_prefix") or "redbeat:"
    registry.register(ClusterCollector(settings, QUEUES, prefix))
    port = settings.cluster_metrics_port
    httpd, _thread = start_http_server(port, addr=settings.metrics_address, registry=registry)
    logger.info("cluster metrics: /metrics on %s:%s", settings.metrics_address, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    httpd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
