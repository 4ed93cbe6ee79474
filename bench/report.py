"""The one table the benchmark prints (also the table of docs/performance.md)."""

from __future__ import annotations

import math
from typing import Any

Row = tuple[str, str, str, str, str, str]
HEADER: Row = ("#", "measure", "result", "baseline (same run)", "ratio", "target")


# Production settings with each way of starting a child: compared with Celery's defaults.
PRODUCTION_KEYS = ("production", "production_stock", "production_public")


def _n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _x(value: float | None, baseline: float | None, digits: int = 2) -> str:
    if not value or not baseline:
        return "n/a"
    return f"{value / baseline:.{digits}f}x"


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def queue_rows(q: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    raw = q["raw"]
    c = q["configs"]
    rows.append(
        (
            "1",
            f"raw redis-py LPUSH+BRPOP, 1 connection, {q['message_bytes']} B",
            f"{_n(raw['per_second'])}/s; p50 {_n(raw['p50_ms'], 2)} ms, "
            f"p99 {_n(raw['p99_ms'], 2)} ms",
            "(the broker's limit)",
            "",
            "",
        )
    )
    defaults = c.get("defaults", {}).get("per_second")
    prod = c.get("production", {})
    for key, figures in c.items():
        lat = figures.get("latency")
        latency = f"; p50 {_n(lat['p50_ms'], 1)} ms, p99 {_n(lat['p99_ms'], 1)} ms" if lat else ""
        if key == "defaults":
            base, ratio = (
                f"raw {_n(raw['per_second'])}/s",
                _x(figures["per_second"], raw["per_second"]),
            )
        elif key in PRODUCTION_KEYS:
            base, ratio = f"defaults {_n(defaults)}/s", _x(figures["per_second"], defaults)
        else:
            base = f"production {_n(prod.get('per_second'))}/s"
            ratio = _x(figures["per_second"], prod.get("per_second"))
        target = ""  # the issue sets no queue target: the ratios are the figures
        children = figures.get("children", {})
        extra = ""
        if key in PRODUCTION_KEYS and children.get("children"):
            extra = (
                f"; {children['children']} children, start {_n(children['start_ms'], 1)} ms, "
                f"idle before exit {_n(children.get('last_task_to_exit_ms'), 1)} ms"
            )
        rows.append(
            (
                "1",
                f"{figures['label']}, {figures['tasks']:,} pings, 1 pod -c 2",
                f"{_n(figures['per_second'])}/s{latency}{extra}; worker CPU "
                f"{_n(figures['worker_cpu_ms_per_task'], 2)} ms/task",
                base,
                ratio,
                target,
            )
        )
    return rows


def _rate(per_second: float) -> str:
    return f"{_n(per_second)} rows/s"


def refresh_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    copy = r["copy"]
    assets, rows_total = r["seed"]["assets"], r["first_load"]["rows"]
    base = f"COPY into an empty prices-like table: {_rate(copy['per_second'])}"
    for key, label in (
        ("first_load", "first load (insert)"),
        ("rerun", "re-run (same rows again: upsert)"),
    ):
        f = r[key]
        limit = f["seconds"] / copy["seconds"]
        c = f["chunks"]
        rows.append(
            (
                "2",
                f"refresh_market_data(full), {assets} assets x {r['history_start']}.., "
                f"{label}, worker-high -c 2",
                f"{_rate(f['per_second'])} ({f['rows']:,} rows in {_n(f['seconds'], 1)} s; "
                f"{c.get('tasks', 0)} chunks, {_n(c.get('cpu_fraction', 0) * 100)}% of their "
                f"time on worker CPU)",
                base,
                f"{limit:.2f}x the time",
                f"within 3x of COPY: {_check(limit <= 3)}",
            )
        )
    p = r["pieces"]
    rows.append(
        (
            "2",
            "where re-run time goes (one process, chunk after chunk)",
            f"provider {_n(p['fetch_s'], 1)} s ({_n(p['fetch_per_second'])} rows/s), rows + "
            f"COPY text {_n(p['encode_s'], 1)} s, PostgreSQL (COPY to temp + merge) "
            f"{_n(p['database_s'], 1)} s",
            f"COPY {_n(copy['seconds'], 1)} s for {rows_total:,} rows",
            _x(p["total_s"], copy["seconds"]),
            "",
        )
    )
    return rows


def index_rows(i: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    t = i["task"]
    ratio = i["compute_s"] / i["lower_bound_s"]
    rows.append(
        (
            "3",
            f"compute_index task, {i['assets']} assets x {i['days']} days, worker-high",
            f"{_n(t['seconds'], 2)} s: load {_n(i['load_s'], 2)} s, compute "
            f"{_n(i['compute_s'] * 1000)} ms, write {_n(i['write_s'], 2)} s "
            f"({i['rows_written']:,} rows); worker RSS {_n(t['probe'].get('rss_mib_max'))} MiB",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            "3",
            "index.compute_index (the arithmetic)",
            f"{_n(i['compute_s'] * 1000, 1)} ms",
            f"NumPy lower bound {_n(i['lower_bound_s'] * 1000, 1)} ms",
            f"{ratio:.2f}x",
            f"within 2x: {_check(ratio <= 2)}",
        )
    )
    sizes = i["sizes"]
    spread = i["linearity_spread"]
    rows.append(
        (
            "3",
            "linear in assets x days: " + ", ".join(f"{s['assets']}x{s['days']}" for s in sizes),
            ", ".join(
                f"{_n(s['seconds'] * 1000, 1)} ms ({_n(s['ns_per_cell'])} ns/cell)" for s in sizes
            ),
            "lower bound " + ", ".join(f"{_n(s['lower_bound_s'] * 1000, 1)} ms" for s in sizes),
            f"ns/cell spread {spread:.2f}x",
            f"linear (spread <= 1.5x): {_check(spread <= 1.5)}",
        )
    )
    rows.append(
        (
            "3",
            "memory peak of compute_index (tracemalloc)",
            f"{_n(i['peak_mib'])} MiB",
            f"input matrix {_n(i['input_mib'], 1)} MiB; lower bound peak "
            f"{_n(i['lower_bound_peak_mib'])} MiB",
            _x(i["peak_mib"], i["input_mib"], 1),
            "",
        )
    )
    return rows


def reports_rows(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for key, f in r["kinds"].items():
        probe = f["probe"]
        rows.append(
            (
                "4",
                f"generate_report {key.replace('_', ' ')}",
                f"{_n(f['seconds'] * 1000)} ms round trip "
                f"({_n(probe.get('wall_s_median', 0) * 1000)} ms in the worker); "
                f"{f['rows_read']:,} rows read, {f['rows_written']} written",
                "",
                "",
                "",
            )
        )
    b = r["backlog"]
    rows.append(
        (
            "4",
            f"backlog of {b['reports']} mixed reports, one pod -c 2",
            f"{_n(b['per_second'], 1)} reports/s ({_n(b['seconds'], 1)} s)",
            "",
            "",
            "",
        )
    )
    c = r["cleanup"]
    base = c["baseline"]
    kept = c["deleted"].get("prices", 0) + c["deleted"].get("allocations", 0)
    per_table = ", ".join(f"{k} {v:,}" for k, v in c["deleted"].items() if v)
    rows.append(
        (
            "4",
            f"cleanup_old_data(days_to_keep={c['days_to_keep']}), batches of 5,000",
            f"{c['rows']:,} rows in {_n(c['seconds'], 1)} s ({per_table})",
            f"one DELETE per table: prices + allocations {base['rows']:,} rows in "
            f"{_n(base['seconds'], 1)} s",
            _x(c["seconds"] * base["rows"] / max(kept, 1), base["seconds"]),
            "",
        )
    )
    return rows


def table(results: dict[str, Any]) -> str:
    rows: list[Row] = [HEADER]
    if "queue" in results:
        rows += queue_rows(results["queue"])
    for key, build in (("refresh", refresh_rows), ("index", index_rows), ("reports", reports_rows)):
        if key in results:
            rows += build(results[key])
    for key in ("scaling", "api"):  # sections that build their own rows
        if key in results:
            rows += [tuple(r) for r in results[key].get("rows", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
