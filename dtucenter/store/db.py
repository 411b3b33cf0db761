"""Engine creation: any SQLAlchemy URL; SQLite gets WAL and sane pragmas; the schema by its migrations."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from dtucenter.store import schema


class DatabaseURLError(ValueError):
    """The URL cannot be used: the message says why, for the operator."""


def open_engine(
    url: str, *, create: bool = True, upgrade: bool = False, sqlite_busy_timeout: float = 30.0,
    connect_timeout: int = 10,
) -> Engine:
    """An engine for ``url`` whose schema is this release's.

    ``create``: an empty database gets the schema (by the migrations); any
    other must be at the migrations' head, else ``schema.SchemaError``.
    ``upgrade``: an older schema is brought to head, as the center does at
    start (``schema.upgrade``: an SQLite file is copied aside first).
    Neither: the schema is not looked at.
    ``sqlite_busy_timeout``: seconds SQLite waits for another writer's lock
    before the write fails (and the store retries it).
    ``connect_timeout``: whole seconds PostgreSQL's client waits to connect (unless the URL's
    query sets ``connect_timeout``): libpq would otherwise wait as long as the kernel does for a
    server that drops packets, minutes in which the store's threads hang instead of retrying.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseURLError(f"not a database URL: {url!r} (example: sqlite:///dtucenter.db)") from None
    kwargs: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        database = parsed.database or ""
        if database in ("", ":memory:"):
            # Each pooled connection would see its own empty database.
            raise DatabaseURLError("an in-memory SQLite database cannot be shared; give a file path")
        directory = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(directory):
            raise DatabaseURLError(f"directory {directory} for the SQLite database does not exist")
        kwargs["connect_args"] = {"timeout": sqlite_busy_timeout, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": connect_timeout}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as e:
        raise DatabaseURLError(f"no driver for {parsed.drivername!r}: {e}") from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        if upgrade or (create and schema.current(engine).kind == "empty"):
            schema.upgrade(engine)
        elif create:
            schema.require_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets API reads run beside the ingest writer; FULL makes every
    # acknowledged commit survive a power cut, which group commit makes affordable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
