"""A soft time limit never splits a batch from its commit and its count."""

from __future__ import annotations

import os
import signal
from types import FrameType

import pytest
from billiard.pool import SIG_SOFT_TIMEOUT

from tasks.background_tasks import committed_with_its_count


class SoftLimit(Exception):
    pass


def raise_soft_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftLimit  # as billiard's soft_timeout_sighandler raises SoftTimeLimitExceeded


def test_the_soft_limit_signal_waits_for_the_end_of_the_batch() -> None:
    previous = signal.signal(SIG_SOFT_TIMEOUT, raise_soft_limit)
    steps: list[str] = []
    try:
        with pytest.raises(SoftLimit):
            with committed_with_its_count():
                steps.append("written")
                os.kill(os.getpid(), SIG_SOFT_TIMEOUT)  # the pool's soft limit, mid-batch
                steps.append("committed")
                steps.append("counted")
            steps.append("next batch")  # not reached: the limit lands between batches
    finally:
        signal.signal(SIG_SOFT_TIMEOUT, previous)
    assert steps == ["written", "committed", "counted"]
    assert SIG_SOFT_TIMEOUT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
