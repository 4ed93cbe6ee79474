"""The Celery tasks. Thin: validate the JSON arguments, call the domain, report progress.

Every task raises on failure (FAILURE state, retried when the error is transient); none returns
a "failed" dict as SUCCESS. Every task is idempotent: its writes are upserts on natural keys.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from billiard.pool import SIG_SOFT_TIMEOUT
from celery import chord
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session

from tasks import index, metrics, reports, store
from tasks.base import DatabaseTask, WaardhavenTask, _redis
from tasks.celery_app import app
from tasks.errors import InvalidTaskArguments, NotEnoughData, PartialResult, QuotaExhausted
from tasks.market_data import DailyQuotaExhausted, RateLimited, get_provider, plan
from tasks.market_data.run import RUN_TTL, LocalRefreshRun, RefreshRun
from tasks.progress import Progress
from tasks.settings import get_settings

logger = get_task_logger(__name__)


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
    period_days: int = Field(30, ge=2, le=25200)  # trading days (252 a year)


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

    billiard signals the soft limit with SIG_SOFT_TIMEOUT (SIGUSR1) and its handler raises
    SoftTimeLimitExceeded wherever the task is. Raised between a commit and its count, the task
    would report fewer rows than it kept; raised between a write and its commit, it would leave
    half a batch in the session. Inside the block the handler only notes the signal, and the
    limit is raised when the block ends. (Blocking the signal would not do: a signal mask is per
    thread, and with any other thread alive the kernel may deliver the signal there; Python
    then runs the handler in the main thread all the same.) Python handlers run in the main
    thread only, so elsewhere (a thread pool, eager mode) there is no soft limit to hold off.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(SIG_SOFT_TIMEOUT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(SIG_SOFT_TIMEOUT, previous)
        if pending and callable(previous):
            previous(SIG_SOFT_TIMEOUT, pending[0])  # billiard's handler raises the limit here


# --- refresh_market_data ------------------------------------------------------------------

# Rate-limited answers in a row for one batch before the wait counts as a failed try: credits
# shared with another client of the same API key can stay short; retrying is then bounded.
MAX_CREDIT_WAITS = 10


def _run_of(task: WaardhavenTask) -> RefreshRun:
    # The refresh's own id: a retry, a continuation (Task.replace) and the summary keep it.
    if task.request.is_eager:
        return LocalRefreshRun(task.request.id or "local")
    return RefreshRun(_redis(), task.request.id or "local")


def _provider_for(task: WaardhavenTask) -> Any:
    """Credits shared by all workers through Redis; in eager mode counted in this process."""
    return get_provider(get_settings(), None if task.request.is_eager else _redis())


@app.task(name="refresh_market_data", base=DatabaseTask, bind=True)
def refresh_market_data(
    self: DatabaseTask, mode: str = "smart", symbols: list[str] | None = None
) -> Any:
    """Fetch daily bars for the active assets (or `symbols`) and upsert them.

    With a provider quota (TwelveData) one task works through the plan, waiting for credits,
    and after REFRESH_TASK_SECONDS continues as a new message with the same id (Task.replace):
    well inside the soft time limit, and a worker slot is never held for the hour a large
    refresh takes. Without a quota a large refresh runs as a group of chunk tasks.
    """
    args = _validate(RefreshArgs, mode=mode, symbols=symbols)
    settings = get_settings()
    names = [a.symbol for a in store.assets_for_refresh(self.session, args.symbols)]
    missing = sorted(set(args.symbols or ()) - set(names))
    run = _run_of(self)
    provider = _provider_for(self)
    chunked = len(names) > settings.refresh_chunk_size and not self.request.is_eager
    # Whoever asked for the refresh asked for its chunks and continuations (task_runs).
    by = {"requested_by": self.request.get("requested_by")}
    if provider.credits_per_minute is None and chunked:
        # The summary task takes over this task's id (Task.replace): the caller's AsyncResult
        # ends with the totals, and the summary writes this run's final row in task_runs.
        groups = plan.chunks(names, settings.refresh_chunk_size)
        parts = [
            refresh_market_data_chunk.s(args.mode, part, self.request.id, i, len(groups)).set(
                headers=by
            )
            for i, part in enumerate(groups)
        ]
        Progress(self, len(parts)).update(0, f"0/{len(parts)} chunks done", force=True)
        summary = refresh_market_data_summary.s(missing, args.mode).set(headers=by)
        raise self.replace(chord(parts, summary))
    budget = min(settings.refresh_task_seconds, settings.task_soft_time_limit)
    resume_in = _refresh(self, run, args.mode, names, budget=budget)
    if resume_in is not None:
        logger.info("refresh continues in a new message in %.0f s", resume_in)
        again = refresh_market_data.si(mode=args.mode, symbols=args.symbols)
        raise self.replace(again.set(countdown=resume_in, headers=by))
    return _summarize(self, run, args.mode, missing)


class RefreshChunkTask(DatabaseTask):
    """A chunk's failure ends its chord: the run's row in task_runs says so (no summary runs)."""

    abstract = True

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        parent_id, index_, total = args[2], args[3], args[4]
        self._audit(
            parent_id,
            name="refresh_market_data",
            state="FAILURE",
            finished_at=dt.datetime.now(dt.UTC),
            error=f"chunk {index_ + 1}/{total} failed: {type(exc).__name__}: {exc}"[:2000],
        )


@app.task(name="refresh_market_data_chunk", base=RefreshChunkTask, bind=True)
def refresh_market_data_chunk(
    self: DatabaseTask, mode: str, symbols: list[str], parent_id: str, index_: int, total: int
) -> dict[str, Any]:
    _refresh(self, RefreshRun(_redis(), parent_id), mode, symbols, budget=None, chunk=True)
    # Progress of the parent: the set of finished chunks (a redelivered chunk counts once).
    key = f"waardhaven:refresh:{parent_id}:chunks"
    pipe = _redis().pipeline()
    pipe.sadd(key, index_)
    pipe.expire(key, RUN_TTL)
    pipe.scard(key)
    done = int(pipe.execute()[2])
    app.backend.store_result(
        parent_id,
        {"current": done, "total": total, "status": f"{done}/{total} chunks done"},
        "PROGRESS",
    )
    return {"chunk": index_, "symbols": len(symbols)}


class RefreshSummaryTask(DatabaseTask):
    abstract = True
    audit_name = "refresh_market_data"  # it ends the run of that id


@app.task(name="refresh_market_data_summary", base=RefreshSummaryTask, bind=True)
def refresh_market_data_summary(
    self: DatabaseTask, results: list[dict[str, Any]], missing: list[str], mode: str
) -> dict[str, Any]:
    return _summarize(self, _run_of(self), mode, missing)


def _summarize(
    task: DatabaseTask, run: RefreshRun, mode: str, missing: Sequence[str]
) -> dict[str, Any]:
    """The run's totals (all its retries, continuations and chunks)."""
    totals = run.totals()
    failed = {s: "not in the assets table (run `waardhaven-tasks seed`)" for s in missing}
    failed.update(totals.pop("symbols_failed"))
    task.rows_written = totals["rows_inserted"] + totals["rows_updated"]
    return {"mode": mode, **totals, "symbols_failed": failed}


def _refresh(
    task: DatabaseTask,
    run: RefreshRun,
    mode: str,
    symbols: Sequence[str],
    budget: float | None,
    chunk: bool = False,
) -> float | None:
    """Work through the plan of `symbols` minus what `run` did. Returns None when finished,
    else the seconds after which a continuation should go on (the budget ran out)."""
    settings = get_settings()
    session = task.session
    provider = _provider_for(task)
    assets = {a.symbol: a.id for a in store.assets_for_refresh(session, list(symbols))}
    newest_by_id = store.newest_price_dates(session, list(assets.values()))
    todo = plan.plan_refresh(
        "full" if mode == "full" else "smart",
        {s: newest_by_id.get(i) for s, i in assets.items()},
        dt.datetime.now(dt.UTC).date(),
        history_start=dt.date.fromisoformat(settings.history_start),
        retention_days=settings.retention_days,
        overlap_days=settings.refresh_overlap_days,
        batch_size=provider.batch_size,
        done=run.done(),
    )
    deadline = None if budget is None else time.monotonic() + budget
    progress = Progress(task, len(assets))
    finished = len(assets) - len(todo.symbols)
    try:
        for n, batch in enumerate(todo.batches):
            waits = 0
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    return 0.0
                if not chunk:
                    names = ", ".join(batch.symbols)
                    progress.update(finished, f"fetching {names} from {batch.start}")
                try:
                    fetched = provider.fetch_daily(batch.symbols, batch.start, todo.end)
                    break
                except DailyQuotaExhausted as exc:
                    left = [s for b in todo.batches[n:] for s in b.symbols]
                    raise QuotaExhausted(
                        f"{exc}; stopped with {len(left)} symbols left, the next run goes on "
                        "from them",
                        {**run.totals(), "symbols_left": left},
                    ) from None
                except RateLimited as exc:
                    # The quota is the normal case: wait here (not a retry, so it never uses up
                    # max_retries), or hand over when the wait would overrun the budget.
                    waits += 1
                    if waits > MAX_CREDIT_WAITS:
                        raise
                    if deadline is not None and time.monotonic() + exc.retry_after >= deadline:
                        return exc.retry_after
                    if not chunk:
                        progress.update(
                            finished,
                            f"waiting {exc.retry_after:.0f}s for provider credits "
                            f"({provider.credits_per_minute}/min); {finished}/{len(assets)} done",
                            force=True,
                        )
                    time.sleep(exc.retry_after)
            with committed_with_its_count():
                inserted, updated = store.upsert_prices(
                    session, assets, fetched.bars, provider.name
                )
                session.commit()
                failed = {s: "unknown symbol" for s in fetched.unknown} | fetched.invalid
                refreshed = len(batch.symbols) - len(set(failed))
                run.record(batch.symbols, failed, refreshed, inserted, updated)
                task.rows_written += inserted + updated
                finished += len(batch.symbols)
    except SoftTimeLimitExceeded:
        # Every finished batch is committed and counted; nothing else was written.
        raise PartialResult("refresh stopped at the soft time limit", run.totals()) from None
    if not chunk:
        progress.update(len(assets), "done", force=True)
    return None


# --- compute_index ------------------------------------------------------------------------


@app.task(name="compute_index", base=DatabaseTask, bind=True)
def compute_index(self: DatabaseTask, start: str | None = None, end: str | None = None) -> Any:
    """Recompute the index and its allocations from the stored prices and the strategy.

    With start/end only the dates in [start, end] are written, computed from all the history
    before them (lookbacks, holdings, the base of 100): the values equal a full recompute's.

    Published values are final. When cleanup_old_data has removed the prices the oldest stored
    values came from (the stored index has a value older than the first the kept prices
    give), the computation continues the stored series from an anchor: the oldest stored
    rebalance date with index.warmup_rows price dates before it, at its stored value. Only
    [anchor, end] is written; older values stay as stored. The result's "continued_from" is
    the anchor, or None for a computation from the start (base 100).
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
    computed, continued_from = None, None
    # Cut: the stored index has a value older than the first the kept prices give. Whatever
    # the strategy that is row MIN_LISTED_DAYS at the earliest, so the usual case after a
    # cleanup needs no computation from the start to tell.
    oldest = store.oldest_index_date(session)
    cut = oldest is not None and (last is None or oldest <= last)
    earliest = index.MIN_LISTED_DAYS
    if cut and len(dates) > earliest and oldest >= dates[earliest].astype(dt.date):
        try:
            computed = index.compute_index(dates, symbols, closes, params)
            cut = oldest < computed.dates[0].astype(dt.date)
        except NotEnoughData:
            pass
    if cut:
        continued_from, value = _anchor(session, params, dates, first, last)
        anchor = index.Anchor(continued_from, value)
        computed = index.compute_index(dates, symbols, closes, params, anchor=anchor)
    elif computed is None:
        computed = index.compute_index(dates, symbols, closes, params)
    result = computed.between(first, last)
    if len(result.dates) == 0:
        raise InvalidTaskArguments(
            "start", f"{first} is after the newest index date {computed.dates[-1]}"
        )
    progress.update(2, "writing index values and allocations", force=True)
    self.rows_written = store.write_index(session, result, first or continued_from, last)
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
        "continued_from": continued_from.isoformat() if continued_from else None,
    }


def _anchor(
    session: Session,
    params: index.StrategyParams,
    dates: np.ndarray,
    start: dt.date | None,
    end: dt.date | None,
) -> tuple[dt.date, float]:
    """Where a computation continues a stored series whose older prices were removed: the
    anchor's date and stored value. `dates`: the close matrix's, up to `end`."""
    warmup = index.warmup_rows(params)
    if len(dates) > warmup:
        after: dt.date | None = dates[warmup].astype(dt.date)
    else:  # cut short by `end`, or too few prices
        after = store.price_date(session, None, warmup)
    day = store.stored_rebalance_date(session, after) if after else None
    value = store.index_value(session, day) if day else None
    if day is None or value is None:
        raise NotEnoughData(
            "the stored index cannot continue: no stored rebalance date has "
            f"{warmup} price dates (warmup_rows) before it, older prices were removed by "
            "cleanup_old_data (RETENTION_DAYS / days_to_keep too short for the strategy's "
            "rebalance_frequency?); refresh_market_data mode=full brings the history back "
            "and the index is then recomputed from its start"
        )
    for field, bound in (("start", start), ("end", end)):
        if bound and bound < day:
            raise InvalidTaskArguments(
                field,
                f"{bound} is before {day}: prices before {store.price_date(session, None, 0)} "
                f"were removed by cleanup_old_data; the index can be recomputed from {day} on",
            )
    return day, value


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
    """Metrics of the last `period_days` trading days: that many daily returns, so one index
    value more (a 2-day report on a Monday spans Thursday's close to Monday's)."""
    dates, values = store.index_series(session)
    need = period_days + 1
    if len(dates) < need:
        raise InvalidTaskArguments(
            "period_days",
            f"{period_days} trading days need {need} index values but {len(dates)} are stored: "
            "run compute_index first, or ask for a shorter period",
        )
    dates, values = dates[-need:], values[-need:]
    bench_dates, bench_values = store.benchmark_series(session, dates[0].astype(object))
    return reports.performance_metrics(
        dates,
        values,
        bench_dates if len(bench_dates) else None,
        bench_values if len(bench_values) else None,
    )


# --- cleanup_old_data ---------------------------------------------------------------------


@app.task(name="cleanup_old_data", base=DatabaseTask, bind=True)
def cleanup_old_data(self: DatabaseTask, days_to_keep: int = 365) -> Any:
    """Delete rows dated before today - days_to_keep, in batches; counts per table.

    Prices, index values and allocations that the next compute_index needs to continue the
    stored index unchanged are kept even when older (store.kept_for_index): the result's
    "kept_for_index" says from when and why, or is None.
    """
    args = _validate(CleanupArgs, days_to_keep=days_to_keep)
    cutoff = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=args.days_to_keep)
    session = self.session
    warmup = index.warmup_rows(store.strategy_config(session))
    kept = store.kept_for_index(session, cutoff, warmup)
    session.commit()
    cutoffs: dict[str, dt.date] = {}
    if kept:
        index_from = dt.date.fromisoformat(kept["index_from"])
        cutoffs = {
            "prices": dt.date.fromisoformat(kept["prices_from"]),
            "index_values": index_from,
            "allocations": index_from,
        }
    progress = Progress(self, len(store.RETENTION))
    deleted: dict[str, int] = {}
    try:
        for i, (model, column) in enumerate(store.RETENTION):
            table = model.__tablename__
            before = cutoffs.get(table, cutoff)
            progress.update(i, f"deleting {table} before {before}", force=True)
            bound: Any = before
            if column.type.python_type is dt.datetime:
                bound = dt.datetime.combine(before, dt.time(), tzinfo=dt.UTC)
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
    return {"cutoff": cutoff.isoformat(), "deleted": deleted, "kept_for_index": kept}


@app.task(name="ping")
def ping() -> str:
    """A no-op for health checks, `helm test` and benchmarks."""
    return "pong"
