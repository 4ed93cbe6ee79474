"""A soft time limit never splits a batch from its commit and its count, other threads or not."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from billiard.pool import SIG_SOFT_TIMEOUT

from tasks.background_tasks import committed_with_its_count


class SoftLimit(Exception):
    pass


def raise_soft_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftLimit  # as billiard's soft_timeout_sighandler raises SoftTimeLimitExceeded


@pytest.fixture
def soft_limit_handler() -> Iterator[None]:
    previous = signal.signal(SIG_SOFT_TIMEOUT, raise_soft_limit)
    yield
    signal.signal(SIG_SOFT_TIMEOUT, previous)


@pytest.fixture
def other_thread() -> Iterator[threading.Thread]:
    """A live Python thread (an error reporter, a tracing exporter...)."""
    stop = threading.Event()
    thread = threading.Thread(target=lambda: stop.wait(30), daemon=True)
    thread.start()
    yield thread
    stop.set()
    thread.join()


def batch_interrupted_by(send: Callable[[], None]) -> list[str]:
    steps: list[str] = []
    with pytest.raises(SoftLimit):
        with committed_with_its_count():
            steps.append("written")
            send()  # the pool's soft limit, mid-batch
            time.sleep(0.1)  # Python runs pending handlers here (in the main thread)
            steps.append("committed")
            time.sleep(0.1)
            steps.append("counted")
        steps.append("next batch")  # not reached: the limit lands between batches
    return steps


def test_the_soft_limit_signal_waits_for_the_end_of_the_batch(soft_limit_handler: None) -> None:
    steps = batch_interrupted_by(lambda: os.kill(os.getpid(), SIG_SOFT_TIMEOUT))
    assert steps == ["written", "committed", "counted"]
    assert signal.getsignal(SIG_SOFT_TIMEOUT) is raise_soft_limit  # handler restored


def test_the_guard_holds_when_the_signal_lands_in_another_thread(
    soft_limit_handler: None, other_thread: threading.Thread
) -> None:
    # The kernel may deliver a process signal to any thread that does not block it; this
    # delivers it to the other thread on purpose. Python still runs the handler in the main
    # thread, inside the batch, unless the guard defers it.
    assert other_thread.ident is not None
    steps = batch_interrupted_by(
        lambda: signal.pthread_kill(other_thread.ident, SIG_SOFT_TIMEOUT)  # type: ignore[arg-type]
    )
    assert steps == ["written", "committed", "counted"]


def test_no_signal_no_exception_and_nested_blocks(
    soft_limit_handler: None, other_thread: threading.Thread
) -> None:
    with committed_with_its_count():
        pass
    steps: list[str] = []
    with pytest.raises(SoftLimit), committed_with_its_count():
        with committed_with_its_count():
            os.kill(os.getpid(), SIG_SOFT_TIMEOUT)
            time.sleep(0.05)
            steps.append("inner done")
        time.sleep(0.05)
        steps.append("outer done")
    assert steps == ["inner done", "outer done"]
