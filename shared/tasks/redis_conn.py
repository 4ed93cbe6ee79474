"""Every Redis connection of waardhaven-tasks, built from the settings in this one place.

Two shapes (docs/sentinel.md):
- a single Redis (the default): REDIS_URL, password inside it; RESULT_BACKEND_URL optional;
- Redis Sentinel: REDIS_SENTINELS (host:port,...), REDIS_SENTINEL_MASTER, REDIS_PASSWORD (the
  Redis servers') and REDIS_SENTINEL_PASSWORD (the Sentinels'). Every client asks a Sentinel
  for the current master and asks again after a connection error, so a failover needs no
  restart: kombu's `sentinel://` transport (broker), Celery's `sentinel://` result backend,
  RedBeat's `redis-sentinel` mode and redis-py's `Sentinel.master_for` for our own clients
  (delivery counter, rate limiter, worker metrics).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.parse
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from tasks.settings import Settings, load_settings

# Seconds a Sentinel may take to answer "who is the master?" before the next one is asked.
SENTINEL_TIMEOUT = 2.0
# Seconds a command to the master may take: long enough for a busy Redis, short enough that a
# master that vanished without a TCP reset (its node died) is given up and looked up again.
MASTER_SOCKET_TIMEOUT = 10.0
DB = 0


def sentinel_mode(settings: Settings) -> bool:
    return bool(settings.redis_sentinels.strip())


def sentinels(settings: Settings) -> list[tuple[str, int]]:
    """REDIS_SENTINELS as (host, port) pairs; IPv6 hosts may be written [::1]:26379."""
    out = []
    for item in filter(None, (i.strip() for i in settings.redis_sentinels.split(","))):
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """Options of the connections to the Sentinels themselves (not to the master)."""
    return {
        "password": settings.redis_sentinel_password,
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
    }


def _sentinel_urls(settings: Settings) -> str:
    """kombu's and Celery's form: sentinel://:PASSWORD@host:port/DB;sentinel://... The password
    in it is the Redis servers' (the master's); the Sentinels' goes in `sentinel_kwargs`."""
    password = urllib.parse.quote(settings.redis_password or "", safe="")
    hosts = (f"[{h}]" if ":" in h else h for h, _ in sentinels(settings))
    ports = (p for _, p in sentinels(settings))
    return ";".join(
        f"sentinel://:{password}@{h}:{p}/{DB}" for h, p in zip(hosts, ports, strict=True)
    )


def broker_url(settings: Settings) -> str:
    return _sentinel_urls(settings) if sentinel_mode(settings) else settings.redis_url


def backend_url(settings: Settings) -> str:
    return _sentinel_urls(settings) if sentinel_mode(settings) else settings.backend_url


def broker_transport(settings: Settings) -> dict[str, Any]:
    """kombu's transport for the broker: ours (`tasks.transport`, which drops unreadable queue
    entries) in its Sentinel or plain form. Naming a transport class makes kombu ignore the
    URL's scheme, so `rediss://` must ask for TLS itself (certificates verified unless the URL
    says `ssl_cert_reqs=none|optional`, as Celery's result backend reads it too)."""
    if sentinel_mode(settings):
        return {"broker_transport": "tasks.transport:SentinelTransport"}
    config: dict[str, Any] = {"broker_transport": "tasks.transport:Transport"}
    url = urllib.parse.urlsplit(settings.redis_url)
    if url.scheme == "rediss":
        reqs = urllib.parse.parse_qs(url.query).get("ssl_cert_reqs", ["required"])[0].lower()
        levels = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}
        config["broker_use_ssl"] = {
            "ssl_cert_reqs": levels.get(reqs.removeprefix("cert_"), ssl.CERT_REQUIRED)
        }
    return config


def transport_options(settings: Settings) -> dict[str, Any]:
    """What `broker_transport_options` and `result_backend_transport_options` add for Sentinel."""
    if not sentinel_mode(settings):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _sentinel_kwargs(settings),
    }


def redbeat_config(settings: Settings) -> dict[str, Any]:
    """RedBeat's connection settings (its schedule and its lock)."""
    if not sentinel_mode(settings):
        return {"redbeat_redis_url": settings.redis_url}
    return {
        "redbeat_redis_url": "redis-sentinel://",  # the scheme selects RedBeat's Sentinel mode
        "redbeat_redis_options": {
            "sentinels": sentinels(settings),
            "service_name": settings.redis_sentinel_master,
            "password": settings.redis_password,
            "db": DB,
            "socket_timeout": MASTER_SOCKET_TIMEOUT,
            "sentinel_kwargs": _sentinel_kwargs(settings),
        },
    }


def client(settings: Settings, **options: Any) -> redis.Redis:
    """A redis-py client on the (current) master; `options` go to its connections."""
    if not sentinel_mode(settings):
        return redis.Redis.from_url(settings.redis_url, **options)
    options.setdefault("socket_timeout", MASTER_SOCKET_TIMEOUT)
    manager = Sentinel(sentinels(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    master: redis.Redis = manager.master_for(
        settings.redis_sentinel_master, password=settings.redis_password, db=DB, **options
    )
    return master


def async_backend_client(settings: Settings) -> redis.asyncio.Redis:
    """An asyncio client on the result backend's Redis (the API's event streams)."""
    if not sentinel_mode(settings):
        return redis.asyncio.Redis.from_url(settings.backend_url)
    manager = AsyncSentinel(sentinels(settings), sentinel_kwargs=_sentinel_kwargs(settings))
    master: redis.asyncio.Redis = manager.master_for(
        settings.redis_sentinel_master,
        password=settings.redis_password,
        db=DB,
        socket_timeout=MASTER_SOCKET_TIMEOUT,
    )
    return master


def exporter_options(settings: Settings) -> str:
    """celery-exporter's broker transport options, as its environment variable takes them:
    `name=value` words separated by spaces (click splits there), values as compact JSON."""
    words = []
    for name, value in transport_options(settings).items():
        word = f"{name}={json.dumps(value, separators=(',', ':'))}"
        if any(c.isspace() for c in word):
            raise SystemExit(f"redis_conn: {name} holds whitespace, which the exporter splits on")
        words.append(word)
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    """For the services that are not this app (services/exporter/run): print a setting."""
    parser = argparse.ArgumentParser(prog="python -m tasks.redis_conn", description=main.__doc__)
    parser.add_argument("what", choices=["broker-url", "exporter-options"])
    args = parser.parse_args(argv)
    settings = load_settings()
    print(broker_url(settings) if args.what == "broker-url" else exporter_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
