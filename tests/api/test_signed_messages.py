"""Signed task messages and queue entries that must not stop a worker.

As someone holding the Redis password would: a plain JSON task message (a Celery app of their
own), one signed with a key the workers do not trust, control commands in plain JSON, and raw
list items that kombu cannot even parse. None of them runs or stops the worker; a signed task
(the API's, the CLI's) still runs, in the same worker process.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Stack, redis_server_flushed_fixture, stack_fixture, wait_state
from celery import Celery
from sqlalchemy import text

from conftest import Service
from tasks.db import get_engine
from tasks.signing import env_for, generate_keys

__all__ = ["redis_server_flushed_fixture", "stack_fixture"]  # the fixtures


# Refreshes of more than 5 assets run as a chord of chunk tasks that the worker sends itself
# (and signs), the summary taking over the first task's id (Task.replace).
WORKER_ENV = {"REFRESH_CHUNK_SIZE": "5"}


def task_run_exists(task_id: str) -> bool:
    with get_engine().connect() as conn:
        found = conn.execute(text("SELECT 1 FROM task_runs WHERE task_id = :id"), {"id": task_id})
        return found.first() is not None


def wait_log(stack: Stack, needle: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in stack.worker.output:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{needle!r} not in the worker log:\n{stack.worker.output[-3000:]}"
            )
        time.sleep(0.1)


def submit_ping(stack: Stack) -> None:
    """A signed task through the API runs: the worker is alive and serving."""
    with stack.client() as client:
        task_id = client.post("/v1/tasks/ping").json()["id"]
    assert wait_state(stack, task_id, {"SUCCESS", "FAILURE"})["result"] == "pong"


def intruder() -> Celery:
    """A Celery app with the Redis password and nothing else (plain JSON, no key)."""
    return Celery("intruder", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])


def test_a_signed_task_runs_and_records_who_sent_it(stack: Stack) -> None:
    # The CLI signs too (same settings as the pods), and says who sent it.
    task_id = stack.cli("submit", "cleanup_old_data", "--arg", "days_to_keep=3650").stdout.strip()
    assert wait_state(stack, task_id, {"SUCCESS", "FAILURE"})["status"] == "SUCCESS"
    with get_engine().connect() as conn:
        row = conn.execute(
            text("SELECT requested_by, state FROM task_runs WHERE task_id = :id"), {"id": task_id}
        ).one()
    assert row.state == "SUCCESS"
    assert row.requested_by.startswith("cli:")


def test_tasks_the_worker_sends_itself_are_signed_too(stack: Stack) -> None:
    with stack.client() as client:
        task_id = client.post("/v1/tasks/refresh_market_data", json={"mode": "full"}).json()["id"]
    meta = wait_state(stack, task_id, {"SUCCESS", "FAILURE"}, timeout=120)
    assert meta["status"] == "SUCCESS", meta
    assert meta["result"]["assets_refreshed"] == 14
    assert stack.worker.output.count("Task refresh_market_data_chunk[") >= 3
    with get_engine().connect() as conn:
        senders = conn.execute(
            text("SELECT name, requested_by FROM task_runs WHERE name LIKE 'refresh_market%'")
        ).all()
    assert len(senders) >= 4  # the run's row (written by its summary) and the chunks'
    assert {by for _, by in senders} == {"api:admin"}, senders
    assert "Refused task message" not in stack.worker.output


def test_a_plain_json_task_message_is_refused_and_not_run(stack: Stack) -> None:
    pid = stack.worker.proc.pid
    task_id = str(uuid.uuid4())
    intruder().send_task(
        "cleanup_old_data", kwargs={"days_to_keep": 1}, task_id=task_id, queue="low_priority"
    )
    wait_log(stack, f"Refused task message cleanup_old_data[{task_id}]")
    meta = wait_state(stack, task_id, {"FAILURE", "SUCCESS"})
    assert meta["status"] == "FAILURE"
    assert "content type 'application/json' is not accepted" in str(meta["result"])
    assert not task_run_exists(task_id)  # never started: no task_runs row
    submit_ping(stack)
    assert stack.worker.proc.pid == pid and stack.worker.proc.poll() is None


def test_a_task_signed_by_an_unknown_key_is_refused_and_not_run(
    stack: Stack, tmp_path: Any
) -> None:
    other = generate_keys(tmp_path / "other-keys")  # a valid key: just not in the store
    task_id = stack.cli(
        "submit", "cleanup_old_data", "--arg", "days_to_keep=1", **env_for(other)
    ).stdout.strip()
    wait_log(stack, f"Refused task message cleanup_old_data[{task_id}]")
    assert "Unknown certificate" in stack.worker.output
    assert wait_state(stack, task_id, {"FAILURE", "SUCCESS"})["status"] == "FAILURE"
    assert not task_run_exists(task_id)
    submit_ping(stack)


def test_unsigned_control_commands_are_refused_but_unsigned_inspection_answered(
    stack: Stack,
) -> None:
    """A plain JSON `shutdown` (anyone with the Redis password) stops nothing; the exporter's
    plain JSON `inspect stats` and `active_queues` are still answered (in JSON)."""
    pid = stack.worker.proc.pid
    app = intruder()
    app.control.broadcast("shutdown")
    app.control.broadcast("pool_restart")
    wait_log(stack, "Refused unsigned control command 'shutdown'")
    wait_log(stack, "Refused unsigned control command 'pool_restart'")
    stats = app.control.inspect(timeout=3).stats() or {}
    assert any(name.startswith("high@") for name in stats), stats
    queues = app.control.inspect(timeout=3).active_queues() or {}
    assert {q["name"] for qs in queues.values() for q in qs} == {
        "high_priority",
        "low_priority",
        "default",
    }
    assert stack.worker.proc.poll() is None
    submit_ping(stack)
    assert stack.worker.proc.pid == pid


def envelope(body: str, body_encoding: str = "base64", **extra: Any) -> dict[str, Any]:
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "body_encoding": body_encoding,
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": "default"},
            "priority": 0,
        },
        **extra,
    }


# name -> (raw list item, what the worker's log says)
BAD_ENTRIES: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{this is not json", "Dropped a queue entry that is not JSON"),
    "not UTF-8": (b"\xff\xfe\x00garbage", "Dropped a queue entry that is not JSON"),
    "JSON, not an object": (b"[1, 2, 3]", "JSON list, not an object"),
    "a JSON string": (b'"hello"', "JSON str, not an object"),
    "body not valid base64": (
        json.dumps(envelope("abc")).encode(),
        "body is not valid base64",
    ),
    "no properties": (json.dumps({"body": ""}).encode(), "'properties' is missing"),
    "unknown body encoding": (
        json.dumps(envelope("e30=", body_encoding="rot13")).encode(),
        "unknown 'properties.body_encoding'",
    ),
    "headers not an object": (
        json.dumps(envelope("e30=", headers=[1])).encode(),
        "'headers' is not an object",
    ),
}


@pytest.mark.slow
def test_unreadable_queue_entries_are_dropped_and_the_worker_goes_on(
    stack: Stack, redis_client: Any
) -> None:
    pid = stack.worker.proc.pid
    for name, (item, expected) in BAD_ENTRIES.items():
        before = stack.worker.output.count(expected)
        redis_client.lpush("default", item)
        deadline = time.monotonic() + 30
        while stack.worker.output.count(expected) == before:
            assert stack.worker.proc.poll() is None, f"{name}: the worker died"
            assert time.monotonic() < deadline, f"{name}: {expected!r} not logged"
            time.sleep(0.1)
        assert stack.worker.proc.poll() is None, name
    # The kinds the message guard handles (a well-formed envelope, a bad task message inside)
    # go on to it, as before.
    guarded = envelope(
        "WzEsIDJd",  # base64 of [1, 2]: not [args, kwargs, embed], and unsigned
        headers={"task": "ping", "id": str(uuid.uuid4())},
    )
    redis_client.lpush("default", json.dumps(guarded))
    wait_log(stack, "Refused task message ping[")
    submit_ping(stack)
    assert stack.worker.proc.pid == pid
    assert "Unrecoverable error" not in stack.worker.output
    assert redis_client.llen("default") == 0
    assert redis_client.hlen("unacked") == 0  # dropped, not waiting for a redelivery


def test_beat_sends_signed_messages_the_worker_runs(stack: Stack, tmp_path: Path) -> None:
    # Beat with the same key as the pods, compute_index due every minute: its message must be
    # signed, or the worker refuses it and no task_runs row is ever written.
    beat = Service("beat", tmp_path, SCHEDULE_COMPUTE_INDEX="* * * * *", **stack.env)
    query = text(
        "SELECT task_id, state FROM task_runs"
        " WHERE name = 'compute_index' AND requested_by = 'beat' AND finished_at IS NOT NULL"
    )
    deadline = time.monotonic() + 150  # the next minute, then the run
    try:
        while True:
            with get_engine().connect() as conn:
                row = conn.execute(query).first()
            if row is not None:
                break
            assert time.monotonic() < deadline, beat.output[-3000:]
            assert beat.proc.poll() is None, beat.output[-3000:]
            time.sleep(0.5)
    finally:
        beat.stop()
    assert f"Refused task message compute_index[{row.task_id}]" not in stack.worker.output
