"""Load helpers for the rate-limiter tests (unit and integration)."""

from __future__ import annotations

import threading
import time
from typing import Any


def hammer(make: Any, threads: int, seconds: float) -> list[float]:
    """Threads acquiring one credit in a loop; returns the monotonic times of the grants."""
    grants: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        limiter = make()
        while time.monotonic() < stop:
            if limiter.acquire(1) == 0.0:
                now = time.monotonic()
                with lock:
                    grants.append(now)
            else:
                time.sleep(0.005)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sorted(grants)


def max_in_any_window(times: list[float], width: float) -> int:
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= width:
            first += 1
        best = max(best, last - first + 1)
    return best
