"""Throttled PROGRESS updates: each update is a Redis write plus a publish."""

from __future__ import annotations

import time
from typing import Any

from tasks.settings import get_settings


class Progress:
    """`PROGRESS` state with meta {current, total, status}, at most every PROGRESS_INTERVAL."""

    def __init__(self, task: Any, total: int, interval: float | None = None) -> None:
        self.task = task
        self.total = max(int(total), 0)
        self.interval = get_settings().progress_interval if interval is None else interval
        self._last = 0.0

    def update(self, current: int, status: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        request = self.task.request
        if request.called_directly or request.is_eager or not request.id:
            return  # no one can poll it: a direct call, or eager mode (nothing is stored)
        self.task.update_state(
            state="PROGRESS",
            meta={"current": int(current), "total": self.total, "status": status},
        )
