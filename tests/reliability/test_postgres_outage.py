"""Scenario 4: PostgreSQL goes away for 60 s (a restart or a failover) while tasks are in the
middle of their transactions, and comes back. At production settings nothing is lost.

How: `pool_pre_ping` replaces dropped connections; OperationalError is retried (MAX_RETRIES,
backoff with full jitter: each countdown may be 0 s); and a new connection waits up to
DATABASE_RECONNECT_WAIT (30 s) for the server (tasks.db), so every run of a task that meets
the outage waits at least that long: MAX_RETRIES runs ride out 5 x 30 s = 150 s, whatever the
jitter draws. The cluster is our own (initdb + pg_ctl on a free port), so stopping it disturbs
no one.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import (
    CHAOS_TASKS,
    PG_BIN,
    Effects,
    PostgresCluster,
    Scenario,
    redis_leftovers,
    wait_until,
)
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from conftest import VENV_BIN, free_port
from tasks.celery_app import app
from tasks.db import make_engine
from tasks.market_data import SEED_ASSETS
from tasks.settings import Settings

OUTAGE = 60.0
RECONNECT_WAIT = Settings.model_fields["database_reconnect_wait"].default
MAX_RETRIES = Settings.model_fields["max_retries"].default
IN_TRANSACTION = text(
    "SELECT pid, query FROM pg_stat_activity"
    " WHERE state = 'idle in transaction' AND query LIKE 'INSERT INTO chaos_effects%'"
)


@pytest.fixture
def cluster() -> Any:
    # No skip: a missing PostgreSQL must fail the run, never hide a row.
    assert (PG_BIN / "initdb").exists(), f"no PostgreSQL server binaries in {PG_BIN} (PG_BIN)"
    pg = PostgresCluster().start()
    yield pg
    pg.close()


def cli(url: str, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([str(VENV_BIN / "waardhaven-tasks"), *args], env=env, check=True, timeout=120)


def test_production_settings_ride_out_the_outage() -> None:
    """The arithmetic the scenario relies on, at the defaults."""
    assert MAX_RETRIES * RECONNECT_WAIT >= 2 * OUTAGE


def test_a_new_connection_waits_for_the_server_but_not_for_a_wrong_database(
    cluster: PostgresCluster,
) -> None:
    nobody = make_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x", 1, 2.0)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="refused"):
        nobody.connect()
    assert 2.0 <= time.monotonic() - started < 6
    wrong = make_engine(cluster.url("no_such_database"), 1, 30.0)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="does not exist"):
        wrong.connect()
    assert time.monotonic() - started < 2  # not retried: waiting would not help
    engine = make_engine(cluster.url("postgres"), 1, 30.0)
    cluster.stop("fast")
    restart = threading.Timer(3.0, cluster.start)  # the server comes back 3 s from now
    restart.start()
    started = time.monotonic()
    with engine.connect() as conn:  # meanwhile: waits for it
        assert conn.execute(text("SELECT 1")).scalar() == 1
    waited = time.monotonic() - started
    restart.join()
    for e in (engine, nobody, wrong):
        e.dispose()
    assert 2.5 <= waited < 10


@pytest.mark.slow
def test_a_60_second_outage_during_transactions_loses_nothing(
    cluster: PostgresCluster, start_service: Any, redis_client: Any, tmp_path: Path
) -> None:
    url = cluster.create_database("waardhaven")
    cli(url, "migrate")
    cli(url, "seed")
    fx = Effects(url).reset()
    redis_client.flushdb()
    symbols = [a["symbol"] for a in SEED_ASSETS if a.get("is_active", True)]
    held = [f"held-{i}" for i in range(4)]  # 2 in a transaction at the fault, 2 queued
    during = [f"during-{i}" for i in range(4)]  # sent while PostgreSQL is down
    real: dict[str, Any] = {}  # refresh_market_data / compute_index results by task id
    worker_log: list[str] = []

    def retried_ids() -> set[str]:
        text_ = worker_log[0] if worker_log else ""
        return set(re.findall(r"\[([0-9a-f-]{36}|[\w-]+)\] retry: Retry in", text_))

    def measure() -> dict[str, int]:
        if not cluster.running():
            cluster.start()
        keys = held + during
        effects = fx.effects()
        attempts = fx.attempt_counts()
        waiting = redis_leftovers(redis_client)
        ok = {k for k in keys if k in effects} | {i for i, r in real.items() if ok_real(r)}
        ids = keys + list(real)
        unfinished = sum(1 for i in ids if i not in ok and i in waiting)
        retried = retried_ids()
        return {
            "sent": len(ids),
            "completed": len(ok),
            "reran": sum(1 for k in keys if attempts[k] > 1) + sum(1 for i in real if i in retried),
            "duplicated": sum(1 for k in keys if effects.get(k, (0,))[0] > 1),
            "lost": len(ids) - len(ok) - unfinished,
            "unfinished": unfinished,
        }

    def ok_real(result: Any) -> bool:
        if result.state != "SUCCESS":
            return False
        if "rows_inserted" in result.result:
            return bool(result.result["rows_inserted"] > 0)
        return bool(result.result.get("days", 0) > 0)

    def recovered() -> float | None:
        last = fx.done_at(held + during)
        dates = [r.date_done for r in real.values()]
        if last is None or not all(r.state == "SUCCESS" for r in real.values()):
            return None
        return max([last, *(d.replace(tzinfo=dt.UTC).timestamp() for d in dates)])

    with Scenario("PostgreSQL outage (60 s, during transactions)", differs="") as sc:
        # Production settings: MAX_RETRIES, RETRY_BACKOFF_MAX, DATABASE_RECONNECT_WAIT and the
        # time limits are the defaults.
        worker = start_service(
            "worker-high", WORKER_QUEUES="high_priority", DATABASE_URL=url, **CHAOS_TASKS
        ).wait_ready()
        sc.measure = measure
        sc.recovered = recovered
        # Prices first, so compute_index has something to work on.
        for s in symbols[:3]:
            app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": [s]}).get(60)
        for key in held:
            app.send_task("chaos.txn", args=[key, 3.0], task_id=key, queue="high_priority")
        watcher = create_engine(url, isolation_level="AUTOCOMMIT")
        with watcher.connect() as conn:
            # Both worker children have written and not committed: the outage starts now.
            in_tx = wait_until(
                lambda: len(rows := conn.execute(IN_TRANSACTION).all()) == 2 and rows,
                30,
                0.02,
                "two transactions in flight",
            )
            sc.fault_at = time.time()
            cluster.stop("fast")  # terminates the open sessions, refuses new ones
        watcher.dispose()
        sc.details["in_transaction_at_fault"] = len(in_tx)
        # Work keeps arriving while the database is away.
        for i, key in enumerate(during):
            time.sleep(OUTAGE / (len(during) + 1))
            app.send_task("chaos.txn", args=[key, 0.5], task_id=key, queue="high_priority")
            if i % 2 == 0:
                refresh = app.send_task(
                    "refresh_market_data", kwargs={"mode": "full", "symbols": [symbols[3 + i]]}
                )
                real[refresh.id] = refresh
            else:
                compute = app.send_task("compute_index")
                real[compute.id] = compute
        time.sleep(max(0.0, sc.fault_at + OUTAGE - time.time()))
        cluster.start()
        sc.details["outage_s"] = round(time.time() - sc.fault_at, 1)

        wait_until(lambda: recovered() is not None, 240, 0.5, "every task to finish")
        worker_log.append(worker.output)
        figures = measure()
        sc.details["retries"] = worker_log[0].count("retry: Retry in")
        attempts = fx.attempt_counts()
        assert [r.state for r in real.values()] == ["SUCCESS"] * len(real)
        assert figures["completed"] == figures["sent"], figures
        assert figures["lost"] == 0 and figures["duplicated"] == 0
        # The two caught mid-transaction were rolled back and ran again (retried).
        first_two = sorted(held, key=lambda k: attempts[k], reverse=True)[:2]
        assert all(attempts[k] >= 2 for k in first_two), attempts
        assert "server closed the connection unexpectedly" in worker_log[0] or (
            "terminating connection" in worker_log[0]
        )
        assert "PostgreSQL unavailable" in worker_log[0]  # new connections waited
