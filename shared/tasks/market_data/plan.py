"""Refresh planning: which symbols, from which day, in which provider requests. Pure.

The plan orders the work so that a refresh cut short (the provider's daily credits, the time
budget of one task run) is continued by the next run where it stopped:
- symbols already written by this run (a retry, a continuation) are left out;
- the stalest symbols go first: never fetched, then the oldest newest-price, then by name.
  A smart refresh stopped by the day's credits therefore starts the next day with the
  symbols it did not reach, not with the ones it refreshed yesterday.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Batch:
    """One provider request: `symbols` from `start` to the plan's end."""

    start: dt.date
    symbols: tuple[str, ...]


@dataclass(frozen=True)
class RefreshPlan:
    end: dt.date
    batches: tuple[Batch, ...]

    @property
    def symbols(self) -> list[str]:
        return [s for b in self.batches for s in b.symbols]


def start_date(
    mode: Literal["smart", "full"],
    newest: dt.date | None,
    today: dt.date,
    history_start: dt.date,
    retention_days: int,
    overlap_days: int,
) -> dt.date:
    """First day to fetch: `full` from the history start; `smart` from the newest stored day
    minus the overlap, never before what cleanup keeps (nor before the history start)."""
    if mode == "full":
        return history_start
    start = max(history_start, today - dt.timedelta(days=retention_days))
    if newest is not None:
        start = max(start, newest - dt.timedelta(days=overlap_days))
    return start


def plan_refresh(
    mode: Literal["smart", "full"],
    newest: Mapping[str, dt.date | None],
    today: dt.date,
    *,
    history_start: dt.date,
    retention_days: int,
    overlap_days: int,
    batch_size: int,
    done: Collection[str] = (),
) -> RefreshPlan:
    """Batches of at most `batch_size` symbols sharing a start date, stalest symbols first.

    `newest`: each symbol to refresh and its newest stored price date (None: none stored).
    `done`: symbols this run already wrote or reported, left out.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    todo = [s for s in newest if s not in done]
    todo.sort(key=lambda s: (newest[s] is not None, newest[s] or dt.date.min, s))
    batches: list[Batch] = []
    for symbol in todo:
        start = start_date(mode, newest[symbol], today, history_start, retention_days, overlap_days)
        last = batches[-1] if batches else None
        # Consecutive symbols with the same start share a request (one start per request).
        if last is not None and last.start == start and len(last.symbols) < batch_size:
            batches[-1] = Batch(start, (*last.symbols, symbol))
        else:
            batches.append(Batch(start, (symbol,)))
    return RefreshPlan(end=today, batches=tuple(batches))


def chunks(symbols: Sequence[str], size: int) -> list[list[str]]:
    """Symbols split into chunk tasks of at most `size` (a refresh with unlimited credits)."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    return [list(symbols[i : i + size]) for i in range(0, len(symbols), size)]
