#!/usr/bin/env python3
"""Benchmarks of waardhaven-tasks against baselines measured in the same run (issue 6).

`make bench` runs everything (~10 minutes on 2 cores), prints one table and writes
bench/results.json. Everything runs on a private redis-server (free port) and a fresh
PostgreSQL database (BENCH_POSTGRES_URL's server, default 127.0.0.1:5432, dropped at the end);
workers are the real `services/worker-*/run` processes with the production settings.

    python bench/run.py [--sections queue,refresh,index,reports,scaling,api] [--scale 0.25]

BENCH_QUEUE_CONFIGS=production_stock,production runs only those configurations of section 1.

--scale shrinks the task counts and the data set (a quick smoke run); the figures in
docs/performance.md come from a full run (--scale 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Database, RedisServer, log  # noqa: E402

SECTIONS = ("queue", "refresh", "index", "reports", "scaling", "api", "sentinel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if {"index", "reports"} & set(sections) and "refresh" not in sections:
        sections.insert(0, "refresh")  # they work on the refreshed data set
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="wh-bench-"))
    server = RedisServer()
    database = Database()
    history_days = int(3652 * args.scale) if args.scale < 1 else 3652
    os.environ.update(
        {
            "REDIS_URL": server.url,
            "DATABASE_URL": database.url,
            "MARKET_DATA_PROVIDER": "synthetic",
            "HISTORY_START": (dt.date.today() - dt.timedelta(days=history_days)).isoformat(),
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
        }
    )
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "scale": args.scale,
    }
    try:
        # Imported only now: tasks.settings reads the environment set above.
        from tasks.celery_app import app
        from tasks.migrate import upgrade

        upgrade()
        log(f"redis {server.url}, database {database.name}, work dir {workdir}")
        if "queue" in sections:
            from bench import queue_bench

            results["queue"] = queue_bench.run(
                app, server, workdir, args.scale, latency_samples=max(100, int(500 * args.scale))
            )
        if "refresh" in sections:
            from bench import data_bench

            results.update(data_bench.run(app, workdir, args.scale, sections))
        if "scaling" in sections:
            from bench import scaling

            results["scaling"] = scaling.run(results)
        if "api" in sections:
            from bench import api_bench

            results["api"] = api_bench.run(app, workdir, args.scale)
        if "sentinel" in sections:
            from bench import sentinel_bench

            results["sentinel"] = sentinel_bench.run(workdir, args.scale)
    finally:
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["machine"]["load_average_at_end"] = os.getloadavg()
        try:
            from tasks.db import dispose_engine

            dispose_engine()
        finally:
            database.close()
            server.close()
            if not args.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    from bench.report import table

    print(table(results))
    if "sentinel" in results:  # docs/sentinel.md
        from bench.sentinel_bench import table as sentinel_table

        print(sentinel_table(results["sentinel"]))
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"done in {results['seconds']:.0f} s; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
