"""bench/compare.py: a figure worse than the baseline beyond the tolerance and the runs' own
spread is a regression; within them it is not; ratios measured in one run compare as such."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.compare import compare, main


def results(per_second: float, compute_s: float = 0.2, floor_s: float = 0.1) -> dict:
    return {
        "queue": {"configs": {"production": {"per_second": per_second}}},
        "index": {"compute_s": compute_s, "lower_bound_s": floor_s},
    }


def verdicts(rows: list[list[str]]) -> dict[str, str]:
    return {row[0]: row[-1] for row in rows}


def test_a_loss_beyond_tolerance_and_spread_is_a_regression() -> None:
    rows, regressed = compare(results(200), [results(170), results(172)], tolerance=0.10)
    assert regressed == ["queue: production, tasks/s"]
    assert verdicts(rows)["queue: production, tasks/s"] == "REGRESSION"


def test_a_loss_within_the_runs_spread_is_not() -> None:
    # 170 and 200: the runs themselves differ by 18 %, so 0.85x is noise, not a regression.
    rows, regressed = compare(results(200), [results(170), results(200)], tolerance=0.0)
    assert regressed == []
    assert verdicts(rows)["queue: production, tasks/s"] == "ok"


def test_in_run_ratios_compare_across_machines() -> None:
    # A machine twice as slow: the compute and its floor both take twice as long.
    rows, regressed = compare(results(200), [results(200, 0.4, 0.2)], tolerance=0.05)
    assert regressed == []
    assert verdicts(rows)["index: arithmetic / NumPy floor (x)"] == "ok"
    _, regressed = compare(results(200), [results(200, 0.5, 0.2)], tolerance=0.05)
    assert regressed == ["index: arithmetic / NumPy floor (x)"]  # 2.5x against 2x


def test_the_command_exits_1_on_a_regression(tmp_path: Path) -> None:
    import json

    base, run = tmp_path / "base.json", tmp_path / "run.json"
    base.write_text(json.dumps(results(200)))
    run.write_text(json.dumps(results(100)))
    assert main([str(base), str(run)]) == 1
    assert main([str(base), str(base)]) == 0
