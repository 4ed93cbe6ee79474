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
