#!/usr/bin/env python3
"""`make chaos`: run the fault-injection scenarios (tests/reliability) and print one table.

Each scenario is a pytest test on real processes (workers, beat, Flower, nginx) and real
servers (Redis, PostgreSQL); it writes its figures to the JSON file named by CHAOS_RESULTS.
This script runs them, then prints: scenario, tasks sent, completed, duplicated, lost, time to
recover. It fails when a test fails or any scenario lost or duplicated an effect.

    python scripts/chaos.py                 # every scenario
    python scripts/chaos.py -k redis        # extra arguments go to pytest
    python scripts/chaos.py --markdown      # the table as Markdown (for docs/reliability.md)
    python scripts/chaos.py --report FILE   # only print the table of an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "var" / "chaos-results.json"
# Redis Sentinel failover (docs/sentinel.md): its own tests folder, its own servers.
SENTINEL_SCENARIO = "tests/sentinel/test_sentinel_failover.py"
COLUMNS = [
    ("scenario", "scenario"),
    ("sent", "sent"),
    ("completed", "completed"),
    ("duplicated", "duplicated"),
    ("lost", "lost"),
    ("recover_s", "recover (s)"),
]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cells = [[cell(row.get(key)) for key, _ in COLUMNS] for row in rows]
    heads = [title for _, title in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["--:"] * 5) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def details(rows: list[dict[str, Any]]) -> str:
    known = {key for key, _ in COLUMNS}
    out = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in known}
        if extra:
            out.append(f"{row['scenario']}: {json.dumps(extra)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--report", type=Path, help="print the table of this results file")
    args, pytest_args = parser.parse_known_args(argv)

    code = 0
    if args.report:
        results = args.report
    else:
        results = Path(os.environ.get("CHAOS_RESULTS") or DEFAULT_RESULTS)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)
        env = {**os.environ, "CHAOS_RESULTS": str(results)}
        started = time.monotonic()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider",
             SENTINEL_SCENARIO, *pytest_args],
            cwd=REPO,
            env=env,
        )  # fmt: skip
        print(f"\nscenarios ran in {time.monotonic() - started:.0f} s; figures in {results}\n")
    if not results.exists():
        print(f"no figures in {results}", file=sys.stderr)
        return code or 1
    rows = list(json.loads(results.read_text()).values())
    print(table(rows, args.markdown))
    if not args.markdown:
        print("\n" + details(rows))
    bad = [r["scenario"] for r in rows if r.get("lost") or r.get("duplicated")]
    if bad:
        print(f"\nLOST OR DUPLICATED EFFECTS in: {', '.join(bad)}", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
