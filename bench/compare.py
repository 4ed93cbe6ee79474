#!/usr/bin/env python3
"""Compare `make bench` results files: is a change a regression?

    python bench/compare.py BASELINE.json RUN.json [RUN.json ...]

Each results file is what `bench/run.py --output FILE` wrote. Run the baseline (say, the
commit before a change, in a `git worktree`) and the change on the same machine, one after the
other, ideally twice each: absolute figures differ several-fold between machines and with load,
so only runs of one session compare. Prints each key figure, its ratio to the baseline
(> 1 is better), and the runs' own spread; exits 1 when a figure is worse than the baseline by
more than --tolerance beyond that spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# (label, path into the results, True when higher is better; None: shown, not judged: the
# database's own speed, or a figure that moves with it).
# "x" figures are ratios to a baseline measured in the same run: they compare across machines.
FIGURES: tuple[tuple[str, str, bool | None], ...] = (
    ("queue: Celery defaults, tasks/s", "queue.configs.defaults.per_second", True),
    ("queue: production, tasks/s", "queue.configs.production.per_second", True),
    ("queue: production p99, ms", "queue.configs.production.latency.p99_ms", False),
    ("queue: worker CPU, ms/task", "queue.configs.production.worker_cpu_ms_per_task", False),
    ("queue: stock child start, tasks/s", "queue.configs.production_stock.per_second", True),
    ("queue: no recycling, tasks/s", "queue.configs.no_recycling.per_second", True),
    ("refresh: first load, time / COPY's (x)", "refresh.first_load_over_copy", False),
    ("refresh: re-run, time / COPY's (x)", "refresh.rerun_over_copy", False),
    ("refresh: first load, rows/s", "refresh.first_load.per_second", None),
    ("refresh: re-run, rows/s", "refresh.rerun.per_second", None),
    ("refresh: COPY into PostgreSQL, rows/s", "refresh.copy.per_second", None),
    ("index: compute_index task, s", "index.task.seconds", False),
    ("index: arithmetic / NumPy floor (x)", "index.compute_over_floor", False),
    ("index: memory peak, MiB", "index.peak_mib", False),
    ("reports: performance all, s", "reports.kinds.performance_all.seconds", False),
    ("reports: backlog of 300, reports/s", "reports.backlog.per_second", True),
    ("cleanup: rows/s", "reports.cleanup.per_second", True),
)  # fmt: skip


RATIOS = {  # derived figure -> (numerator, denominator), both in the same run
    "index.compute_over_floor": ("index.compute_s", "index.lower_bound_s"),
    "refresh.first_load_over_copy": ("refresh.copy.per_second", "refresh.first_load.per_second"),
    "refresh.rerun_over_copy": ("refresh.copy.per_second", "refresh.rerun.per_second"),
}


def lookup(results: dict[str, Any], path: str) -> float | None:
    if path in RATIOS:
        top, bottom = (lookup(results, p) for p in RATIOS[path])
        return top / bottom if top and bottom else None
    node: Any = results
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _gain(base: float, value: float, higher_is_better: bool | None) -> float:
    """value against base, > 1 when better."""
    if higher_is_better is False:
        return base / value if value else 0.0
    return value / base


def compare(
    baseline: dict[str, Any], runs: list[dict[str, Any]], tolerance: float
) -> tuple[list[list[str]], list[str]]:
    """Rows of the table and the figures that regressed."""
    rows, regressed = [], []
    for label, path, higher_is_better in FIGURES:
        base = lookup(baseline, path)
        values = [lookup(run, path) for run in runs]
        known = [v for v in values if v is not None]
        if base is None or not known:
            continue
        ratios = [_gain(base, v, higher_is_better) for v in known]
        spread = max(known) / min(known) - 1 if min(known) > 0 else 0.0
        verdict = "ok" if higher_is_better is not None else "(shown)"
        if higher_is_better is not None and min(ratios) < 1 - tolerance - spread:
            verdict = "REGRESSION"
            regressed.append(label)
        rows.append(
            [
                label,
                f"{base:,.4g}",
                ", ".join(f"{v:,.4g}" for v in known),
                ", ".join(f"{r:.2f}x" for r in ratios),
                f"{spread:.0%}",
                verdict,
            ]
        )
    return rows, regressed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="allowed loss beyond the runs' spread"
    )
    args = parser.parse_args(argv)
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    rows, regressed = compare(load(args.baseline), [load(p) for p in args.runs], args.tolerance)
    header = ["figure", "baseline", "run(s)", "vs baseline (>1 better)", "runs' spread", ""]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if regressed:
        print(f"\nregressed beyond {args.tolerance:.0%} + spread: {', '.join(regressed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
