"""Engine and session factory (SQLAlchemy 2), and a dialect-aware bulk upsert.

Bulk upserts on PostgreSQL go through COPY: the rows are streamed into a temporary table and
merged with one INSERT ... SELECT ... ON CONFLICT, ~20x faster than multi-row INSERT statements
(bench/run.py, docs/performance.md). Small upserts and SQLite use INSERT ... ON CONFLICT.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from tasks.settings import get_settings

logger = logging.getLogger(__name__)

UPSERT_BATCH = 2000
# From this many rows an upsert on PostgreSQL goes through COPY and a temporary table.
COPY_MIN_ROWS = 500
# Rows per COPY statement: bounds the memory of the text buffer (~100 bytes a row).
COPY_CHUNK = 50_000


# libpq's words for "no server there now" (a restart, a failover): a connection is tried again.
# Anything else (a wrong password, a missing database) fails at once.
SERVER_AWAY = (
    "connection refused",
    "could not connect",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "server closed the connection unexpectedly",
    "timeout expired",
)
CONNECT_TIMEOUT = 10  # seconds per connection attempt (an unreachable host during a failover)


def _wait_for_server(engine: Engine, wait: float) -> None:
    """New connections of `engine` keep trying for `wait` seconds while PostgreSQL is away.

    A task that meets a restart or failover then waits here on its next connection instead of
    burning its retries (whose full jitter may be 0 s each): every run of it waits at least
    `wait` seconds for the server, so MAX_RETRIES runs ride out MAX_RETRIES x `wait` seconds.
    """

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        cparams.setdefault("connect_timeout", CONNECT_TIMEOUT)
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            try:
                return dialect.loaded_dbapi.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(w in str(exc).lower() for w in SERVER_AWAY):
                    raise
                pause = min(delay, remaining)
                reason = " ".join(str(exc).split())
                logger.warning(
                    "PostgreSQL unavailable (%s); connecting again in %.1fs", reason, pause
                )
                time.sleep(pause)
                delay = min(delay * 2, 5.0)


def make_engine(url: str, pool_size: int = 5, reconnect_wait: float = 0.0) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the workers and the CLI read while one of them writes.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # pre_ping: a connection dropped by a PostgreSQL restart is replaced, not handed to a task.
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    if reconnect_wait > 0 and engine.dialect.driver == "psycopg2":
        _wait_for_server(engine, reconnect_wait)
    return engine


@functools.cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(
        settings.database_url, settings.database_pool_size, settings.database_reconnect_wait
    )


@functools.cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def new_session() -> Session:
    return _session_factory()()


@contextmanager
def session_scope() -> Iterator[Session]:
    """Commit on success, roll back on error, always close."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engine() -> None:
    """Drop pooled connections (after fork: a child must not share its parent's sockets)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)


def upsert(
    session: Session,
    table: Any,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str],
) -> int:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET update, in batches. Returns rows written.

    Every row has the same keys; no two rows share a value of `keys`.
    """
    if not rows:
        return 0
    if len(rows) >= COPY_MIN_ROWS and can_copy(session):
        inserted, updated = copy_upsert(session, table, rows, keys, update, count=False)
        return inserted + updated
    dialect = session.get_bind().dialect.name
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise RuntimeError(f"upsert is not supported on {dialect}")
    written = 0
    for start in range(0, len(rows), UPSERT_BATCH):
        batch = rows[start : start + UPSERT_BATCH]
        stmt = insert(table).values(list(batch))
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: getattr(stmt.excluded, c) for c in update}
        )
        session.execute(stmt)
        written += len(batch)
    return written


def can_copy(session: Session) -> bool:
    """True on PostgreSQL through psycopg2 (copy_upsert works)."""
    dialect = session.get_bind().dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg2"


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value: Any) -> str:
    """One value in COPY's text format (NULL is \\N; floats keep every digit)."""
    if value is None:
        return "\\N"
    kind = type(value)
    if kind is float:
        return repr(value)  # 'inf', '-inf' and 'nan' are valid float8 input
    if kind is int:
        return str(value)
    if kind is bool:
        return "t" if value else "f"
    if kind is str:
        return value.translate(_COPY_ESCAPES)
    if isinstance(value, dt.date):  # and datetime: ISO 8601, with the offset when aware
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value).translate(_COPY_ESCAPES)
    return str(value).translate(_COPY_ESCAPES)


def _json_field(value: Any) -> str:
    return "\\N" if value is None else json.dumps(value).translate(_COPY_ESCAPES)


def _copy_column(values: list[Any], is_json: bool) -> Iterable[str]:
    """A column in COPY's text format, encoded by the column's value type."""
    if is_json:
        return map(_json_field, values)
    kinds = set(map(type, values))
    if kinds == {float}:
        return map(float.__repr__, values)
    if len(kinds - {type(None)}) == 1 and not kinds & {float, dict, list}:
        # Few distinct values (ids, days, a timestamp, a source): each encoded once.
        encoded = {v: _copy_field(v) for v in set(values)}
        return map(encoded.__getitem__, values)
    return map(_copy_field, values)


def _copy_text(rows: Sequence[dict[str, Any]], columns: list[str], json_columns: set[str]) -> str:
    """Rows as COPY text, built column by column (5-10x quicker than row by row)."""
    encoded = [_copy_column([r[c] for r in rows], c in json_columns) for c in columns]
    return "\n".join(map("\t".join, zip(*encoded, strict=True))) + "\n"


def copy_upsert(
    session: Session,
    table: Any,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str],
    *,
    count: bool = True,
    only_if_changed: Sequence[str] = (),
) -> tuple[int, int]:
    """PostgreSQL (psycopg2): COPY `rows` into a temporary table, then merge them with one
    INSERT ... SELECT ... ON CONFLICT (keys) DO UPDATE SET update, in the session's transaction.

    Returns (inserted, updated); with count=False everything is reported as inserted (one
    query less). Every row has the same keys; no two rows share a value of `keys`.
    With `only_if_changed`, an existing row is rewritten only when one of those columns
    differs (IS DISTINCT FROM); it still counts as updated.
    """
    if not rows:
        return 0, 0
    if not can_copy(session):
        raise RuntimeError("copy_upsert needs PostgreSQL through psycopg2")
    preparer = session.get_bind().dialect.identifier_preparer
    columns = list(rows[0])
    q = {c: preparer.quote(c) for c in columns}
    target = preparer.format_table(table)
    temp = preparer.quote(f"_upsert_{table.name}")
    col_list = ", ".join(q[c] for c in columns)
    json_columns = {c for c in columns if c in table.c and isinstance(table.c[c].type, JSON)}
    cursor = session.connection().connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(
            f"CREATE TEMPORARY TABLE {temp} ON COMMIT DROP AS "
            f"SELECT {col_list} FROM {target} WITH NO DATA"
        )
        for start in range(0, len(rows), COPY_CHUNK):
            text = _copy_text(rows[start : start + COPY_CHUNK], columns, json_columns)
            cursor.copy_expert(f"COPY {temp} ({col_list}) FROM STDIN", io.StringIO(text), 1 << 20)
        existing = 0
        if count:
            on = " AND ".join(f"t.{q[k]} = s.{q[k]}" for k in keys)
            cursor.execute(f"SELECT count(*) FROM {temp} s JOIN {target} t ON {on}")
            existing = int(cursor.fetchone()[0])  # type: ignore[index]
        action = (
            "DO UPDATE SET " + ", ".join(f"{q[c]} = EXCLUDED.{q[c]}" for c in update)
            if update
            else "DO NOTHING"
        )
        if update and only_if_changed:
            mine = ", ".join(f"{target}.{q[c]}" for c in only_if_changed)
            theirs = ", ".join(f"EXCLUDED.{q[c]}" for c in only_if_changed)
            action += f" WHERE ({mine}) IS DISTINCT FROM ({theirs})"
        cursor.execute(
            f"INSERT INTO {target} ({col_list}) SELECT {col_list} FROM {temp} "
            f"ON CONFLICT ({', '.join(q[k] for k in keys)}) {action}"
        )
        cursor.execute(f"DROP TABLE {temp}")
    finally:
        cursor.close()
    return len(rows) - existing, existing
