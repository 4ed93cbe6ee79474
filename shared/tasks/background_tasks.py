"""The Celery tasks. Thin: validate the JSON arguments, call the domain, report progress.

Every task raises on failure (FAILURE state, retried when the error is transient); none returns
a "failed" dict as SUCCESS. Every task is idempotent: its writes are upserts on natural keys.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import psycopg2
from billiard.pool import SIG_SOFT_TIMEOUT
from celery import chord
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from tasks import index, metrics, reports, store
from tasks.base import WaardhavenTask, _redis
from tasks.celery_app import app
from tasks.db import new_session, session_scope
from tasks.errors import InvalidTaskArguments, NotEnoughData, PartialResult
from tasks.market_data import RateLimited, TransientProviderError, get_provider
from tasks.progress import Progress
from tasks.settings import get_settings

logger = get_task_logger(__name__)

# Errors that go away by themselves: a provider timeout or 5xx, a dropped DB connection (as
# SQLAlchemy wraps it, or raw from psycopg2 where db.copy_upsert works on the DBAPI cursor).
TRANSIENT_ERRORS = (
    TransientProviderError,
    OperationalError,
    InterfaceError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
)


class DatabaseTask(WaardhavenTask):
    """A session per task (commit, rollback, close) and a row in `task_runs` for operators."""

    abstract = True
    rows_written = 0  # reset per run in before_start
    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = True
    retry_jitter = True

    def __init__(self) -> None:
        settings = get_settings()
        self.retry_backoff_max = settings.retry_backoff_max
        self.max_retries = settings.max_retries
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = new_session()
        return self._session

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.rows_written = 0
        self._audit(task_id, state="STARTED", started_at=dt.datetime.now(dt.UTC))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Released here, whatever the outcome: Celery calls after_return for neither RETRY nor
        # REJECTED, and a session left behind by a retried run (its connection dropped by a
        # PostgreSQL restart) would fail the next task in this process with
        # PendingRollbackError.
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._release_session()

    def _release_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        try:
            session.rollback()  # nothing uncommitted survives a task
            session.close()
        except SQLAlchemyError as exc:
            logger.warning("database session not closed cleanly: %s", exc)
            session.invalidate()

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self._release_session()
        error = None if status == "SUCCESS" else f"{type(retval).__name__}: {retval}"
        self._audit(
            task_id,
            state=status,
            finished_at=dt.datetime.now(dt.UTC),
            rows_written=getattr(self, "rows_written", 0),
            error=error,
        )

    def _audit(self, task_id: str, **values: Any) -> None:
        delivery = self.request.delivery_info or {}
        try:
            with session_scope() as session:
                store.record_task_run(
                    session,
                    {
                        "task_id": task_id,
                        "name": self.name,
                        "queue": delivery.get("routing_key"),
                        # a message header: "api:<token>", "beat", "cli:<user>" (docs/api.md)
                        "requested_by": self.request.get("requested_by"),
                        **values,
                    },
                )
        except (OperationalError, InterfaceError) as exc:
            # The audit trail must never turn a good task into a failed one.
            logger.warning("task_runs not written for %s: %s", task_id, exc)


def _validate(model: type[BaseModel], **kwargs: Any) -> Any:
    try:
        return model(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise InvalidTaskArguments(field, err["msg"]) from None


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RefreshArgs(_Args):
    mode: Literal["smart", "full"] = "smart"
    symbols: list[str] | None = Field(None, min_length=1, max_length=5000)


class IndexArgs(_Args):
    start: dt.date | None = None
    end: dt.date | None = None


class ReportArgs(_Args):
    report_type: Literal["performance", "allocation", "risk"] = "performance"
    period_days: int = Field(30, ge=2, le=36500)


class CleanupArgs(_Args):
    days_to_keep: int = Field(365, ge=1, le=36500)


def _parse_date(field: str, value: Any) -> dt.date | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTaskArguments(field, f"expected a YYYY-MM-DD string, got {value!r}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidTaskArguments(field, f"expected a YYYY-MM-DD date, got {value!r}") from None


@contextmanager
def committed_with_its_count() -> Iterator[None]:
    """Hold off the soft time limit while a batch is written, committed and counted.

    billiard signals the soft limit with SIG_SOFT_TIMEOUT (SIGUSR1) and the handler raises
    SoftTimeLimitExceeded wherever the task is. Raised between a commit and its count, the task
    would report fewer rows than it kept; raised between a write and its commit, it would leave
    half a batch in the session. Blocked here, the signal is delivered when the block ends, so
    a batch is either kept and counted or not written at all.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {SIG_SOFT_TIMEOUT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- refresh_market_data ------------------------------------------------------------------


@app.task(name="refresh_market_data", base=DatabaseTask, bind=True)
def refresh_market_data(
    self: DatabaseTask, mode: str = "smart", symbols: list[str] | None = None
) -> Any:
    """Fetch daily bars for the active assets (or `symbols`) and upsert them."""
    args = _validate(RefreshArgs, mode=mode, symbols=symbols)
    settings = get_settings()
    assets = store.assets_for_refresh(self.session, args.symbols)
    known = {a.symbol for a in assets}
    missing = sorted(set(args.symbols or ()) - known)
    names = [a.symbol for a in assets]
    if len(names) <= settings.refresh_chunk_size:
        result = _refresh_chunk(self, args.mode, names, chunk=None)
        return _summarize([result], missing)
    # A large refresh runs as a group of chunk tasks; the summary task takes over this
    # task's id (Task.replace), so the caller's AsyncResult ends with the totals.
    groups = list(store.chunks(names, settings.refresh_chunk_size))
    parts = [
        refresh_market_data_chunk.s(args.mode, list(part), self.request.id, i, len(groups))
        for i, part in enumerate(groups)
    ]
    Progress(self, len(parts)).update(0, f"0/{len(parts)} chunks done", force=True)
    raise self.replace(chord(parts, refresh_market_data_summary.s(missing)))


@app.task(name="refresh_market_data_chunk", base=DatabaseTask, bind=True)
def refresh_market_data_chunk(
    self: DatabaseTask, mode: str, symbols: list[str], parent_id: str, index_: int, total: int
) -> dict[str, Any]:
    result = _refresh_chunk(self, mode, symbols, chunk=(parent_id, index_, total))
    # Progress of the parent: the set of finished chunks (a redelivered chunk counts once).
    key = f"waardhaven:refresh:{parent_id}:done"
    pipe = _redis().pipeline()
    pipe.sadd(key, index_)
    pipe.expire(key, 86400)
    pipe.scard(key)
    done = int(pipe.execute()[2])
    app.backend.store_result(
        parent_id,
        {"current": done, "total": total, "status": f"{done}/{total} chunks done"},
        "PROGRESS",
    )
    return result


@app.task(name="refresh_market_data_summary", bind=True)
def refresh_market_data_summary(
    self: WaardhavenTask, results: list[dict[str, Any]], missing: list[str]
) -> dict[str, Any]:
    return _summarize(results, missing)


def _summarize(results: Sequence[dict[str, Any]], missing: Sequence[str]) -> dict[str, Any]:
    failed: dict[str, str] = {
        s: "not in the assets table (run `waardhaven-tasks seed`)" for s in missing
    }
    for r in results:
        failed.update(r["symbols_failed"])
    return {
        "mode": results[0]["mode"] if results else None,
        "assets_refreshed": sum(r["assets_refreshed"] for r in results),
        "rows_inserted": sum(r["rows_inserted"] for r in results),
        "rows_updated": sum(r["rows_updated"] for r in results),
        "symbols_failed": failed,
    }


def _refresh_chunk(
    task: DatabaseTask, mode: str, symbols: Sequence[str], chunk: tuple[str, int, int] | None
) -> dict[str, Any]:
    settings = get_settings()
    session = task.session
    provider = get_provider(settings, _redis())
    assets = {a.symbol: a.id for a in store.assets_for_refresh(session, list(symbols))}
    params = store.strategy_config(session)
    today = dt.datetime.now(dt.UTC).date()
    floor = dt.date.fromisoformat(settings.history_start)
    newest = store.newest_price_dates(session, list(assets.values()))
    # Smart: from the newest stored day minus an overlap, never before what cleanup keeps.
    starts: dict[dt.date, list[str]] = defaultdict(list)
    for symbol, asset_id in assets.items():
        start = floor
        if mode == "smart":
            start = max(floor, today - dt.timedelta(days=settings.retention_days))
            if asset_id in newest:
                start = max(
                    start, newest[asset_id] - dt.timedelta(days=settings.refresh_overlap_days)
                )
        starts[start].append(symbol)
    batches = [
        (start, list(batch))
        for start, group in sorted(starts.items())
        for batch in store.chunks(group, provider.batch_size)
    ]
    progress = Progress(task, len(assets))
    done = {"assets_refreshed": 0, "rows_inserted": 0, "rows_updated": 0}
    failed: dict[str, str] = {}
    try:
        for start, batch in batches:
            if chunk is None:
                progress.update(
                    done["assets_refreshed"], f"fetching {', '.join(batch)} from {start}"
                )
            try:
                fetched = provider.fetch_daily(batch, start, today)
            except RateLimited as exc:
                session.commit()  # keep the batches already written
                raise task.retry(exc=exc, countdown=exc.retry_after) from exc
            with committed_with_its_count():
                inserted, updated = store.upsert_prices(
                    session, assets, fetched.bars, provider.name, params.min_price
                )
                session.commit()
                failed.update({s: "unknown symbol" for s in fetched.unknown})
                failed.update(fetched.invalid)
                done["assets_refreshed"] += len(batch) - len(
                    set(fetched.unknown) | set(fetched.invalid)
                )
                done["rows_inserted"] += inserted
                done["rows_updated"] += updated
                task.rows_written += inserted + updated
    except SoftTimeLimitExceeded:
        # Every finished batch is committed and counted; nothing else was written.
        raise PartialResult("refresh stopped at the soft time limit", done) from None
    if chunk is None:
        progress.update(len(assets), "done", force=True)
    return {"mode": mode, **done, "symbols_failed": failed}


# --- compute_index ------------------------------------------------------------------------


@app.task(name="compute_index", base=DatabaseTask, bind=True)
def compute_index(self: DatabaseTask, start: str | None = None, end: str | None = None) -> Any:
    """Recompute the index and its allocations from the stored prices and the strategy.

    With start/end only the dates in [start, end] are written, computed from all the history
    before them (lookbacks, holdings, the base of 100): the values equal a full recompute's.
    """
    first, last = _parse_date("start", start), _parse_date("end", end)
    _validate(IndexArgs, start=first, end=last)
    if first and last and first > last:
        raise InvalidTaskArguments("end", f"{last} is before start {first}")
    progress = Progress(self, 3)
    session = self.session
    params = store.strategy_config(session)
    progress.update(0, "loading prices", force=True)
    dates, symbols, closes = store.price_matrix(session, None, last)
    if len(symbols) == 0:
        up_to = f" up to end {last}" if last else ""
        raise NotEnoughData(f"no prices stored{up_to}: run refresh_market_data first")
    progress.update(1, f"computing over {len(symbols)} assets x {len(dates)} days", force=True)
    computed = index.compute_index(dates, symbols, closes, params)
    result = computed.between(first, last)
    if len(result.dates) == 0:
        raise InvalidTaskArguments(
            "start", f"{first} is after the newest index date {computed.dates[-1]}"
        )
    progress.update(2, "writing index values and allocations", force=True)
    self.rows_written = store.write_index(session, result, first, last)
    session.commit()
    held = int((computed.weights[-1] > 0).sum())  # at the newest rebalance
    metrics.index_assets(held)
    progress.update(3, "done", force=True)
    return {
        "start": str(result.dates[0]),
        "end": str(result.dates[-1]),
        "days": len(result.dates),
        "last_value": round(float(result.values[-1]), 6),
        "assets": held,
        "rebalances": len(result.rebalance_dates),
        "never_held": computed.never_held(),
    }


# --- generate_report ----------------------------------------------------------------------


@app.task(name="generate_report", base=DatabaseTask, bind=True)
def generate_report(
    self: DatabaseTask, report_type: str = "performance", period_days: int = 30
) -> Any:
    """Write a performance, allocation or risk report to `reports` (and today's risk row)."""
    args = _validate(ReportArgs, report_type=report_type, period_days=period_days)
    started = time.perf_counter()
    session = self.session
    progress = Progress(self, 3)
    progress.update(0, "loading the index", force=True)
    values = _performance(session, args.period_days)
    today = dt.datetime.now(dt.UTC).date()
    store.write_risk_metrics(session, today, values)
    progress.update(1, f"building the {args.report_type} report", force=True)
    rows: list[dict[str, Any]] | None = None
    if args.report_type == "performance":
        content: dict[str, Any] = values
    elif args.report_type == "allocation":
        as_of, rows = store.latest_allocation(session)
        content = {"as_of": as_of.isoformat() if as_of else None, "assets": len(rows)}
    else:
        content = store.latest_risk_metrics(session) or {}
    title = (
        f"{args.report_type.capitalize()} report, {values['start_date']} to {values['end_date']}"
    )
    body = reports.render_report(args.report_type, title, content, rows)
    report_id = store.save_report(
        session,
        self.request.id,
        {
            "kind": args.report_type,
            "period_start": dt.date.fromisoformat(str(values["start_date"])),
            "period_end": dt.date.fromisoformat(str(values["end_date"])),
            "metrics": {**content, "allocations": rows} if rows is not None else content,
            "body": body,
        },
    )
    session.commit()
    self.rows_written = 2
    metrics.report_seconds(args.report_type, time.perf_counter() - started)
    progress.update(3, "done", force=True)
    return {"report_id": report_id, "kind": args.report_type, "metrics": content}


def _performance(session: Session, period_days: int) -> dict[str, Any]:
    dates, values = store.index_series(session)
    if len(dates) < 2:
        raise InvalidTaskArguments("period_days", "fewer than 2 index values: run compute_index")
    since = dates[-1] - np.timedelta64(period_days, "D")
    keep = dates >= since
    bench_dates, bench_values = store.benchmark_series(session, since.astype(object))
    return reports.performance_metrics(
        dates[keep],
        values[keep],
        bench_dates if len(bench_dates) else None,
        bench_values if len(bench_values) else None,
    )


# --- cleanup_old_data ---------------------------------------------------------------------


@app.task(name="cleanup_old_data", base=DatabaseTask, bind=True)
def cleanup_old_data(self: DatabaseTask, days_to_keep: int = 365) -> Any:
    """Delete rows dated before today - days_to_keep, in batches; counts per table."""
    args = _validate(CleanupArgs, days_to_keep=days_to_keep)
    cutoff = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=args.days_to_keep)
    session = self.session
    progress = Progress(self, len(store.RETENTION))
    deleted: dict[str, int] = {}
    try:
        for i, (model, column) in enumerate(store.RETENTION):
            table = model.__tablename__
            progress.update(i, f"deleting {table} before {cutoff}", force=True)
            bound: Any = cutoff
            if column.type.python_type is dt.datetime:
                bound = dt.datetime.combine(cutoff, dt.time(), tzinfo=dt.UTC)
            deleted[table] = 0
            while True:  # until a batch deletes nothing
                with committed_with_its_count():
                    n = store.delete_batch(session, model, column, bound)
                    session.commit()
                    deleted[table] += n
                    self.rows_written += n
                if n == 0:
                    break
    except SoftTimeLimitExceeded:
        # Every finished batch is committed and counted; nothing else was deleted.
        raise PartialResult("cleanup stopped at the soft time limit", deleted) from None
    progress.update(len(store.RETENTION), "done", force=True)
    return {"cutoff": cutoff.isoformat(), "deleted": deleted}


@app.task(name="ping")
def ping() -> str:
    """A no-op for health checks, `helm test` and benchmarks."""
    return "pong"
