"""The tasks on real worker processes (services/*/run), real Redis and real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from conftest import REPO, VENV_BIN, free_port
from tasks import revokes
from tasks.celery_app import app
from tasks.db import session_scope
from tasks.models import Allocation, Asset, IndexValue, Price, Report, RiskMetric, TaskRun
from tasks.settings import get_settings

TIMEOUT = 120


def run(name: str, **kwargs: Any) -> Any:
    return app.send_task(name, kwargs=kwargs)


def wait(result: Any, timeout: float = TIMEOUT) -> Any:
    return result.get(timeout=timeout, propagate=False)


def task_runs(timeout: float = 10) -> list[Any]:
    """The audit rows, once every run has recorded its end (after its result is stored)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            rows = session.execute(select(TaskRun.name, TaskRun.state, TaskRun.error)).all()
        if all(r.state != "STARTED" for r in rows) or time.monotonic() > deadline:
            return rows


def count(model: Any) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_each_task_lands_on_its_queue(clean_db: str, redis_client: Any) -> None:
    """No worker runs: the messages wait in Redis, each in its queue, as JSON."""
    redis_client.flushdb()
    app.loader.import_default_modules()  # as in beat and the CLI: the tasks are registered
    app.finalize()
    expected = {
        "refresh_market_data": "high_priority",
        "compute_index": "high_priority",
        "generate_report": "low_priority",
        "cleanup_old_data": "low_priority",
        "ping": "default",
    }
    for name in expected:
        app.send_task(name)  # routed by name alone, as beat and the CLI send them
    for name, queue in expected.items():
        messages = [json.loads(m) for m in redis_client.lrange(queue, 0, -1)]
        names = [m["headers"]["task"] for m in messages]
        assert name in names, f"{name} not in {queue}: {names}"
        assert all(m["content-type"] == "application/json" for m in messages)
        # No time limits from the sender: the worker's TASK_*_TIME_LIMIT apply.
        assert all(m["headers"]["timelimit"] == [None, None] for m in messages)
    redis_client.flushdb()


def test_refresh_index_report_chain_end_to_end(worker: Any) -> None:
    refreshed = wait(
        run(
            "refresh_market_data",
            mode="full",
            symbols=["AAPL", "MSFT", "SPY", "^GSPC", "GLD", "TLT"],
        )
    )
    assert isinstance(refreshed, dict), refreshed
    assert refreshed["assets_refreshed"] == 6
    assert refreshed["rows_inserted"] > 6 * 250  # years of business days
    assert refreshed["symbols_failed"] == {}
    prices = count(Price)
    assert prices == refreshed["rows_inserted"]

    indexed = wait(run("compute_index"))
    assert isinstance(indexed, dict), indexed
    assert indexed["assets"] == 5  # ^GSPC is the benchmark, never in the index
    with session_scope() as session:
        values = session.execute(
            select(IndexValue.date, IndexValue.value).order_by(IndexValue.date)
        ).all()
        assert values[0].value == pytest.approx(100.0)
        assert len(values) == indexed["days"]
        weights = session.execute(
            select(Allocation.date, func.sum(Allocation.weight)).group_by(Allocation.date)
        ).all()
        assert len(weights) == indexed["rebalances"] > 1
        assert all(total == pytest.approx(1.0) for _, total in weights)
        gspc = session.scalar(select(Asset.id).where(Asset.symbol == "^GSPC"))
        assert session.scalar(select(func.count()).where(Allocation.asset_id == gspc)) == 0

    reported = wait(run("generate_report", report_type="performance", period_days=90))
    assert isinstance(reported, dict), reported
    with session_scope() as session:
        report = session.get(Report, reported["report_id"])
        assert report is not None and report.kind == "performance"
        assert report.metrics["beta"] is not None  # benchmark aligned by date
        assert "Sharpe" in report.body or "sharpe" in report.body.lower()
        assert session.scalar(select(func.count()).select_from(RiskMetric)) == 1
    runs = {r.name: r.state for r in task_runs()}
    assert runs == {
        "refresh_market_data": "SUCCESS",
        "compute_index": "SUCCESS",
        "generate_report": "SUCCESS",
    }


def test_tasks_are_idempotent(worker: Any) -> None:
    symbols = ["AAPL", "GLD", "TLT"]
    first = wait(run("refresh_market_data", mode="full", symbols=symbols))
    snapshot = _prices()
    again = wait(run("refresh_market_data", mode="full", symbols=symbols))
    assert again["rows_inserted"] == 0
    assert again["rows_updated"] == first["rows_inserted"]
    assert _prices() == snapshot
    wait(run("compute_index"))
    index_once = _index()
    wait(run("compute_index"))
    assert _index() == index_once


def _prices() -> list[tuple[Any, ...]]:
    with session_scope() as session:
        return [
            tuple(r)
            for r in session.execute(
                select(Price.asset_id, Price.date, Price.close).order_by(Price.asset_id, Price.date)
            )
        ]


def _index() -> tuple[list[Any], list[Any]]:
    with session_scope() as session:
        values = [
            tuple(r)
            for r in session.execute(
                select(IndexValue.date, IndexValue.value).order_by(IndexValue.date)
            )
        ]
        allocations = [
            tuple(r)
            for r in session.execute(
                select(Allocation.date, Allocation.asset_id, Allocation.weight).order_by(
                    Allocation.date, Allocation.asset_id
                )
            )
        ]
    return values, allocations


def test_smart_refresh_fetches_only_the_recent_days(worker: Any) -> None:
    wait(run("refresh_market_data", mode="smart", symbols=["AAPL"]))
    with session_scope() as session:
        oldest = session.scalar(select(func.min(Price.date)))
    assert oldest is not None
    # Never older than what cleanup keeps (RETENTION_DAYS = 365 by default).
    assert (time.time() - time.mktime(oldest.timetuple())) / 86400 <= 366
    again = wait(run("refresh_market_data", mode="smart", symbols=["AAPL"]))
    assert again["rows_inserted"] == 0
    assert 0 < again["rows_updated"] <= 6  # only the overlap of a few days is fetched again


def test_large_refresh_runs_as_chunks_with_progress(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    redis_client.flushdb()
    start_service(
        "worker-high",
        WORKER_QUEUES="high_priority",
        REFRESH_CHUNK_SIZE="3",
        WORKER_CONCURRENCY="2",
    ).wait_ready()
    result = app.send_task("refresh_market_data", kwargs={"mode": "full"})
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT
    while not result.ready() and time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)  # state and info read together
        if meta["status"] == "PROGRESS":
            seen.append(meta["result"])
        time.sleep(0.05)
    summary = result.get(timeout=5)
    assert summary["assets_refreshed"] == 14  # the seed universe, in 5 chunks of <= 3
    assert summary["rows_inserted"] == count(Price)
    assert seen, "no PROGRESS state observed"
    assert all(p["total"] == 5 and 0 <= p["current"] <= 5 for p in seen)
    assert {"current", "total", "status"} <= set(seen[-1])


def test_progress_is_visible_through_async_result(worker: Any) -> None:
    result = run("refresh_market_data", mode="full")
    states = set()
    infos = []
    deadline = time.monotonic() + TIMEOUT
    while not result.ready() and time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)  # state and info read together
        states.add(meta["status"])
        if meta["status"] == "PROGRESS":
            infos.append(meta["result"])
        time.sleep(0.02)
    assert result.state == "SUCCESS"
    assert "PROGRESS" in states
    currents = [i["current"] for i in infos]
    assert currents == sorted(currents) and all(i["total"] == 14 for i in infos)


@pytest.mark.parametrize(
    ("task", "kwargs", "field"),
    [
        ("generate_report", {"report_type": "bogus"}, "report_type"),
        ("generate_report", {"period_days": "thirty"}, "period_days"),
        ("refresh_market_data", {"mode": "everything"}, "mode"),
        ("refresh_market_data", {"symbols": "AAPL"}, "symbols"),
        ("compute_index", {"start": "yesterday"}, "start"),
        ("cleanup_old_data", {"days_to_keep": -1}, "days_to_keep"),
    ],
)
def test_bad_input_fails_at_once_naming_the_field(
    worker: Any, task: str, kwargs: dict[str, Any], field: str
) -> None:
    result = run(task, **kwargs)
    outcome = wait(result, timeout=30)
    assert result.state == "FAILURE"
    assert type(outcome).__name__ == "InvalidTaskArguments"
    assert repr(field) in str(outcome)
    rows = task_runs()
    assert len(rows) == 1 and rows[0].state == "FAILURE"  # ran once: no retry
    assert "Retry in" not in worker.output
    # The worker keeps serving.
    assert wait(run("ping"), timeout=30) == "pong"


@pytest.fixture
def fake_api() -> Any:
    from fake_twelvedata import FakeTwelveData

    servers: list[FakeTwelveData] = []

    def make(**kwargs: Any) -> FakeTwelveData:
        servers.append(FakeTwelveData(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def http_provider(url: str, **extra: str) -> dict[str, str]:
    """The real provider at the free tier's quota (the defaults: 8 a minute, 800 a day)."""
    return {
        "MARKET_DATA_PROVIDER": "twelvedata",
        "TWELVEDATA_URL": url,
        "TWELVEDATA_API_KEY": "test-key",
        **extra,
    }


def test_transient_provider_errors_retry_with_backoff(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    redis_client.flushdb()
    api = fake_api(fail_first=3, fail_status=503)
    worker = start_service("worker-high", **http_provider(api.url)).wait_ready()
    result = app.send_task("refresh_market_data", kwargs={"symbols": ["AAPL"]})
    summary = result.get(timeout=TIMEOUT)
    assert summary["assets_refreshed"] == 1 and summary["rows_inserted"] > 0
    assert len(api.requests) == 4  # three 503s, then the answer
    gaps = [b[0] - a[0] for a, b in zip(api.requests, api.requests[1:], strict=False)]
    # retry_backoff: countdowns drawn from [0, 1], [0, 2], [0, 4] s (full jitter)
    assert all(gap <= 2**i + 1.5 for i, gap in enumerate(gaps, start=1)), gaps
    assert worker.output.count("Retry in") == 3


def test_soft_time_limit_keeps_what_was_finished(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    redis_client.flushdb()
    # 12 requests of 0.6 s (7.2 s) against a 3 s soft limit: a few symbols finish, even on a
    # loaded machine where the first commit is slow, and most do not.
    api = fake_api(delay=0.6)
    start_service(
        "worker-high",
        TASK_SOFT_TIME_LIMIT="3",
        TASK_TIME_LIMIT="15",
        VISIBILITY_TIMEOUT="60",
        PROVIDER_BATCH_SIZE="1",
        **http_provider(api.url),
    ).wait_ready()
    symbols = ["AAPL", "MSFT", "GOOGL", "NVDA", "AMZN", "TSLA", "META", "GLD", "SLV", "USO"]
    symbols += ["TLT", "IEF"]
    result = app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": symbols})
    outcome = result.get(timeout=TIMEOUT, propagate=False)
    assert result.state == "FAILURE"
    assert type(outcome).__name__ == "PartialResult"
    assert "soft time limit" in str(outcome)
    task_runs()
    with session_scope() as session:
        stored = session.scalar(select(func.count(func.distinct(Price.asset_id))))
        run_row = session.scalars(select(TaskRun)).one()
    assert 1 <= (stored or 0) < len(symbols)  # the finished symbols are kept
    assert run_row.state == "FAILURE" and "PartialResult" in (run_row.error or "")
    assert run_row.rows_written == count(Price) > 0


def test_revoke_queued_and_terminate_running(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    redis_client.flushdb()
    api = fake_api(delay=1.0)
    start_service(
        "worker-high", WORKER_CONCURRENCY="1", PROVIDER_BATCH_SIZE="1", **http_provider(api.url)
    ).wait_ready()
    running = app.send_task("refresh_market_data", kwargs={"mode": "full"})
    queued = app.send_task("compute_index")
    deadline = time.monotonic() + 30
    while running.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.state == "PROGRESS"
    # as `waardhaven-tasks revoke [--terminate]` does: recorded, broadcast, SIGQUIT to stop
    revokes.revoke(app, queued.id)
    revokes.revoke(app, running.id, terminate=True)
    deadline = time.monotonic() + 30
    while not (running.ready() and queued.ready()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running.state == "REVOKED"
    assert queued.state == "REVOKED"
    assert count(IndexValue) == 0  # the revoked compute_index never ran
    time.sleep(2)  # a request already in flight may still land
    settled = len(api.requests)
    time.sleep(3)
    assert len(api.requests) == settled < 14  # the terminated refresh fetches nothing more


# --- the provider's quota (issue 9) ----------------------------------------------------------


def assets_with_prices() -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(
            select(Asset.symbol, func.count(Price.date))
            .join(Price, Price.asset_id == Asset.id)
            .group_by(Asset.symbol)
        ).all()
    return {symbol: int(n) for symbol, n in rows}


def run_row(task_id: str, timeout: float = 10) -> Any:
    """The task_runs row of a run once it has a final state (or whatever it has at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            row = session.scalars(select(TaskRun).where(TaskRun.task_id == task_id)).first()
            if row is not None:
                session.expunge(row)
        if (row is not None and row.state != "STARTED") or time.monotonic() > deadline:
            return row
        time.sleep(0.2)


def follow(result: Any, timeout: float) -> list[dict[str, Any]]:
    """PROGRESS infos seen until the task is ready."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not result.ready() and time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] == "PROGRESS" and meta["result"] not in seen:
            seen.append(meta["result"])
        time.sleep(0.1)
    return seen


@pytest.mark.slow
def test_the_seed_universe_refreshes_at_8_credits_a_minute(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    """14 symbols, 8 credits a minute: a batch of 8, a wait for the next minute's credits, a
    batch of 6, through a real worker; the wait is no retry and the server never refuses."""
    redis_client.flushdb()
    api = fake_api(credits_per_minute=8, credits_per_day=800)
    worker = start_service("worker-high", **http_provider(api.url)).wait_ready()
    started = time.monotonic()
    result = app.send_task("refresh_market_data", kwargs={"mode": "full"})
    seen = follow(result, timeout=240)
    summary = result.get(timeout=5)
    took = time.monotonic() - started
    assert summary["assets_refreshed"] == 14 and summary["symbols_failed"] == {}
    stored = assets_with_prices()
    assert len(stored) == 14 and all(n > 1000 for n in stored.values())  # 2018.. every asset
    assert summary["rows_inserted"] == count(Price)
    assert [len(symbols) for _, symbols in api.granted] == [8, 6]
    assert api.refused == []  # our limiter kept to the quota: no request was wasted
    assert max(api.credits_by_minute().values()) <= 8
    assert 55 < took < 180
    waiting = [p for p in seen if p["status"].startswith("waiting")]
    assert waiting, seen
    assert "for provider credits (8/min)" in waiting[0]["status"]
    assert 0 < float(waiting[0]["status"].split()[1].rstrip("s")) <= 61
    assert "Retry in" not in worker.output  # waiting for credits is not a retry
    row = run_row(result.id)
    assert row.state == "SUCCESS" and row.rows_written == count(Price)


@pytest.mark.slow
@pytest.mark.parametrize("over_quota", ["body", "http"])
def test_a_refusal_by_the_server_waits_for_the_next_minute(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any, over_quota: str
) -> None:
    """Another client of the same API key spent the minute's credits: TwelveData answers 429
    (HTTP 200 with code 429, or HTTP 429); the refresh waits for the next minute and finishes."""
    import httpx

    redis_client.flushdb()
    api = fake_api(over_quota=over_quota)
    worker = start_service("worker-high", **http_provider(api.url)).wait_ready()
    while time.time() % 60 > 45:  # the other client and the task within one calendar minute
        time.sleep(1)
    other = httpx.get(
        f"{api.url}/time_series",
        params={
            "symbol": "X1,X2,X3,X4,X5,X6,X7",
            "start_date": "2024-01-01",
            "end_date": "2024-01-03",
        },
        headers={"Authorization": "apikey test-key"},
    )
    assert other.status_code == 200 and "X7" in other.json()
    result = app.send_task("refresh_market_data", kwargs={"symbols": ["AAPL", "MSFT"]})
    summary = result.get(timeout=150)
    assert summary["assets_refreshed"] == 2
    assert set(assets_with_prices()) == {"AAPL", "MSFT"}
    assert [kind for _, kind in api.refused] == ["minute"]
    refused_at = api.refused[0][0]
    served_at = api.granted[-1][0]
    assert int(served_at // 60) == int(refused_at // 60) + 1  # the next calendar minute
    assert "Retry in" not in worker.output
    assert run_row(result.id).state == "SUCCESS"


def test_the_days_cap_stops_the_run_and_the_next_day_goes_on(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    redis_client.flushdb()
    api = fake_api(credits_per_day=3)  # what is left of the day's credits
    worker = start_service(
        "worker-high", PROVIDER_BATCH_SIZE="2", **http_provider(api.url)
    ).wait_ready()
    symbols = ["AAPL", "GLD", "MSFT", "SPY"]
    result = app.send_task("refresh_market_data", kwargs={"symbols": symbols})
    outcome = result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE" and type(outcome).__name__ == "QuotaExhausted"
    message = str(outcome)
    assert "credits for the day used up" in message and "2 symbols left" in message
    assert "credits return in" in message and "the next run goes on from them" in message
    assert outcome.args[1]["symbols_left"] == ["MSFT", "SPY"]
    assert outcome.args[1]["assets_refreshed"] == 2
    assert set(assets_with_prices()) == {"AAPL", "GLD"}  # what it wrote stays
    assert [kind for _, kind in api.refused] == ["day"]
    row = run_row(result.id)
    assert row.state == "FAILURE" and "QuotaExhausted" in row.error
    assert row.rows_written == count(Price) > 0
    requests = len(api.requests)
    time.sleep(3)
    assert len(api.requests) == requests  # no retry every minute: it stopped
    assert "Retry in" not in worker.output

    api.credits_per_day = 800
    api.next_day()
    again = app.send_task("refresh_market_data", kwargs={"symbols": symbols}).get(timeout=60)
    assert again["assets_refreshed"] == 4
    assert api.granted[1][1] == ["MSFT", "SPY"]  # the next run starts with the symbols left
    assert set(assets_with_prices()) == set(symbols)


def test_a_retry_resumes_with_the_symbols_not_yet_written(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    redis_client.flushdb()
    api = fake_api(fail_at={2}, fail_status=503)  # the second request fails once
    start_service("worker-high", PROVIDER_BATCH_SIZE="1", **http_provider(api.url)).wait_ready()
    symbols = ["AAPL", "GLD", "MSFT"]
    result = app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": symbols})
    summary = result.get(timeout=60)
    assert summary["assets_refreshed"] == 3 and summary["rows_inserted"] == count(Price)
    asked = [q["symbol"][0] for _, q in api.requests]
    assert asked == ["AAPL", "GLD", "GLD", "MSFT"]  # AAPL is not fetched again
    assert run_row(result.id).state == "SUCCESS"


def test_a_refresh_continues_in_new_messages_past_its_time_budget(
    start_service: Any, clean_db: str, redis_client: Any, fake_api: Any
) -> None:
    """REFRESH_TASK_SECONDS=1 with 0.6 s requests: four continuations (Task.replace, same id),
    more than MAX_DELIVERIES, none counted as a redelivery; one final row in task_runs."""
    redis_client.flushdb()
    api = fake_api(delay=0.6)
    worker = start_service(
        "worker-high", PROVIDER_BATCH_SIZE="1", REFRESH_TASK_SECONDS="1", **http_provider(api.url)
    ).wait_ready()
    symbols = ["AAPL", "GLD", "MSFT", "SPY", "TLT", "IEF", "NVDA", "META"]
    result = app.send_task("refresh_market_data", kwargs={"mode": "full", "symbols": symbols})
    seen = follow(result, timeout=90)
    summary = result.get(timeout=5)
    assert summary["assets_refreshed"] == 8 and summary["rows_inserted"] == count(Price)
    assert sorted(q["symbol"][0] for _, q in api.requests) == sorted(symbols)  # each once
    assert worker.output.count("refresh continues in a new message") >= 3
    assert max(p["current"] for p in seen) >= 4  # progress carries over the continuations
    with session_scope() as session:
        rows = session.execute(select(TaskRun.task_id, TaskRun.name)).all()
    assert [tuple(r) for r in rows] == [(result.id, "refresh_market_data")]
    row = run_row(result.id)
    assert row.state == "SUCCESS" and row.rows_written == count(Price)


def test_a_chunked_refresh_ends_its_run_row(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    redis_client.flushdb()
    start_service("worker-high", REFRESH_CHUNK_SIZE="4", WORKER_CONCURRENCY="2").wait_ready()
    result = app.send_task("refresh_market_data", kwargs={"mode": "full"})
    summary = result.get(timeout=TIMEOUT)
    assert summary["assets_refreshed"] == 14
    row = run_row(result.id)
    assert row.name == "refresh_market_data"
    assert row.state == "SUCCESS" and row.finished_at is not None
    assert row.rows_written == summary["rows_inserted"] == count(Price)
    states = {r.state for r in task_runs() if r.name == "refresh_market_data_chunk"}
    assert states == {"SUCCESS"}


# --- reports in trading days --------------------------------------------------------------


def store_index(days: list[str]) -> None:
    import datetime as dt

    with session_scope() as session:
        for i, day in enumerate(days):
            session.add(IndexValue(date=dt.date.fromisoformat(day), value=100.0 + i))


def test_report_periods_are_trading_days(worker: Any) -> None:
    store_index(["2026-11-26", "2026-11-27", "2026-11-30"])  # Thursday, Friday, Monday
    two = wait(run("generate_report", period_days=2))
    assert isinstance(two, dict), two
    assert two["metrics"]["start_date"] == "2026-11-26"  # 2 trading days before Monday
    assert two["metrics"]["days"] == 2
    too_long = run("generate_report", period_days=3)
    outcome = wait(too_long)
    assert type(outcome).__name__ == "InvalidTaskArguments"
    assert "'period_days'" in str(outcome)
    assert "3 trading days need 4 index values but 3 are stored" in str(outcome)


# --- deliveries: only deaths count ------------------------------------------------------------


def test_soft_shutdown_requeues_are_not_poison_deliveries(
    start_service: Any, clean_db: str, redis_client: Any
) -> None:
    """Three rollouts in a row catch the same task (SIGTERM: soft shutdown, requeue); the
    fourth delivery still runs it to the end (MAX_DELIVERIES is 3)."""
    redis_client.flushdb()
    assert get_settings().max_deliveries == 3
    env = {
        "WAARDHAVEN_EXTRA_TASK_MODULES": "extra_tasks",
        "PYTHONPATH": str(REPO / "tests" / "support"),
        "WORKER_SOFT_SHUTDOWN_TIMEOUT": "1",
        "WORKER_CONCURRENCY": "1",
        "WORKER_QUEUES": "default",
    }
    result = app.send_task("test.sleep", args=[6], queue="default")
    for _ in range(3):
        worker = start_service("worker-high", **env).wait_ready()
        deadline = time.monotonic() + 30
        while result.state != "STARTED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert result.state == "STARTED"
        worker.stop(signal.SIGTERM)
        assert "Soft Shutdown" in worker.output
        assert not result.ready()  # put back on the queue, not failed
        _reset_state(redis_client, result.id)
    start_service("worker-high", **env).wait_ready()
    assert result.get(timeout=30) == 6


def _reset_state(redis_client: Any, task_id: str) -> None:
    """Forget the STARTED state of the requeued run, so the next STARTED is the next run."""
    redis_client.delete(f"celery-task-meta-{task_id}")


# --- debug mode -------------------------------------------------------------------------------


def test_eager_mode_runs_tasks_in_the_cli_without_a_worker(clean_db: str) -> None:
    """No worker and no Redis (nothing listens at REDIS_URL): the CLI runs the task itself."""
    nowhere = f"redis://:x@127.0.0.1:{free_port()}/0"
    env = {**os.environ, "TASK_ALWAYS_EAGER": "true", "REDIS_URL": nowhere}
    cli = str(VENV_BIN / "waardhaven-tasks")
    ping = subprocess.run(
        [cli, "submit", "ping"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ping.returncode == 0, ping.stderr
    assert '"pong"' in ping.stdout
    refresh = subprocess.run(
        [cli, "submit", "refresh_market_data", "--arg", 'symbols=["AAPL", "GLD"]'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refresh.returncode == 0, refresh.stderr
    assert json.loads(refresh.stdout.split("\n", 1)[1])["assets_refreshed"] == 2
    assert set(assets_with_prices()) == {"AAPL", "GLD"}
    bad = subprocess.run(
        [cli, "submit", "generate_report", "--arg", "period_days=thirty"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "period_days" in bad.stderr


def test_a_worker_refuses_to_start_in_eager_mode(start_service: Any, clean_db: str) -> None:
    worker = start_service("worker-high", TASK_ALWAYS_EAGER="true")
    assert worker.proc.wait(timeout=60) != 0
    assert "TASK_ALWAYS_EAGER=true runs tasks in the calling process" in worker.output
    assert "a worker refuses to start with it" in worker.output
