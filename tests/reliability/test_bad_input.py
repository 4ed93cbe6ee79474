"""Scenario 6: garbage on the queue. Raw messages published with kombu (what anyone who can
write to Redis can send): malformed bodies and arguments, an unknown task name, pickle, an
oversized payload, wrong content types. Each is refused with a log line naming the reason,
acknowledged (gone from the queue and from the `unacked` hash: never redelivered), and the
worker keeps serving (a ping answers after each).
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from typing import Any

import pytest
from kombu import Connection, Producer
from reliability_helpers import Scenario, redis_leftovers, wait_until

from tasks.base import MAX_MESSAGE_BYTES
from tasks.celery_app import app

JSON = "application/json"


def headers(task: Any, task_id: Any) -> dict[str, Any]:
    return {
        "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
        "argsrepr": "", "kwargsrepr": "", "origin": "chaos-test",
    }  # fmt: skip


# name -> (task header, body, content type, what the worker's log must say)
CASES: dict[str, tuple[Any, Any, str, str]] = {
    "body not [args, kwargs, embed]": (
        "ping", json.dumps({"not": "a list"}), JSON, "malformed body: expected [args",
    ),
    "body a bare number": ("ping", "5", JSON, "malformed body"),
    "body not JSON": ("ping", "{not json", JSON, "body does not decode as 'application/json'"),
    "arguments the task does not take": (
        "ping", json.dumps([[1, 2], {}, {}]), JSON, "ping() takes 0 positional arguments",
    ),
    "argument of the wrong type": (
        "cleanup_old_data", json.dumps([[], {"days_to_keep": "many"}, {}]), JSON,
        "invalid argument 'days_to_keep'",
    ),
    "unknown task name": (
        "no.such.task", json.dumps([[], {}, {}]), JSON,
        "Received unregistered task of type 'no.such.task'",
    ),
    "task header not a string": (["ping"], json.dumps([[], {}, {}]), JSON, "must be strings"),
    "pickle": (
        "ping", pickle.dumps(([], {}, {})), "application/x-python-serialize",
        "Refusing to deserialize untrusted content of type pickle",
    ),
    "oversized (20 MB kwargs)": (
        "ping", json.dumps([[], {"blob": "x" * 20_000_000}, {}]), JSON,
        f"exceeds the limit of {MAX_MESSAGE_BYTES} bytes",
    ),
    "content type text/plain": (
        "ping", "hello", "text/plain", "content type 'text/plain' is not accepted",
    ),
    "content type yaml": (
        "ping", "- []\n- {}\n- {}\n", "application/x-yaml",
        "content type 'application/x-yaml' is not accepted",
    ),
}  # fmt: skip


@pytest.mark.slow
def test_bad_messages_are_refused_acknowledged_and_the_worker_keeps_serving(
    worker: Any, redis_client: Any
) -> None:
    ids: dict[str, str] = {name: str(uuid.uuid4()) for name in CASES}
    outcomes: dict[str, str] = {}
    answered: list[float] = []

    def measure() -> dict[str, int]:
        waiting = redis_leftovers(redis_client)
        states = {name: app.AsyncResult(i).state for name, i in ids.items()}
        failed = [n for n, state in states.items() if state == "FAILURE"]
        unfinished = [n for n in ids if n not in failed and ids[n] in waiting]
        return {
            "sent": len(ids),
            "completed": len(failed),  # refused and marked FAILURE, as expected
            "reran": 0,  # none of them reaches a task body
            "duplicated": 0,
            "lost": len(ids) - len(failed) - len(unfinished),
            "unfinished": len(unfinished),
        }

    # recover: from the first bad message until the worker answered after the last one.
    with Scenario("bad input (11 kinds of bad message)", differs="") as sc:
        sc.measure = measure
        sc.recovered = lambda: answered[-1] if len(answered) == len(CASES) else None
        sc.fault_at = time.time()
        with Connection(app.conf.broker_url) as conn:
            producer = Producer(conn)
            for name, (task, body, content_type, expected) in CASES.items():
                task_id = ids[name]
                producer.publish(
                    body,
                    exchange="",
                    routing_key="default",
                    headers=headers(task, task_id),
                    content_type=content_type,
                    content_encoding="binary" if isinstance(body, bytes) else "utf-8",
                    correlation_id=task_id,
                )
                wait_until(lambda e=expected: e in worker.output, 30, 0.1, expected)
                # The worker is still there and serving.
                assert app.send_task("ping").get(timeout=30) == "pong", name
                answered.append(time.time())
                outcomes[name] = app.AsyncResult(task_id).state
        # Nothing left behind: not queued, not waiting for an ack (so never redelivered).
        time.sleep(1)
        for name, state in outcomes.items():
            print(f"  {name:40s} {state}")
        assert redis_leftovers(redis_client) == {}
        # Whoever waits on one of them learns it failed (FAILURE with the reason), never hangs.
        assert outcomes == dict.fromkeys(CASES, "FAILURE")
        assert worker.proc.poll() is None
        assert "Unrecoverable error" not in worker.output
        # Each refusal is logged once: no message went round again.
        assert worker.output.count("Refused task message") == 8
