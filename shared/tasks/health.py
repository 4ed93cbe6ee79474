"""Cheap health checks: files the worker and beat touch, read by the probes.

A probe that runs `celery inspect ping` costs a broadcast round trip through Redis every few
seconds per pod; a file touched by the worker's own event loop says the same (the loop is
alive and consuming) for the price of a stat().
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from celery import bootsteps

HEARTBEAT_INTERVAL = 10.0


def health_dir() -> Path:
    return Path(os.environ.get("HEALTH_DIR", "/tmp/waardhaven-health"))


def touch(name: str) -> None:
    path = health_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Touches `worker-heartbeat` from the consumer's timer; `worker-ready` while consuming."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        touch("worker-heartbeat")
        touch("worker-ready")
        self.tref = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL, touch, ("worker-heartbeat",))

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        (health_dir() / "worker-ready").unlink(missing_ok=True)

    shutdown = stop


def check_file(name: str, max_age: float) -> str | None:
    """None when `name` exists and was touched within max_age seconds, else the problem."""
    path = health_dir() / name
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return f"{path} does not exist"
    if age > max_age:
        return f"{path} is {age:.0f}s old (max {max_age:.0f}s)"
    return None


def check_http(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.health", description=__doc__)
    parser.add_argument("what", choices=["worker-live", "worker-ready", "beat", "http"])
    parser.add_argument("--max-age", type=float, default=60.0)
    parser.add_argument("--url", default="")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.what == "worker-live":
        problem = check_file("worker-heartbeat", args.max_age)
    elif args.what == "worker-ready":
        problem = check_file("worker-ready", float("inf"))
    elif args.what == "beat":
        problem = check_file("beat-heartbeat", args.max_age)
    else:
        problem = check_http(args.url, args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
