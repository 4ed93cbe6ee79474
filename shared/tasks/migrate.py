"""Run the Alembic migrations from Python (no alembic.ini needed)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "tasks:migrations")
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def pending(url: str | None = None) -> tuple[str | None, str | None]:
    """(revision the database is at, newest revision); equal when nothing is to migrate."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from tasks.db import get_engine, make_engine

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    engine = make_engine(url) if url else get_engine()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        if url:
            engine.dispose()  # an engine of its own: no pool left behind per call
    return current, head


def wait_for_head(timeout: float, interval: float = 2.0, url: str | None = None) -> str:
    """Block until the schema is at the newest revision (the wait-for-migrations init container
    of workers and beat: new code never runs on the old schema). TimeoutError after timeout."""
    import time

    from sqlalchemy.exc import SQLAlchemyError

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            current, head = pending(url)
            if current == head:
                return str(head)
            last = f"database at {current}, code needs {head}"
        except SQLAlchemyError as exc:  # the database may still be starting: keep waiting
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"schema not migrated after {timeout:.0f}s ({last})")
        time.sleep(interval)
