"""Schema migrations: the previous release's database upgrades intact, models and revisions agree, start and CLI."""

from __future__ import annotations

import datetime as dt
import io
import secrets
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, Table, create_engine, inspect, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from twisted.logger import formatEvent, globalLogPublisher

from dtucenter import cli
from dtucenter.store import accounts, audit, meters, queries, schema
from dtucenter.store.db import open_engine
from dtucenter.store.migrations import __main__ as migrations_command
from dtucenter.store.models import Base, UTCDateTime
from dtucenter.tap import Options, makeService
from dtucenter.web.auth import TOKEN_FILE_NAME
from tests.support import run_twistd, start_center

FIXTURES = Path(__file__).with_name("fixtures")
#: The tables of the last release before migrations, each of which the fixtures fill.
PREVIOUS_RELEASE_TABLES = {
    "commands", "dtus", "meter_failures", "meter_samples", "meter_writes", "meters", "registers", "samples",
}
T0 = dt.datetime(2026, 11, 20, 8, 30, 15, 123456, tzinfo=dt.UTC)


def backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


def load_previous_release(url: str) -> None:
    """The fixture's SQL, run as it is, into the (empty) database at ``url``."""
    sql = (FIXTURES / f"previous_release.{backend(url)}.sql").read_text()
    if backend(url) == "sqlite":
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        connection.executescript(sql)
        connection.close()
        return
    # The dump empties search_path for its session: a connection of its own, closed after.
    engine = create_engine(url, poolclass=NullPool)
    raw = engine.raw_connection()
    try:
        raw.cursor().execute(sql)
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def all_rows(engine: Engine, only: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but Alembic's, by plain SQL in primary key order, as the driver returns them.

    With ``only``, just those tables' columns named there: what an older schema had, in its order.
    """
    with engine.connect() as connection:
        inspector = inspect(connection)
        rows = {}
        for table in sorted(set(inspector.get_table_names()) - {schema.VERSION_TABLE}):
            key = ", ".join(f'"{c}"' for c in inspector.get_pk_constraint(table)["constrained_columns"])
            columns = "*" if only is None else ", ".join(f'"{c}"' for c in only.get(table, ()))
            if columns:
                query = text(f'SELECT {columns} FROM "{table}" ORDER BY {key}')
                rows[table] = [tuple(r) for r in connection.execute(query)]
        return rows


def column_names(engine: Engine) -> dict[str, tuple[str, ...]]:
    with engine.connect() as connection:
        inspector = inspect(connection)
        return {table: tuple(c["name"] for c in inspector.get_columns(table)) for table in inspector.get_table_names()}


def describe(engine: Engine) -> dict[str, Any]:
    """Tables, columns (type, nullability, default), keys and indexes, as the database reports them."""
    with engine.connect() as connection:
        inspector = inspect(connection)
        return {
            table: (
                [(c["name"], repr(c["type"]), c["nullable"], c.get("default")) for c in inspector.get_columns(table)],
                inspector.get_pk_constraint(table),
                sorted(inspector.get_indexes(table), key=lambda index: index["name"] or ""),
                inspector.get_foreign_keys(table),
                inspector.get_unique_constraints(table),
            )
            for table in sorted(set(inspector.get_table_names()) - {schema.VERSION_TABLE})
        }


def wipe(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP VIEW IF EXISTS {schema.VALUES_VIEW}")
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {schema.VERSION_TABLE}")


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


# -- the previous release's database ---------------------------------------------------------------


def test_previous_release_database_upgrades_with_every_row_intact(db_url: str) -> None:
    load_previous_release(db_url)
    engine = open_engine(db_url, create=False)
    try:
        before = all_rows(engine)
        previous_columns = column_names(engine)
        assert set(before) == PREVIOUS_RELEASE_TABLES
        assert all(before[table] for table in before), "the fixture must have rows in every table"
        state = schema.current(engine)
        assert state.kind == "unversioned" and state.mismatch is None, state

        result = schema.upgrade(engine)

        assert result.before.kind == "unversioned" and result.after == schema.head()
        assert schema.current(engine).kind == "current"
        after = all_rows(engine, previous_columns)
        assert {table: after[table] for table in before} == before
        assert (result.copy is not None) == (backend(db_url) == "sqlite")
        with Session(engine) as session:
            check_previous_release_rows_through_todays_code(session)
    finally:
        engine.dispose()


def check_previous_release_rows_through_todays_code(session: Session) -> None:
    """The values the fixture script wrote, read back by this release's own queries."""
    dtus = {d.psn: d for d in queries.list_dtus(session)}
    assert set(dtus) == {3, 10001, 0xFFFFFFF0}
    # The accounts migration gave every device to the first account, an admin.
    assert {d.account for d in dtus.values()} == {accounts.FIRST_ADMIN}
    assert {m.account for m in meters.list_meters(session)} == {accounts.FIRST_ADMIN}
    assert [(a.name, a.admin, a.dtus, a.meters) for a in accounts.list_accounts(session)] == [
        (accounts.FIRST_ADMIN, True, 3, 2)]
    assert dtus[10001].name == "pump house" and dtus[10001].last_login == T0 and dtus[10001].tick_time == 30
    assert dtus[0xFFFFFFF0].name == "Zählerschrank Süd"
    samples = queries.query_samples(session, 10001)
    assert [(s.time, s.addr, s.value) for s in samples] == [
        (T0, 100, 3), (T0, 0xFFFF, -4), (T0 + dt.timedelta(minutes=1), 100, -32768),
        (T0 + dt.timedelta(minutes=1), 0xFFFF, 32767),
    ]
    assert [c.outcome for c in audit.list_commands(session, 3, 10)] == ["timeout"]
    meter = meters.get_meter(session, "main meter")
    assert meter is not None and meter.last_poll == T0
    values = [s.value for s in meters.query_meter_samples(session, meter, "power")]
    assert values == [1234.5, None]
    assert [f.count for f in meters.list_failures(session, "old meter", 10)] == [1, 13]
    assert [w.outcome for w in meters.list_writes(session, "old meter", 10)] == ["offline"]


def test_baseline_is_exactly_the_previous_release_schema(db_url: str) -> None:
    """What lets a previous-release database be stamped as the baseline instead of migrated."""
    load_previous_release(db_url)
    engine = open_engine(db_url, create=False)
    try:
        previous = describe(engine)
        wipe(engine)
        with engine.connect() as connection:
            command.upgrade(schema._config(connection), schema.BASELINE)
            connection.commit()
        assert describe(engine) == previous
    finally:
        engine.dispose()


# -- models and migrations agree -------------------------------------------------------------------


def test_migrations_make_what_the_models_describe(db_url: str) -> None:
    engine = open_engine(db_url)  # an empty database: created by the migrations
    try:
        assert schema.current(engine).kind == "current"
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "include_name": schema.include_name})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


# -- what the upgrade refuses --------------------------------------------------------------------


def test_a_revision_from_a_newer_release_is_refused_untouched(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        before = describe(engine), all_rows(engine)
        with pytest.raises(schema.SchemaError, match="revision 9999, which this release does not know"):
            schema.upgrade(engine)
        with pytest.raises(schema.SchemaError, match="9999"):
            open_engine(db_url).dispose()
        assert (describe(engine), all_rows(engine)) == before
        assert schema.current(engine).kind == "unknown"
    finally:
        engine.dispose()
    if backend(db_url) == "sqlite":
        assert not list(Path(db_url.removeprefix("sqlite:///")).parent.glob("*.before-*"))


def test_tables_of_an_older_release_than_the_previous_one_are_refused(tmp_path: Path) -> None:
    """The samples table had one row per value before: such a database is not stamped as the baseline."""
    url = f"sqlite:///{tmp_path / 'older.db'}"
    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE samples")
            connection.exec_driver_sql(
                "CREATE TABLE samples (id INTEGER PRIMARY KEY, psn BIGINT, time DATETIME, net_state SMALLINT, "
                "position INTEGER, value INTEGER)"
            )
        with pytest.raises(schema.SchemaError, match=r"samples lacks columns \['registers', 'values'\]"):
            schema.upgrade(engine)
        assert not inspect(engine).has_table(schema.VERSION_TABLE)
        assert not list(tmp_path.glob("*.before-*"))
    finally:
        engine.dispose()


def test_concurrent_upgrades_on_postgresql_wait_for_each_other(db_url: str) -> None:
    if backend(db_url) != "postgresql":
        pytest.skip("the advisory lock is PostgreSQL's")
    engine = open_engine(db_url, create=False)
    holder = engine.connect()
    try:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": schema.UPGRADE_LOCK})
        holder.commit()
        results: list[schema.UpgradeResult] = []
        upgrading = threading.Thread(target=lambda: results.append(schema.upgrade(engine)))
        upgrading.start()
        waiting = text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        for _ in range(1000):
            if holder.execute(waiting).scalar_one() == 1:
                break
            threading.Event().wait(0.01)
        else:
            raise AssertionError("the upgrade never waited for the lock")
        holder.rollback()
        assert schema.current(engine).kind == "empty", "nothing done while another holds the lock"
        holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": schema.UPGRADE_LOCK})
        holder.commit()
        upgrading.join(timeout=60)
        assert [r.describe() for r in results] == [f"created the schema at {schema.head()}"]
    finally:
        holder.close()
        engine.dispose()


# -- the center's start ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_center_upgrades_a_previous_release_database_and_keeps_a_copy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'center.db'}"
    load_previous_release(url)
    rows = all_rows(engine := create_engine(url))
    engine.dispose()
    # The token file that release made beside its database: it must still open the API, as an admin's.
    old_token = secrets.token_urlsafe(32)
    (tmp_path / TOKEN_FILE_NAME).write_text(old_token + "\n")
    (tmp_path / TOKEN_FILE_NAME).chmod(0o600)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        center = await start_center(tmp_path)
        try:
            api = center.api(old_token)
            listed = await api.get("/api/dtus")
            assert listed.status == 200
            assert [(d["psn"], d["account"]) for d in listed.body["dtus"]] == [
                (3, "admin"), (10001, "admin"), (0xFFFFFFF0, "admin")]
            samples = await api.get("/api/dtus/10001/samples")
            assert samples.status == 200 and len(samples.body["samples"]) == 4
            whoami = await api.get("/api/accounts")
            assert [(a["name"], a["admin"]) for a in whoami.body["accounts"]] == [("admin", True)]
            made = await api.post("/api/accounts", {"name": "acme"})
            assert made.status == 201, made.body
        finally:
            await center.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [copy] = tmp_path.glob("center.db.before-0001-*")
    logged = [formatEvent(e) for e in events if e.get("log_namespace") == "dtucenter.store.schema"]
    assert logged == [
        f"Copied the database to {copy} before upgrading its schema",
        (f"Database schema: upgraded from the pre-migrations schema to {schema.head()}; "
         f"copy of the old database: {copy}"),
    ]
    copied = create_engine(f"sqlite:///{copy}")
    try:
        assert schema.current(copied).kind == "unversioned" and all_rows(copied) == rows
    finally:
        copied.dispose()
    upgraded = open_engine(url)
    try:
        assert schema.current(upgraded).kind == "current"
        # At start the center marks every DTU offline and the meters not in its config unconfigured.
        after = all_rows(upgraded)
        kept = PREVIOUS_RELEASE_TABLES - {"dtus", "meters"}
        assert {t: after[t] for t in kept} == {t: rows[t] for t in kept}
        assert [len(after[t]) for t in ("dtus", "meters")] == [len(rows[t]) for t in ("dtus", "meters")]
    finally:
        upgraded.dispose()


def test_center_with_no_upgrade_refuses_an_old_database_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'center.db'}"
    load_previous_release(url)
    result = run_twistd(tmp_path, "--db", url, "--dtu", "tcp:0:interface=127.0.0.1", "--api", "off", "--no-upgrade")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1 and "Traceback" not in output, output
    assert output.startswith("dtucenter: --db: the database schema is not under migration control"), output
    assert "run 'dtucenter db upgrade'" in output
    assert not list(tmp_path.glob("*.before-*"))
    engine = create_engine(url)
    assert schema.current(engine).kind == "unversioned"
    engine.dispose()


def test_center_refuses_a_database_of_a_newer_release(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'center.db'}"
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    options = Options()
    options.parseOptions(["--db", url, "--dtu", "tcp:0:interface=127.0.0.1", "--api", "off"])
    with pytest.raises(SystemExit, match="dtucenter: --db: the database is at schema revision f00d"):
        makeService(options, object())


# -- dtucenter db ----------------------------------------------------------------------------------


def test_db_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    head = schema.head()
    assert run_cli("db", "current", "--db", url) == (0, "empty: no tables yet\n")
    load_previous_release(url)
    code, text_ = run_cli("db", "current", "--db", url)
    assert code == 0 and text_.startswith("not under migration control: made by a release before migrations")
    code, text_ = run_cli("db", "history", "--db", url)
    assert code == 0 and text_.splitlines()[0].startswith("0001  baseline: ")
    assert text_.splitlines()[-1].endswith("(head)")

    code, text_ = run_cli("db", "upgrade", "--db", url)
    [copy] = tmp_path.glob("c.db.before-0001-*")
    assert code == 0
    assert text_ == f"upgraded from the pre-migrations schema to {head}; copy of the old database: {copy}\n"
    assert run_cli("db", "current", "--db", url) == (0, f"{head} (head)\n")
    assert run_cli("db", "upgrade", "--db", url) == (0, f"already at {head} (head); nothing to do\n")
    assert run_cli("db", "history", "--db", url)[1].splitlines()[-1].endswith("(head, current)")


def test_db_upgrade_creates_an_empty_database(db_url: str) -> None:
    assert run_cli("db", "upgrade", "--db", db_url) == (0, f"created the schema at {schema.head()}\n")


def test_other_commands_refuse_an_old_schema_and_the_db_commands_a_newer_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    load_previous_release(url)
    assert run_cli("dtu", "list", "--db", url)[0] == 1
    error = capsys.readouterr().err
    assert error.startswith("dtucenter: --db: the database schema is not under migration control")
    assert error.count("\n") == 1 and "dtucenter db upgrade" in error
    assert run_cli("db", "upgrade", "--db", url)[0] == 0
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    capsys.readouterr()
    assert run_cli("db", "upgrade", "--db", url)[0] == 1
    error = capsys.readouterr().err
    assert error.startswith("dtucenter: the database is at schema revision f00d") and error.count("\n") == 1
    unknown = f"f00d: unknown to this release (head {schema.head()}); made by a newer release?\n"
    assert run_cli("db", "current", "--db", url) == (0, unknown)


# -- a second revision, as the next schema change will add one ----------------------------------------


@pytest.fixture
def scratch_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A copy of the migrations to add revisions to, used in place of the package's."""
    copy = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(schema, "MIGRATIONS", copy)
    schema.scripts.cache_clear()
    yield copy
    schema.scripts.cache_clear()


def test_revision_command_writes_the_next_revision_which_upgrades_an_older_database(
    tmp_path: Path, scratch_migrations: Path
) -> None:
    previous = schema.head()
    following = f"{int(previous.partition('_')[0]) + 1:04d}"
    probe = Table("probe", Base.metadata, Column("id", Integer, primary_key=True), Column("at", UTCDateTime))
    try:
        migrations_command.main(["add the probe table"])
    finally:
        Base.metadata.remove(probe)
    schema.scripts.cache_clear()  # the process that wrote a revision ends; this one goes on
    written = (scratch_migrations / "versions" / f"{following}_add_the_probe_table.py").read_text()
    assert "op.create_table('probe'" in written and "sa.DateTime(timezone=True)" in written
    assert "dtucenter" not in written, "a revision must not import the models"
    assert schema.head() == following and [r for r, _ in schema.history()][-2:] == [previous, following]

    url = f"sqlite:///{tmp_path / 'at-previous.db'}"
    engine = open_engine(url, create=False)
    try:
        with engine.connect() as connection:
            command.upgrade(schema._config(connection), previous)
            connection.commit()
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO commands (psn, kind, request, who, queued, outcome) "
                                    "VALUES (5, 'read_test', '{}', 'someone', '2026-11-30 00:00:00', 'ok')"))
        rows = all_rows(engine)
        expected = rf"schema is {previous} \(head is {following}\): run 'dtucenter db upgrade'"
        with pytest.raises(schema.SchemaError, match=expected):
            open_engine(url).dispose()

        result = schema.upgrade(engine)

        [copy] = tmp_path.glob(f"at-previous.db.before-{previous}-*")
        assert result.describe() == f"upgraded from {previous} to {following}; copy of the old database: {copy}"
        assert inspect(engine).has_table("probe") and schema.current(engine).kind == "current"
        after = all_rows(engine)
        assert after.pop("probe") == [] and after == rows
    finally:
        engine.dispose()
