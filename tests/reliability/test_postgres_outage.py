"""Scenario 4: PostgreSQL goes away while refresh and compute tasks run, and comes back.

The tasks retry with exponential backoff (OperationalError is transient) and succeed once the
database is back; none is lost, and none is marked SUCCESS without its rows. The cluster is our
own (initdb + pg_ctl on a free port), so stopping it disturbs no one.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import PG_BIN, PostgresCluster, record, wait_until
from sqlalchemy import create_engine, text

from conftest import VENV_BIN
from tasks.celery_app import app
from tasks.market_data import SEED_ASSETS

OUTAGE = 8.0


@pytest.fixture
def cluster() -> Any:
    if not (PG_BIN / "initdb").exists():
        # A skip must not hide a missing dependency in CI.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no PostgreSQL server binaries in {PG_BIN} (set PG_BIN)"
        )
    pg = PostgresCluster().start()
    yield pg
    pg.close()


def cli(url: str, *args: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([str(VENV_BIN / "waardhaven-tasks"), *args], env=env, check=True, timeout=120)


@pytest.mark.slow
def test_tasks_retry_through_a_postgres_outage_and_lose_nothing(
    cluster: PostgresCluster, start_service: Any, redis_client: Any, tmp_path: Path
) -> None:
    url = cluster.create_database("waardhaven")
    cli(url, "migrate")
    cli(url, "seed")
    redis_client.flushdb()
    worker = start_service(
        "worker-high",
        WORKER_QUEUES="high_priority",
        WORKER_CONCURRENCY="2",
        DATABASE_URL=url,
        MAX_RETRIES="12",
        RETRY_BACKOFF_MAX="4",
    ).wait_ready()
    symbols = [a["symbol"] for a in SEED_ASSETS if a.get("is_active", True)]
    # Some prices first, so compute_index has something to work on.
    for s in symbols[:3]:
        app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": [s]}).get(60)

    refreshes = {
        s: app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": [s]})
        for s in symbols[3:]
    }
    computes = [app.send_task("compute_index") for _ in range(3)]
    time.sleep(0.5)  # the first ones are running
    cluster.stop("fast")  # terminates the open sessions, refuses new ones
    time.sleep(OUTAGE)
    cluster.start()
    back = time.time()

    sent = [*refreshes.values(), *computes]
    wait_until(lambda: all(r.ready() for r in sent), 120, 0.5, "every task to finish")
    recover = time.time() - back
    engine = create_engine(url)
    with engine.connect() as conn:
        prices = dict(
            conn.execute(
                text(
                    "SELECT a.symbol, count(p.id) FROM assets a"
                    " LEFT JOIN prices p ON p.asset_id = a.id GROUP BY a.symbol"
                )
            ).all()
        )
        index_days = conn.execute(text("SELECT count(*) FROM index_values")).scalar_one()
        runs = dict(conn.execute(text("SELECT task_id, state FROM task_runs")).all())
    engine.dispose()

    succeeded = [r for r in sent if r.state == "SUCCESS"]
    # SUCCESS only with its rows: each refresh inserted exactly its symbol's rows, once.
    without_rows = [
        s for s, r in refreshes.items()
        if r.state == "SUCCESS" and not (r.result["rows_inserted"] == prices[s] > 0)
    ]  # fmt: skip
    duplicated = sum(
        1 for r in refreshes.values() if r.state == "SUCCESS" and r.result["rows_updated"] > 0
    )
    without_rows += [
        r.id for r in computes if r.state == "SUCCESS" and not (0 < index_days <= r.result["days"])
    ]
    log = worker.output
    record(
        "PostgreSQL outage (8 s, during tasks)",
        sent=len(sent),
        completed=len(succeeded),
        duplicated=duplicated,
        lost=len(sent) - len(succeeded),
        recover_s=recover,
        retries=log.count("Retry in"),
        success_without_rows=len(without_rows),
    )
    assert [r.state for r in sent] == ["SUCCESS"] * len(sent), [
        (r.state, r.result) for r in sent if r.state != "SUCCESS"
    ]
    assert without_rows == []
    assert duplicated == 0
    assert log.count("Retry in") >= 1, "no task met the outage"
    assert "OperationalError" in log
    # The audit trail agrees once the database is back.
    assert all(runs.get(r.id) == "SUCCESS" for r in sent)
