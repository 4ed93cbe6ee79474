"""Test-only beat entry for the Sentinel scenario: `sentinel.beat_tick` every TICK seconds.

Loaded into beat and the worker with WAARDHAVEN_EXTRA_TASK_MODULES=...,sentinel_tasks (beat
imports the app's modules before it builds its schedule). Beat stamps each tick's message with
the time it was sent (`before_task_publish`, in the beat process); the worker writes one row per
message into chaos_attempts (key "beat-tick:<task id>", at = the send time). A tick sent twice
for one slot shows as two ids less than TICK apart; a skipped or lost tick as a gap.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.signals import before_task_publish
from sqlalchemy import text

from tasks.celery_app import Queue, app
from tasks.db import session_scope

TICK = float(os.environ.get("SENTINEL_TICK", "3.0"))  # the test sets it
TASK = "sentinel.beat_tick"

app.conf.beat_schedule["sentinel-beat-tick"] = {
    "task": TASK,
    "schedule": TICK,
    "options": {"queue": Queue.HIGH.value, "expires": 120},
}

RECORD = text("INSERT INTO chaos_attempts (key, pid, at) VALUES (:k, :p, to_timestamp(:sent))")


@before_task_publish.connect
def _stamp(sender: str | None = None, body: Any = None, **_: Any) -> None:
    if sender == TASK and isinstance(body, tuple | list) and isinstance(body[1], dict):
        body[1]["sent_at"] = time.time()


@app.task(name=TASK, bind=True)
def beat_tick(self: Any, sent_at: float | None = None) -> None:
    with session_scope() as session:
        session.execute(
            RECORD, {"k": f"beat-tick:{self.request.id}", "p": os.getpid(), "sent": sent_at}
        )
