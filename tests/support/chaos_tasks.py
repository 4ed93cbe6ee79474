"""Test-only tasks for the fault-injection scenarios (tests/reliability), loaded into a worker
with WAARDHAVEN_EXTRA_TASK_MODULES=chaos_tasks (and tests/support on PYTHONPATH).

Their effects are countable, so a test can tell "done once" from "lost" and "done twice":

- `chaos.write(key, seconds)` records the attempt, then (if no earlier run finished the key)
  sleeps and adds the key's effect row in PostgreSQL (DATABASE_URL). The effect row counts how
  many runs committed it (`n`): a redelivery after success skips, as an idempotent task does,
  but two runs at the same time (a message delivered twice while it runs) both commit: n = 2.
- `chaos.suicide(key)` kills its own process every time (a poison message).
- `chaos.tick(key)`, `chaos.flaky(key, fails)`: Redis-only effects for the load scenario.

Tables (created by tests/reliability/reliability_helpers.py):
  chaos_attempts(id serial, key text, pid int, at timestamptz)
  chaos_effects(key text primary key, n int, pid int, done_at timestamptz)
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from sqlalchemy import text

from tasks.base import _redis
from tasks.celery_app import app
from tasks.db import session_scope

EFFECTS_HASH = "chaos:effects"
ATTEMPTS_HASH = "chaos:attempts"

ATTEMPT = text("INSERT INTO chaos_attempts (key, pid, at) VALUES (:k, :p, clock_timestamp())")
DONE = text("SELECT 1 FROM chaos_effects WHERE key = :k")
EFFECT = text(
    "INSERT INTO chaos_effects (key, n, pid, done_at) VALUES (:k, 1, :p, clock_timestamp())"
    " ON CONFLICT (key) DO UPDATE SET n = chaos_effects.n + 1"
)


def _attempt(key: str) -> bool:
    """Record an attempt; True when an earlier run already committed the effect."""
    with session_scope() as session:
        session.execute(ATTEMPT, {"k": key, "p": os.getpid()})
        return session.execute(DONE, {"k": key}).first() is not None


@app.task(name="chaos.write", bind=True)
def write(self: Any, key: str, seconds: float = 0.0) -> str:
    params = {"k": key, "p": os.getpid()}
    if not seconds:  # nothing to interrupt: attempt and effect in one transaction
        with session_scope() as session:
            session.execute(ATTEMPT, params)
            if session.execute(DONE, {"k": key}).first() is None:
                session.execute(EFFECT, params)
                return key
        return "already done"
    if _attempt(key):
        return "already done"
    time.sleep(seconds)
    with session_scope() as session:
        session.execute(EFFECT, params)
    return key


@app.task(name="chaos.suicide", bind=True)
def suicide(self: Any, key: str) -> None:
    _attempt(key)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="chaos.tick")
def tick(key: str) -> str:
    _redis().hincrby(EFFECTS_HASH, key, 1)
    return key


@app.task(name="chaos.flaky", bind=True, max_retries=5)
def flaky(self: Any, key: str, fails: int = 1) -> str:
    """Fails `fails` times (retried after a short countdown), then succeeds."""
    attempts = _redis().hincrby(ATTEMPTS_HASH, key, 1)
    if attempts <= fails:
        raise self.retry(exc=RuntimeError(f"flaky {key}: attempt {attempts}"), countdown=0.2)
    _redis().hincrby(EFFECTS_HASH, key, 1)
    return key
