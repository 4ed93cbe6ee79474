"""Refresh planning: which symbols, from which day, in which requests (pure, no servers)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import pytest

from tasks.market_data.plan import Batch, chunks, plan_refresh, start_date

D = dt.date
TODAY = D(2026, 12, 1)
HISTORY = D(2018, 1, 1)


def plan(newest: Mapping[str, D | None], mode: Any = "smart", **kw: Any) -> Any:
    kw.setdefault("batch_size", 8)
    return plan_refresh(
        mode, newest, TODAY, history_start=HISTORY, retention_days=365, overlap_days=5, **kw
    )


def test_full_fetches_the_whole_history_in_batches_of_eight() -> None:
    symbols = [f"S{i:02d}" for i in range(14)]
    p = plan(dict.fromkeys(symbols, D(2026, 11, 30)), mode="full")
    assert p.end == TODAY
    assert p.batches == (Batch(HISTORY, tuple(symbols[:8])), Batch(HISTORY, tuple(symbols[8:])))


def test_smart_starts_at_the_newest_day_minus_the_overlap() -> None:
    p = plan({"AAPL": D(2026, 11, 27), "MSFT": D(2026, 11, 27)})
    assert p.batches == (Batch(D(2026, 11, 22), ("AAPL", "MSFT")),)


def test_smart_never_fetches_before_what_cleanup_keeps_nor_the_history_start() -> None:
    assert start_date("smart", None, TODAY, HISTORY, 365, 5) == TODAY - dt.timedelta(days=365)
    assert start_date("smart", D(2020, 1, 1), TODAY, HISTORY, 365, 5) == D(2025, 12, 1)
    assert start_date("smart", None, D(2018, 3, 1), HISTORY, 365, 5) == HISTORY
    assert start_date("full", D(2026, 11, 30), TODAY, HISTORY, 365, 5) == HISTORY


def test_the_stalest_symbols_go_first_never_fetched_before_all() -> None:
    p = plan({"A": D(2026, 11, 30), "B": None, "C": D(2026, 11, 20), "D": D(2026, 11, 30)})
    assert p.symbols == ["B", "C", "A", "D"]
    # one start per request: symbols of different starts never share a batch
    assert [b.symbols for b in p.batches] == [("B",), ("C",), ("A", "D")]
    assert all(len({b.start}) == 1 for b in p.batches)


def test_symbols_this_run_already_did_are_left_out() -> None:
    newest = dict.fromkeys([f"S{i:02d}" for i in range(20)], D(2026, 11, 30))
    first = plan(newest)
    done = set(first.batches[0].symbols) | {"S15"}
    again = plan(newest, done=done)
    assert set(again.symbols) == set(newest) - done
    assert [len(b.symbols) for b in again.batches] == [8, 3]


def test_a_day_cut_short_resumes_the_next_day_with_the_symbols_not_reached() -> None:
    """Yesterday's run wrote the first 8 (newest = today) and stopped at the day's cap: today
    the other 6, still stale, come first."""
    symbols = [f"S{i:02d}" for i in range(14)]
    newest: dict[str, D | None] = dict.fromkeys(symbols, D(2026, 11, 20))
    for s in symbols[:8]:
        newest[s] = D(2026, 11, 30)
    assert plan(newest).batches[0].symbols == tuple(symbols[8:])


def test_batch_size_is_respected_and_everything_is_planned_once() -> None:
    newest = {f"S{i:03d}": D(2026, 11, 30) if i % 3 else None for i in range(500)}
    p = plan(newest, batch_size=8)
    assert all(1 <= len(b.symbols) <= 8 for b in p.batches)
    assert sorted(p.symbols) == sorted(newest)
    assert len(p.batches) == 21 + 42  # 167 never fetched (21 batches of <= 8) + 333 (42)


def test_nothing_to_do_is_an_empty_plan() -> None:
    assert plan({}).batches == ()
    assert plan({"A": None}, done={"A"}).batches == ()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        plan({"A": None}, batch_size=0)
    with pytest.raises(ValueError, match="size"):
        chunks(["A"], 0)


def test_chunks_split_in_order() -> None:
    assert chunks(["A", "B", "C", "D", "E"], 2) == [["A", "B"], ["C", "D"], ["E"]]
    assert chunks([], 3) == []


def test_a_run_in_process_adds_up_its_batches_and_skips_them_next_time() -> None:
    from tasks.market_data.run import LocalRefreshRun

    run = LocalRefreshRun("unit-test-run")
    run.record(["A", "B"], {}, 2, 10, 0)
    run.record(["C"], {"C": "unknown symbol"}, 0, 0, 0)
    again = LocalRefreshRun("unit-test-run")  # a continuation of the same run
    assert again.done() == {"A", "B", "C"}
    assert again.totals() == {
        "assets_refreshed": 2,
        "rows_inserted": 10,
        "rows_updated": 0,
        "symbols_failed": {"C": "unknown symbol"},
    }
    assert plan(dict.fromkeys("ABCD"), done=again.done()).symbols == ["D"]
    assert LocalRefreshRun("another-run").done() == set()
