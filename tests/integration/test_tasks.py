"""The tasks on real worker processes (services/*/run), real Redis and real PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from tasks.celery_app import app
from tasks.db import session_scope
from tasks.models import Allocation, Asset, IndexValue, Price, Report, RiskMetric, TaskRun

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
    return {
        "MARKET_DATA_PROVIDER": "twelvedata",
        "TWELVEDATA_URL": url,
        "TWELVEDATA_API_KEY": "test-key",
        "PROVIDER_CREDITS_PER_MINUTE": "10000",
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
    app.control.revoke(queued.id)
    # as `waardhaven-tasks revoke --terminate` does: children ignore SIGTERM (REMAP_SIGTERM)
    app.control.revoke(running.id, terminate=True, signal="SIGQUIT")
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
