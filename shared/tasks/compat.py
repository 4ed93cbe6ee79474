"""The library versions our hooks on Celery and billiard internals were tested with.

A hook on a private or undocumented API (tasks.prefork's pool patches, GuardedConsumer's
message check) is installed only when the installed versions are exactly these. With any other
version the worker logs that it runs without the hook and keeps Celery's own behaviour, which is
correct, only slower (prefork) or less forgiving of malformed messages (GuardedConsumer).
tests/unit/test_hook_assumptions.py checks every assumption the hooks make against the installed
libraries: after a change of requirements/base.lock, run it, then move TESTED.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata

logger = logging.getLogger(__name__)

TESTED = {"celery": "5.7.0", "billiard": "4.3.2"}


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def untested() -> dict[str, str | None]:
    """Distribution -> installed version, for those that differ from TESTED."""
    found = {name: installed(name) for name in TESTED}
    return {name: version for name, version in found.items() if version != TESTED[name]}


@functools.cache
def hook_allowed(hook: str, without: str) -> bool:
    """True when `hook` may be installed; else logs (once per process) what runs instead."""
    differ = untested()
    if differ:
        logger.warning(
            "not installing %s: tested with %s, found %s; running without (%s)",
            hook,
            ", ".join(f"{name} {TESTED[name]}" for name in differ),
            ", ".join(f"{name} {version}" for name, version in differ.items()),
            without,
        )
    return not differ
