"""kombu's Redis transport, with queue entries it cannot read dropped instead of fatal.

A queue in Redis is a list of JSON envelopes ({"body", "content-type", "headers",
"properties": {"delivery_tag", "delivery_info", "body_encoding"}}). kombu parses each entry and
builds a message from it in the worker's main process, before Celery or the message guard
(`tasks.base.GuardedConsumer`) sees anything; an entry that is not JSON, JSON that is not an
object, or an envelope whose body is not valid base64 raises there, and the worker stops with
"Unrecoverable error" (every task running in the pod with it). Anyone holding the Redis password
can push such an entry. This transport (the app's `broker_transport`) logs and drops them: the
entry has been popped already and is not in the `unacked` hash yet, so dropping it is simply not
delivering it. Well-formed envelopes go on to the guard, which checks the task message inside.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from celery.utils.log import get_logger
from kombu.transport import redis as kombu_redis

logger = get_logger(__name__)

# How much of a bad entry goes into the log line.
PREVIEW = 200


def envelope_problem(payload: Any) -> str | None:
    """Why kombu could not turn this parsed queue entry into a message, or None if it can."""
    if not isinstance(payload, dict):
        return f"JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "'properties' is missing or not an object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "'properties.delivery_tag' is missing or not a string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        k in info and isinstance(info[k], str | None) for k in ("exchange", "routing_key")
    ):
        return "'properties.delivery_info' needs 'exchange' and 'routing_key' (strings)"
    for key in ("content-type", "content-encoding"):
        if not isinstance(payload.get(key), str | None):
            return f"{key!r} is not a string"
    if not isinstance(payload.get("headers"), dict | None):
        return "'headers' is not an object"
    body = payload.get("body")
    if not isinstance(body, str | None):
        return f"'body' is a {type(body).__name__}, not a string"
    encoding = properties.get("body_encoding")
    if encoding is None or (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        return None
    if encoding != "base64":
        return f"unknown 'properties.body_encoding' {encoding!r}"
    try:
        base64.b64decode(body or "")  # what kombu does with it, errors and all
    except (binascii.Error, ValueError) as exc:
        return f"body is not valid base64: {exc}"
    return None


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text[:PREVIEW] + ("..." if len(text) > PREVIEW else "")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # kombu's `loads(bytes_to_str(item))` of the popped entry, before any delivery
            # (the message guard turns every decoding error after that into a refusal).
            logger.error("Dropped a queue entry that is not JSON: %s", exc)
            return True

    def _get(self, queue: str, timeout: Any = None) -> Any:
        # basic_get (polling consumers, not the worker's BRPOP loop): same rule, next entry.
        while True:
            try:
                payload = super()._get(queue)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                logger.error("Dropped a queue entry of %r that is not JSON: %s", queue, exc)
                continue
            problem = envelope_problem(payload)
            if problem is None:
                return payload
            logger.error("Dropped a queue entry of %r: %s: %s", queue, problem, _preview(payload))


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            logger.error("Dropped a queue entry of %r: %s: %s", queue, problem, _preview(message))
            return
        super()._deliver(message, queue)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The same rule on kombu's Sentinel channel (REDIS_SENTINELS)."""


class SentinelTransport(Transport, kombu_redis.SentinelTransport):
    Channel = SentinelChannel
