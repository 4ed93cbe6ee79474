"""A refresh run's progress: the symbols it finished and its totals, across its messages.

A refresh may take several task runs: retries after a transient error, continuations past its
time budget, chunk tasks. Each of them skips what the run already wrote (`done`) and adds to
its totals, so the last one reports the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RUN_KEY = "waardhaven:refresh:{run}"  # hash of totals; :done (set), :failed (hash)
RUN_TTL = 2 * 86400  # a run's progress outlives its retries and continuations


class RefreshRun:
    """What one refresh run wrote so far, in Redis under the refresh's task id, which its
    retries, its continuations (Task.replace) and its chunks' summary all keep."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.key = client, RUN_KEY.format(run=run_id)

    def done(self) -> set[str]:
        return {m.decode() for m in self.client.smembers(self.key + ":done")}

    def record(
        self, symbols: Sequence[str], failed: dict[str, str], refreshed: int, ins: int, upd: int
    ) -> None:
        pipe = self.client.pipeline()  # MULTI: all of a batch or none
        if symbols:
            pipe.sadd(self.key + ":done", *symbols)
        if failed:
            pipe.hset(self.key + ":failed", mapping=failed)
        pipe.hincrby(self.key, "assets_refreshed", refreshed)
        pipe.hincrby(self.key, "rows_inserted", ins)
        pipe.hincrby(self.key, "rows_updated", upd)
        for suffix in ("", ":done", ":failed"):
            pipe.expire(self.key + suffix, RUN_TTL)
        pipe.execute()

    def totals(self) -> dict[str, Any]:
        counts = {k.decode(): int(v) for k, v in self.client.hgetall(self.key).items()}
        failed = self.client.hgetall(self.key + ":failed")
        return {
            "assets_refreshed": counts.get("assets_refreshed", 0),
            "rows_inserted": counts.get("rows_inserted", 0),
            "rows_updated": counts.get("rows_updated", 0),
            "symbols_failed": {k.decode(): v.decode() for k, v in failed.items()},
        }


class LocalRefreshRun(RefreshRun):
    """The same in this process only: eager mode (TASK_ALWAYS_EAGER) runs without Redis."""

    runs: dict[str, dict[str, Any]] = {}

    def __init__(self, run_id: str) -> None:
        self.state = self.runs.setdefault(run_id, {"done": set(), "failed": {}, "counts": {}})

    def done(self) -> set[str]:
        return set(self.state["done"])

    def record(
        self, symbols: Sequence[str], failed: dict[str, str], refreshed: int, ins: int, upd: int
    ) -> None:
        self.state["done"].update(symbols)
        self.state["failed"].update(failed)
        counts = self.state["counts"]
        counts["assets_refreshed"] = counts.get("assets_refreshed", 0) + refreshed
        counts["rows_inserted"] = counts.get("rows_inserted", 0) + ins
        counts["rows_updated"] = counts.get("rows_updated", 0) + upd

    def totals(self) -> dict[str, Any]:
        counts = self.state["counts"]
        return {
            "assets_refreshed": counts.get("assets_refreshed", 0),
            "rows_inserted": counts.get("rows_inserted", 0),
            "rows_updated": counts.get("rows_updated", 0),
            "symbols_failed": dict(self.state["failed"]),
        }
