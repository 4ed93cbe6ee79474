"""Errors the tasks raise, split by what the worker should do with them.

Each keeps its constructor arguments in `args`: Celery stores them as JSON in the result
backend and rebuilds the exception for the caller from them.
"""

from __future__ import annotations

from typing import Any


class InvalidTaskArguments(ValueError):
    """Bad input: the task fails at once, naming the field, and is never retried."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field

    def __str__(self) -> str:
        return f"invalid argument {self.args[0]!r}: {self.args[1]}"


class NotEnoughData(ValueError):
    """The stored data cannot give a result yet (no prices, no eligible asset): the task fails
    at once saying what is missing, never retried; a refresh fixes it, not another argument."""


class InvalidStrategy(ValueError):
    """The `strategy_config` row breaks a rule: the task fails at once naming the column."""


class InvalidMessage(ValueError):
    """A task message the worker refused: too large, wrong content type, malformed body."""


class PoisonMessage(RuntimeError):
    """A message delivered more than MAX_DELIVERIES times (its worker kept dying)."""


class PartialResult(RuntimeError):
    """The soft time limit stopped a task; what it finished is committed and reported."""

    def __init__(self, message: str, done: dict[str, Any]) -> None:
        super().__init__(message, done)
        self.done = done

    def __str__(self) -> str:
        return f"{self.args[0]}; kept: {self.args[1]}"


class QuotaExhausted(PartialResult):
    """The provider's credits for the day are spent: what was written is kept, the symbols left
    are listed, and the next run goes on from them. Not retried (it would only ask again)."""
