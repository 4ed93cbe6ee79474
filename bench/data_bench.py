"""Sections 2-4: market-data refresh, index computation, reports and cleanup (issue 6).

Every task runs in a real worker process (`services/worker-high/run` or `worker-low/run`, the
command a pod runs) against the bench's own PostgreSQL database; each figure has a baseline
measured in the same run:

- refresh: rows/s of `refresh_market_data(mode="full")` (first load, then the same rows again
  as an upsert) against `COPY ... FROM STDIN` of the same rows into a table like `prices` (the
  database's limit); then, in this process, the pieces: provider generation, row building and
  COPY encoding, the database's share of `store.upsert_prices`.
- index: `compute_index` in the worker, then in this process its pieces (price_matrix,
  index.compute_index, write_index), the arithmetic against a pure NumPy lower bound on 3 sizes
  (linearity in assets x days) and the memory peak (tracemalloc) against the input matrix.
- reports: each kind of `generate_report`, a backlog drained by one pod, and
  `cleanup_old_data` against one `DELETE` per table of the same rows.

The data set: the seed universe plus synthetic assets up to 500 (SYN0001...: seeded in the
bench database only), daily bars from HISTORY_START (10 years at --scale 1).
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import os
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, text

from bench.common import Worker, log, median

ASSETS = 500
REPORT_REPEATS = 5
SNAPSHOT_TABLES = ("prices", "allocations")


# --- helpers ---------------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine (every core, /proc/stat) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_task(
    app: Any, name: str, kwargs: dict[str, Any], worker: Worker, timeout: float = 900
) -> dict[str, Any]:
    """Send one task, wait for its result; wall time, worker-tree and machine CPU seconds."""
    cpu0, busy0 = worker.cpu_seconds(), machine_busy_seconds()
    start = time.perf_counter()
    result = app.send_task(name, kwargs=kwargs).get(timeout=timeout)
    wall = time.perf_counter() - start
    return {
        "seconds": wall,
        "worker_cpu_s": worker.cpu_seconds() - cpu0,
        "machine_cpu_s": machine_busy_seconds() - busy0,
        "result": result,
    }


def task_records(worker: Worker, name: str) -> list[dict[str, Any]]:
    time.sleep(0.5)  # a child writes its record after the result is stored
    return [r for r in worker.probe() if r.get("kind") == "task" and r.get("name") == name]


def summarize_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-task wall and CPU seconds inside the worker child (the probe's task_prerun/postrun)."""
    if not records:
        return {"tasks": 0}
    return {
        "tasks": len(records),
        "wall_s_median": median(r["wall"] for r in records),
        "cpu_s_median": median(r["cpu"] for r in records),
        "wall_s_total": sum(r["wall"] for r in records),
        "cpu_s_total": sum(r["cpu"] for r in records),
        "cpu_fraction": sum(r["cpu"] for r in records) / max(sum(r["wall"] for r in records), 1e-9),
        "rss_mib_max": max(r["rss_mib"] for r in records),
    }


def raw_connection() -> Any:
    """A psycopg2 connection to the bench database (COPY, DDL)."""
    from tasks.db import get_engine

    return get_engine().raw_connection()


def seed(n_assets: int) -> dict[str, Any]:
    """The seed universe plus synthetic assets up to n_assets (bench database only)."""
    from tasks import store
    from tasks.db import session_scope, upsert
    from tasks.market_data.synthetic import asset_params
    from tasks.models import Asset

    with session_scope() as session:
        store.seed_assets(session)
        have = session.scalar(select(func.count()).select_from(Asset)) or 0
        extra = [
            {
                "symbol": f"SYN{i:04d}",
                "name": f"Synthetic asset {i}",
                "asset_class": asset_params(f"SYN{i:04d}").asset_class,
                "is_active": True,
                "is_benchmark": False,
            }
            for i in range(1, max(0, n_assets - have) + 1)
        ]
        upsert(session, Asset.__table__, extra, ["symbol"], ["name", "asset_class"])
        total = session.scalar(select(func.count()).select_from(Asset)) or 0
    return {"assets": total, "synthetic_assets": len(extra)}


def count_rows(table: str) -> int:
    from tasks.db import get_engine

    with get_engine().connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# --- 2. refresh ------------------------------------------------------------------------------

PRICE_COLUMNS = "asset_id, date, close, open, high, low, volume, source, updated_at"


def copy_baseline() -> dict[str, Any]:
    """COPY the rows `prices` now holds (as text, made beforehand) into an empty table with the
    same columns, keys and indexes: how fast this database takes these rows at all. The copy
    (`bench_prices`) stays for the cleanup baseline; `bench_allocations` likewise."""
    conn = raw_connection()
    try:
        cur = conn.cursor()
        buffer = io.StringIO()
        cur.copy_expert(f"COPY (SELECT {PRICE_COLUMNS} FROM prices) TO STDOUT", buffer)
        size = buffer.tell()
        buffer.seek(0)
        cur.execute("DROP TABLE IF EXISTS bench_prices")
        cur.execute("CREATE TABLE bench_prices (LIKE prices INCLUDING ALL)")
        conn.commit()
        start = time.perf_counter()
        cur.copy_expert(f"COPY bench_prices ({PRICE_COLUMNS}) FROM STDIN", buffer, 1 << 20)
        conn.commit()
        seconds = time.perf_counter() - start
        cur.execute("SELECT count(*) FROM bench_prices")
        rows = int(cur.fetchone()[0])
        cur.close()
    finally:
        conn.close()
    return {"rows": rows, "seconds": seconds, "per_second": rows / seconds, "bytes": size}


def refresh_pieces(symbols: list[str], start: dt.date, chunk: int) -> dict[str, Any]:
    """The re-run done in this process, one chunk after the other, timed piece by piece:
    provider generation, row building + COPY encoding (what upsert_prices does before the
    database), and the whole upsert_prices (so the database's share is the difference)."""
    from tasks import store
    from tasks.db import _copy_text, session_scope
    from tasks.market_data import SyntheticProvider
    from tasks.models import Asset

    provider = SyntheticProvider(batch_size=100)
    today = dt.datetime.now(dt.UTC).date()
    with session_scope() as session:
        ids = {sym: i for sym, i in session.execute(select(Asset.symbol, Asset.id))}
    fetch = encode = upsert = 0.0
    rows = 0
    columns = ["asset_id", "date", "close", "open", "high", "low", "volume", "source"]
    columns.append("updated_at")
    for i in range(0, len(symbols), chunk):
        part = symbols[i : i + chunk]
        t = time.perf_counter()
        bars = provider.fetch_daily(part, start, today).bars
        fetch += time.perf_counter() - t
        t = time.perf_counter()
        now = dt.datetime.now(dt.UTC)
        built = [
            {
                "asset_id": ids[b.symbol],
                "date": b.date,
                "close": b.close,
                "open": b.open,
                "high": b.high,
                "low": b.low,
                "volume": b.volume,
                "source": "synthetic",
                "updated_at": now,
            }
            for b in bars
            if b.close >= 1.0
        ]
        _copy_text(built, columns, set())
        encode += time.perf_counter() - t
        del built
        t = time.perf_counter()
        with session_scope() as session:
            store.upsert_prices(session, ids, bars, "synthetic")
        upsert += time.perf_counter() - t
        rows += len(bars)
        del bars
    return {
        "rows": rows,
        "fetch_s": fetch,
        "encode_s": encode,
        "upsert_s": upsert,
        "database_s": max(upsert - encode, 0.0),
        "total_s": fetch + upsert,
        "fetch_per_second": rows / fetch,
    }


def bench_refresh(app: Any, workdir: Path, n_assets: int) -> dict[str, Any]:
    from tasks.settings import get_settings

    settings = get_settings()
    out: dict[str, Any] = {"seed": seed(n_assets)}
    start = dt.date.fromisoformat(settings.history_start)
    out["history_start"] = start.isoformat()
    out["chunk_size"] = settings.refresh_chunk_size
    log(f"refresh: {out['seed']['assets']} assets from {start}; starting worker-high")
    worker = Worker("worker-high", workdir, "refresh", WORKER_CONCURRENCY="2", BENCH_TASK_TIMES="1")
    try:
        worker.wait_ready()
        out["worker_start_s"] = worker.start_seconds
        for key in ("first_load", "rerun"):
            figures = run_task(app, "refresh_market_data", {"mode": "full"}, worker)
            result = figures.pop("result")
            rows = result["rows_inserted"] + result["rows_updated"]
            figures.update(
                rows=rows,
                rows_inserted=result["rows_inserted"],
                rows_updated=result["rows_updated"],
                assets=result["assets_refreshed"],
                per_second=rows / figures["seconds"],
                chunks=summarize_records(task_records(worker, "refresh_market_data_chunk")),
            )
            worker.probe_file.unlink(missing_ok=True)
            out[key] = figures
            log(
                f"refresh: {key}: {rows:,} rows in {figures['seconds']:.1f} s "
                f"({figures['per_second']:,.0f} rows/s)"
            )
    finally:
        worker.stop()
    out["rows_stored"] = count_rows("prices")
    out["copy"] = copy_baseline()
    log(f"refresh: COPY baseline {out['copy']['per_second']:,.0f} rows/s")
    symbols = sorted(_symbols())
    out["pieces"] = refresh_pieces(symbols, start, settings.refresh_chunk_size)
    p = out["pieces"]
    log(
        f"refresh: pieces in-process: fetch {p['fetch_s']:.1f} s, encode {p['encode_s']:.1f} s, "
        f"upsert_prices {p['upsert_s']:.1f} s"
    )
    return out


def _symbols() -> list[str]:
    from tasks.db import session_scope
    from tasks.models import Asset

    with session_scope() as session:
        return list(session.scalars(select(Asset.symbol).where(Asset.is_active.is_(True))))


# --- 3. index --------------------------------------------------------------------------------


def lower_bound(
    closes: np.ndarray, dates: np.ndarray, rebalance_days: int, min_price: float
) -> np.ndarray:
    """The index's arithmetic with nothing else, on a gap-free close matrix whose assets all
    start on the first date (the bench's data set): returns clipped, trailing 60-day mean/std
    by running sums (outlier test), the point-in-time eligibility (a close >= min_price on the
    date, 20 days of prices; the missing-day rule is void without gaps), 60-day volatility and
    20-day momentum at the rebalance rows, the weight mix over the eligible assets, holdings
    bought at the rebalance close and drifting. No validation, no forward fill, no
    missing-data handling: the least work the same figures need, so a floor for
    `index.compute_index`."""
    window, mom, listed = 60, 20, 20
    n, m = closes.shape
    r = np.empty_like(closes)
    r[0] = 0.0
    np.divide(closes[1:], closes[:-1], out=r[1:])
    r[1:] -= 1.0
    np.clip(r, -0.5, 0.5, out=r)
    c1 = np.zeros((n + 1, m))
    c2 = np.zeros((n + 1, m))
    np.cumsum(r, axis=0, out=c1[1:])
    np.cumsum(r * r, axis=0, out=c2[1:])
    lo = np.maximum(np.arange(n) - window, 0)
    hi = np.arange(n)
    cnt = (hi - lo)[:, None].astype(float)
    s1 = c1[hi] - c1[lo]
    s2 = c2[hi] - c2[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 - s1 * mean, 0.0) / (cnt - 1))
        outlier = (cnt >= 20) & (np.abs(r - mean) > 3.0 * std)
    r = np.where(outlier, mean, r)  # (the product uses the window's median)
    # Eligible: a close >= min_price that day, from the 20th day of prices on.
    allowed = (closes >= min_price).any(axis=1)
    allowed[:listed] = False
    # rebalance rows: the first allowed date, then the first allowed one `rebalance_days`
    # calendar days or more after the previous
    step = np.timedelta64(rebalance_days, "D")
    candidates = np.flatnonzero(allowed)
    rows = [int(candidates[0])]
    while True:
        due = np.searchsorted(candidates, np.searchsorted(dates, dates[rows[-1]] + step))
        if due >= len(candidates):
            break
        rows.append(int(candidates[due]))
    rb = np.array(rows)
    eligible = closes[rb] >= min_price
    logs = np.zeros((n + 1, m))
    np.cumsum(np.log1p(r), axis=0, out=logs[1:])
    momentum = np.expm1(logs[rb] - logs[np.maximum(rb - mom, 0)])
    vol = np.sqrt(
        np.maximum(
            (c2[rb] - c2[np.maximum(rb - window, 0)])
            - (c1[rb] - c1[np.maximum(rb - window, 0)]) ** 2 / window,
            0.0,
        )
        / (window - 1)
    )
    score = np.where(eligible & (momentum > -0.01), np.maximum(momentum, 0.0), 0.0)
    w_mom = score / np.maximum(score.sum(axis=1, keepdims=True), 1e-300)
    inv = np.where(eligible & (vol > 0), 1.0 / np.where(vol > 0, vol, 1.0), 0.0)
    w_risk = inv / np.maximum(inv.sum(axis=1, keepdims=True), 1e-300)
    w_cap = eligible / eligible.sum(axis=1, keepdims=True)
    weights = 0.4 * w_mom + 0.3 * w_cap + 0.3 * w_risk
    weights /= weights.sum(axis=1, keepdims=True)
    growth = 1.0 + r
    values = np.empty(n - rb[0])
    values[0] = 100.0
    bounds = [*rb.tolist(), n - 1]
    for k in range(len(rb)):
        a, b = bounds[k], bounds[k + 1]  # bought at the close of a, held to the close of b
        if b > a:
            level = values[a - rb[0]]
            values[a + 1 - rb[0] : b + 1 - rb[0]] = level * (
                np.cumprod(growth[a + 1 : b + 1], axis=0) @ weights[k]
            )
    return values


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Fastest of `repeat` runs (the least disturbed by the shared CPU)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def paired_best(
    first: Callable[[], Any], second: Callable[[], Any], repeat: int
) -> tuple[float, float]:
    """Fastest of `repeat` runs of each, alternating, so both see the same load."""
    a, b = [], []
    for _ in range(repeat):
        a.append(best_of(first, 1))
        b.append(best_of(second, 1))
    return min(a), min(b)


def bench_index(app: Any, workdir: Path, scale: float) -> dict[str, Any]:
    from tasks import index, store
    from tasks.db import session_scope
    from tasks.index import REBALANCE_DAYS

    out: dict[str, Any] = {}
    log("index: compute_index in worker-high")
    worker = Worker("worker-high", workdir, "index", WORKER_CONCURRENCY="2", BENCH_TASK_TIMES="1")
    try:
        worker.wait_ready()
        runs = []
        for _ in range(2):  # the first pays the child's imports and connection
            figures = run_task(app, "compute_index", {}, worker)
            runs.append(figures)
        out["task"] = {k: v for k, v in runs[-1].items() if k != "result"}
        out["task"]["result"] = runs[-1]["result"]
        out["task"]["first_run_s"] = runs[0]["seconds"]
        out["task"]["probe"] = summarize_records(task_records(worker, "compute_index"))
    finally:
        worker.stop()
    log(f"index: task {out['task']['seconds']:.2f} s; now its pieces in this process")
    with session_scope() as session:
        params = store.strategy_config(session)
        t = time.perf_counter()
        dates, symbols, closes = store.price_matrix(session, None, None)
        out["load_s"] = time.perf_counter() - t
    days, assets = closes.shape
    out["assets"], out["days"] = assets, days
    repeat = 7 if scale >= 1 else 2
    result = index.compute_index(dates, symbols, closes, params)
    step = REBALANCE_DAYS[params.rebalance_frequency]
    bound = partial(lower_bound, closes, dates, step, params.min_price)
    out["compute_s"], out["lower_bound_s"] = paired_best(
        partial(index.compute_index, dates, symbols, closes, params), bound, repeat
    )
    out["gap_free"] = bool(np.isfinite(closes).all())  # the floor's assumption
    out["lower_bound_deviation"] = float(np.max(np.abs(bound() / result.values - 1)))
    # Memory: the peak of NumPy's allocations (tracemalloc sees them) during the computation.
    gc.collect()
    tracemalloc.start()
    index.compute_index(dates, symbols, closes, params)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["input_mib"] = closes.nbytes / 2**20
    out["peak_mib"] = peak / 2**20
    tracemalloc.start()
    bound()
    _, peak_lb = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["lower_bound_peak_mib"] = peak_lb / 2**20
    with session_scope() as session:
        t = time.perf_counter()
        written = store.write_index(session, result, None, None)
        session.commit()
        out["write_s"] = time.perf_counter() - t
        out["rows_written"] = written
    # Linearity: 3 sizes, 1 : 2 : 4 cells.
    sizes = []
    for a, d in ((assets // 2, days // 2), (assets, days // 2), (assets, days)):
        sub_c, sub_d, sub_s = closes[-d:, :a], dates[-d:], symbols[:a]
        seconds, floor = paired_best(
            partial(index.compute_index, sub_d, sub_s, sub_c, params),
            partial(lower_bound, sub_c, sub_d, step, params.min_price),
            repeat,
        )
        sizes.append(
            {
                "assets": a,
                "days": d,
                "cells": a * d,
                "seconds": seconds,
                "lower_bound_s": floor,
                "ns_per_cell": seconds / (a * d) * 1e9,
            }
        )
    out["sizes"] = sizes
    per_cell = [s["ns_per_cell"] for s in sizes]
    out["linearity_spread"] = max(per_cell) / min(per_cell)
    log(
        f"index: compute {out['compute_s']:.3f} s vs lower bound {out['lower_bound_s']:.3f} s; "
        f"peak {out['peak_mib']:.0f} MiB for a {out['input_mib']:.0f} MiB matrix"
    )
    return out


# --- 4. reports and cleanup ------------------------------------------------------------------


def snapshot_for_cleanup() -> None:
    """bench_allocations: a copy of allocations with the same indexes (bench_prices exists)."""
    conn = raw_connection()
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS bench_allocations")
        cur.execute("CREATE TABLE bench_allocations (LIKE allocations INCLUDING ALL)")
        cur.execute("INSERT INTO bench_allocations SELECT * FROM allocations")
        conn.commit()
        cur.close()
    finally:
        conn.close()


def delete_baseline(cutoff: dt.date) -> dict[str, Any]:
    """One DELETE per table (bench_prices, bench_allocations: the same rows): the least the
    database can do; no batches, one long transaction."""
    conn = raw_connection()
    out: dict[str, Any] = {"rows": 0, "seconds": 0.0}
    try:
        cur = conn.cursor()
        for table in ("bench_prices", "bench_allocations"):
            start = time.perf_counter()
            cur.execute(f"DELETE FROM {table} WHERE date < %s", (cutoff,))
            conn.commit()
            out["seconds"] += time.perf_counter() - start
            out["rows"] += cur.rowcount
            out[table] = cur.rowcount
        cur.execute("DROP TABLE bench_prices, bench_allocations")
        conn.commit()
        cur.close()
    finally:
        conn.close()
    return out


def _index_days() -> int:
    from sqlalchemy import func, select

    from tasks.db import session_scope
    from tasks.models import IndexValue

    with session_scope() as session:
        return max(2, int(session.scalar(select(func.count()).select_from(IndexValue)) or 0) - 1)


def bench_reports(app: Any, workdir: Path, scale: float, history_days: int) -> dict[str, Any]:
    out: dict[str, Any] = {"kinds": {}}
    worker = Worker("worker-low", workdir, "reports", WORKER_CONCURRENCY="2", BENCH_TASK_TIMES="1")
    backlog = max(20, int(300 * scale))
    try:
        worker.wait_ready()
        out["worker_start_s"] = worker.start_seconds
        run_task(app, "generate_report", {}, worker)  # warm-up: imports, connections
        worker.probe_file.unlink(missing_ok=True)
        cases: dict[str, dict[str, Any]] = {
            "performance_30d": {"report_type": "performance", "period_days": 30},
            # period_days counts trading days: the whole index is its stored values minus one
            "performance_all": {"report_type": "performance", "period_days": _index_days()},
            "allocation": {"report_type": "allocation"},
            "risk": {"report_type": "risk"},
        }
        for key, kwargs in cases.items():
            runs = [run_task(app, "generate_report", kwargs, worker) for _ in range(REPORT_REPEATS)]
            records = task_records(worker, "generate_report")
            worker.probe_file.unlink(missing_ok=True)
            last = runs[-1]["result"]
            out["kinds"][key] = {
                "kwargs": kwargs,
                "seconds": median(r["seconds"] for r in runs),
                "probe": summarize_records(records),
                "rows_read": int(last["metrics"].get("days", 0) or 0) + 1
                if key.startswith("performance")
                else int(last["metrics"].get("assets", 0) or 0),
                "rows_written": 2,
            }
        # A backlog drained by one pod (-c 2): the per-pod throughput the scaling model uses.
        kinds = list(cases.values())
        log(f"reports: backlog of {backlog} reports on one pod")
        cpu0 = worker.cpu_seconds()
        start = time.perf_counter()
        pending = [
            app.send_task("generate_report", kwargs=kinds[i % len(kinds)]) for i in range(backlog)
        ]
        for p in pending:
            p.get(timeout=600)
        seconds = time.perf_counter() - start
        out["backlog"] = {
            "reports": backlog,
            "seconds": seconds,
            "per_second": backlog / seconds,
            "worker_cpu_s": worker.cpu_seconds() - cpu0,
            "probe": summarize_records(task_records(worker, "generate_report")),
        }
        worker.probe_file.unlink(missing_ok=True)
        # Cleanup, against one DELETE per table of the same rows.
        days_to_keep = 365 if scale >= 1 else max(7, int(365 * scale))
        cutoff = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days_to_keep)
        snapshot_for_cleanup()
        before = {t: count_rows(t) for t in SNAPSHOT_TABLES}
        log(f"reports: cleanup_old_data(days_to_keep={days_to_keep})")
        figures = run_task(app, "cleanup_old_data", {"days_to_keep": days_to_keep}, worker)
        deleted = figures.pop("result")["deleted"]
        figures.update(
            days_to_keep=days_to_keep,
            deleted=deleted,
            rows=sum(deleted.values()),
            rows_before=before,
            per_second=sum(deleted.values()) / figures["seconds"],
            probe=summarize_records(task_records(worker, "cleanup_old_data")),
        )
        out["cleanup"] = figures
    finally:
        worker.stop()
    out["cleanup"]["baseline"] = delete_baseline(cutoff)
    c = out["cleanup"]
    log(
        f"reports: cleanup {c['rows']:,} rows in {c['seconds']:.1f} s; one DELETE per table "
        f"{c['baseline']['rows']:,} rows in {c['baseline']['seconds']:.1f} s"
    )
    return out


# --- entry point -----------------------------------------------------------------------------


def run(app: Any, workdir: Path, scale: float, sections: list[str]) -> dict[str, Any]:
    from tasks.settings import get_settings

    n_assets = ASSETS if scale >= 1 else max(30, int(ASSETS * scale))
    history_start = dt.date.fromisoformat(get_settings().history_start)
    history_days = (dt.date.today() - history_start).days
    results: dict[str, Any] = {}
    results["refresh"] = bench_refresh(app, workdir, n_assets)
    if "index" in sections or "reports" in sections:
        results["index"] = bench_index(app, workdir, scale)
    if "reports" in sections:
        results["reports"] = bench_reports(app, workdir, scale, history_days)
    return results
