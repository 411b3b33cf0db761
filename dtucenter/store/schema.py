"""The schema's version: Alembic migrations bring any database made by an older release to this one's.

Every schema change ships a revision under ``migrations/versions``. The
center upgrades at start (``upgrade``), ``dtucenter db`` does it offline, and
a database made by the last release before migrations (no ``alembic_version``
table) is recognised by its tables and stamped as the baseline first. A
database at a revision this code does not know was made by a newer release:
it is refused and left as it is.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import attrs
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from twisted.logger import Logger

log = Logger()

MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision equal to the schema of the last release before migrations.
BASELINE = "0001"
VERSION_TABLE = "alembic_version"
#: ``pg_advisory_lock`` key held while upgrading, so two centers starting together do not race.
UPGRADE_LOCK = int.from_bytes(b"dtucentr", "big")

#: The view of DTU samples as one row per value (migration 0008_retention, docs/integrations.md).
VALUES_VIEW = "dtu_values"
#: PostgreSQL's partitions of the sample tables (store/retention.py): tables the models do not describe.
PARTITION_NAME = re.compile(r"^(samples|meter_samples)_p(\d{8}|_before\d{8}|_default)$")

Kind = Literal["empty", "unversioned", "current", "behind", "unknown"]


class SchemaError(Exception):
    """The schema cannot be used or upgraded; the message says why and what to do, in one line."""


@attrs.frozen
class SchemaState:
    kind: Kind
    #: What ``alembic_version`` holds; empty when there is no such table.
    revisions: tuple[str, ...]
    head: str
    #: For ``unversioned``: how the tables differ from the baseline, or None when they match it.
    mismatch: str | None = None

    @property
    def revision(self) -> str | None:
        """The revision the database is at (the baseline for a matching unversioned one), None when empty."""
        if self.kind == "unversioned":
            return BASELINE if self.mismatch is None else None
        return ",".join(self.revisions) or None

    def describe(self) -> str:
        if self.kind == "empty":
            return "empty: no tables yet"
        if self.kind == "unversioned":
            made = "not under migration control: made by a release before migrations"
            if self.mismatch is not None:
                return f"{made}, but its tables do not match that release's ({self.mismatch})"
            return f"{made} (its tables match revision {BASELINE})"
        revision = ",".join(self.revisions)
        if self.kind == "current":
            return f"{revision} (head)"
        if self.kind == "behind":
            return f"{revision} (head is {self.head})"
        return f"{revision}: unknown to this release (head {self.head}); made by a newer release?"


@attrs.frozen
class UpgradeResult:
    before: SchemaState
    after: str
    #: The copy of the SQLite file taken before anything was changed.
    copy: Path | None

    @property
    def changed(self) -> bool:
        return self.before.kind != "current"

    def describe(self) -> str:
        if not self.changed:
            return f"already at {self.after} (head); nothing to do"
        if self.before.kind == "empty":
            return f"created the schema at {self.after}"
        start = "the pre-migrations schema" if self.before.kind == "unversioned" else self.before.revision
        copy = f"; copy of the old database: {self.copy}" if self.copy else ""
        return f"upgraded from {start} to {self.after}{copy}"


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    revision = scripts().get_current_head()
    assert revision is not None, "no migrations"
    return revision


def include_name(name: str | None, type_: str, _parent_names: object) -> bool:
    """For Alembic's comparisons of the models with a database: everything but the partitions."""
    return not (type_ == "table" and name is not None and PARTITION_NAME.match(name))


def history() -> list[tuple[str, str]]:
    """(revision, what it does), oldest first."""
    return [(s.revision, (s.doc or "").strip()) for s in reversed(list(scripts().walk_revisions()))]


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def read_state(connection: Connection) -> SchemaState:
    revisions = tuple(MigrationContext.configure(connection).get_current_heads())
    current_head = head()
    if not revisions:
        baseline = _baseline_tables()
        present = set(inspect(connection).get_table_names()) & set(baseline)
        if not present:
            return SchemaState("empty", (), current_head)
        mismatch = _differences(_describe_tables(connection, present), baseline)
        return SchemaState("unversioned", (), current_head, mismatch)
    for revision in revisions:
        try:
            known = scripts().get_revision(revision) is not None
        except CommandError:
            known = False
        if not known:
            return SchemaState("unknown", revisions, current_head)
    return SchemaState("current" if revisions == (current_head,) else "behind", revisions, current_head)


def current(engine: Engine) -> SchemaState:
    with engine.connect() as connection:
        return read_state(connection)


def require_head(engine: Engine) -> SchemaState:
    """Nothing to do for a database at head; SchemaError for any other (an empty one is not created)."""
    state = current(engine)
    if state.kind != "current":
        raise SchemaError(_refusal(state) or f"the database schema is {state.describe()}: "
                          f"run 'dtucenter db upgrade' (or start the center without --no-upgrade)")
    return state


def upgrade(engine: Engine, *, now: dt.datetime | None = None) -> UpgradeResult:
    """Bring the schema to head: create it in an empty database, stamp a pre-migrations one as the
    baseline, run the missing revisions. An SQLite file is copied aside first when it has tables.
    SchemaError, with nothing touched, for a database made by a newer release or one not recognised."""
    with _upgrade_lock(engine) as connection:
        before = read_state(connection)
        refusal = _refusal(before)
        if refusal is not None:
            raise SchemaError(refusal)
        if before.kind == "current":
            return UpgradeResult(before, before.head, None)
        copy = None
        if before.kind != "empty" and engine.dialect.name == "sqlite":
            copy = copy_sqlite(engine, before.revision or "unknown", now or dt.datetime.now(dt.UTC))
            log.info("Copied the database to {copy} before upgrading its schema", copy=str(copy))
        # End the transaction the inspection began, so that Alembic commits its own.
        connection.commit()
        config = _config(connection)
        if before.kind == "unversioned":
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
        after = read_state(connection)
        connection.commit()
    result = UpgradeResult(before, ",".join(after.revisions), copy)
    log.info("Database schema: {what}", what=result.describe(), before=before.revision, after=result.after)
    return result


def _refusal(state: SchemaState) -> str | None:
    if state.kind == "unknown":
        return (f"the database is at schema revision {','.join(state.revisions)}, which this release "
                f"does not know (its newest is {state.head}): it was made by a newer release; "
                f"run that release, or restore the copy taken before it upgraded the database")
    if state.kind == "unversioned" and state.mismatch is not None:
        return (f"the database has tables of dtucenter but not those of the last release before "
                f"migrations ({state.mismatch}): start that release on it once, or give an empty database")
    return None


@contextmanager
def _upgrade_lock(engine: Engine) -> Iterator[Connection]:
    """A connection that holds, on PostgreSQL, the advisory lock taken by every upgrading center."""
    with engine.connect() as connection:
        if engine.dialect.name != "postgresql":
            yield connection
            return
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": UPGRADE_LOCK})
        connection.commit()
        try:
            yield connection
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": UPGRADE_LOCK})
            connection.commit()


def copy_sqlite(engine: Engine, revision: str, now: dt.datetime) -> Path:
    """``DB.before-REVISION-TIME`` beside the file, through SQLite's backup API (consistent under WAL)."""
    database = Path(engine.url.database or "").absolute()
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    copy = database.with_name(f"{database.name}.before-{revision}-{stamp}")
    suffix = 1
    while copy.exists():
        suffix += 1
        copy = database.with_name(f"{database.name}.before-{revision}-{stamp}-{suffix}")
    source = sqlite3.connect(database)
    try:
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    return copy


# -- recognising the last release before migrations ----------------------------------------------

#: Per table: its columns, primary key columns and indexes (name and columns), which tell releases apart.
TableShape = tuple[frozenset[str], tuple[str, ...], frozenset[tuple[str, tuple[str, ...]]]]


@functools.cache
def _baseline_tables() -> dict[str, TableShape]:
    """The tables the baseline revision makes, found by running it on a scratch in-memory database."""
    engine = create_engine("sqlite://")
    try:
        with engine.connect() as connection:
            command.upgrade(_config(connection), BASELINE)
            connection.commit()
            names = set(inspect(connection).get_table_names()) - {VERSION_TABLE}
            return _describe_tables(connection, names)
    finally:
        engine.dispose()


def _describe_tables(connection: Connection, names: set[str]) -> dict[str, TableShape]:
    inspector = inspect(connection)
    shapes = {}
    for name in sorted(names):
        columns = frozenset(c["name"] for c in inspector.get_columns(name))
        key = tuple(inspector.get_pk_constraint(name)["constrained_columns"])
        indexes = frozenset(
            (index["name"] or "", tuple(c or "" for c in index["column_names"]))
            for index in inspector.get_indexes(name)
        )
        shapes[name] = (columns, key, indexes)
    return shapes


def _differences(found: dict[str, TableShape], expected: dict[str, TableShape]) -> str | None:
    problems = [f"no table {name}" for name in sorted(set(expected) - set(found))]
    for name in sorted(set(expected) & set(found)):
        (columns, key, indexes), (want_columns, want_key, want_indexes) = found[name], expected[name]
        if columns != want_columns:
            missing, extra = sorted(want_columns - columns), sorted(columns - want_columns)
            problems.append(f"{name} lacks columns {missing} and has others {extra}")
        elif key != want_key:
            problems.append(f"{name} has primary key {list(key)}, not {list(want_key)}")
        elif indexes != want_indexes:
            problems.append(f"{name} has other indexes")
    return "; ".join(problems) or None
