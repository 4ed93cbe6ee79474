"""Alembic environment: the database URL comes from DATABASE_URL (tasks.settings)."""

from __future__ import annotations

from alembic import context

from tasks.db import get_engine, make_engine
from tasks.models import Base

url = context.config.get_main_option("sqlalchemy.url")
engine = make_engine(url) if url else get_engine()

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
