"""Test-only tasks for the fault-injection scenarios (tests/reliability), loaded into a worker
with WAARDHAVEN_EXTRA_TASK_MODULES=chaos_tasks (and tests/support on PYTHONPATH).

Every run records an attempt, and effects are countable, so a test can tell "done once" from
"lost", "ran twice" and "done twice", from PostgreSQL (DATABASE_URL):

- `chaos.write(key, seconds)` records the attempt, then (if no earlier run finished the key)
  sleeps and adds the key's effect row. The effect row counts how many runs committed it
  (`n`): a re-run after success records an attempt and skips, as an idempotent task does; two
  runs at the same time (a message delivered twice while it runs) both commit: n = 2. With
  seconds=0, attempt and effect are one transaction.
- `chaos.txn(key, hold)`: a production database task (tasks.background_tasks.DatabaseTask: the
  production retry policy, MAX_RETRIES, backoff, the audit row) that writes its effect and
  holds the transaction open `hold` seconds before committing: a PostgreSQL outage that starts
  then hits a running transaction (pg_stat_activity shows it "idle in transaction").
- `chaos.flaky(key, fails)`: fails `fails` times (retried), then writes its effect.
- `chaos.suicide(key)` kills its own process every time (a poison message).

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
from sqlalchemy.orm import Session

from tasks.background_tasks import DatabaseTask
from tasks.celery_app import app
from tasks.db import session_scope

ATTEMPT = text("INSERT INTO chaos_attempts (key, pid, at) VALUES (:k, :p, clock_timestamp())")
ATTEMPTS = text("SELECT count(*) FROM chaos_attempts WHERE key = :k")
DONE = text("SELECT 1 FROM chaos_effects WHERE key = :k")
EFFECT = text(
    "INSERT INTO chaos_effects (key, n, pid, done_at) VALUES (:k, 1, :p, clock_timestamp())"
    " ON CONFLICT (key) DO UPDATE SET n = chaos_effects.n + 1"
)


def _attempt(key: str) -> int:
    """Record an attempt (committed at once); returns how many this key has had."""
    with session_scope() as session:
        session.execute(ATTEMPT, {"k": key, "p": os.getpid()})
        return int(session.execute(ATTEMPTS, {"k": key}).scalar_one())


def _effect_once(session: Session, key: str) -> bool:
    """Add the key's effect unless a run committed it already; False when it had."""
    if session.execute(DONE, {"k": key}).first() is not None:
        return False
    session.execute(EFFECT, {"k": key, "p": os.getpid()})
    return True


@app.task(name="chaos.write")
def write(key: str, seconds: float = 0.0) -> str:
    if not seconds:  # nothing to interrupt: attempt and effect in one transaction
        with session_scope() as session:
            session.execute(ATTEMPT, {"k": key, "p": os.getpid()})
            return key if _effect_once(session, key) else "already done"
    with session_scope() as session:
        session.execute(ATTEMPT, {"k": key, "p": os.getpid()})
        done = session.execute(DONE, {"k": key}).first() is not None
    if done:
        return "already done"
    time.sleep(seconds)
    with session_scope() as session:
        session.execute(EFFECT, {"k": key, "p": os.getpid()})
    return key


@app.task(name="chaos.txn", base=DatabaseTask, bind=True)
def txn(self: Any, key: str, hold: float = 0.0) -> str:
    _attempt(key)
    if not _effect_once(self.session, key):
        return "already done"
    time.sleep(hold)  # the effect is written, not committed: the transaction is running
    self.session.commit()
    return key


@app.task(name="chaos.flaky", bind=True, max_retries=5)
def flaky(self: Any, key: str, fails: int = 1) -> str:
    """Fails `fails` times (retried after a short countdown), then writes its effect."""
    attempts = _attempt(key)
    if attempts <= fails:
        raise self.retry(exc=RuntimeError(f"flaky {key}: attempt {attempts}"), countdown=0.2)
    with session_scope() as session:
        _effect_once(session, key)
    return key


@app.task(name="chaos.suicide")
def suicide(key: str) -> None:
    _attempt(key)
    os.kill(os.getpid(), signal.SIGKILL)
