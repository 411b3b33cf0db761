"""Samples into PostgreSQL with COPY (psycopg 3), against the INSERTs (psycopg2) on the same database.

The store picks the bulk path by the URL's driver: ``postgresql+psycopg://`` COPYs,
``postgresql+psycopg2://`` inserts multi-row VALUES. Both must store the same rows, fail a batch
whole, and tell a database that went away (retried) from rows it refused (failed).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session
from twisted.internet import reactor

from dtucenter.dtu import wire
from dtucenter.dtu.center import upload_row
from dtucenter.store import meters, queries
from dtucenter.store.db import open_engine
from dtucenter.store.facade import METER_SAMPLES, SAMPLES, Store, _MultiRowInsert, is_transient
from dtucenter.store.models import MeterSample, Sample
from tests.support import connect_dtu, start_center, until

NOW = dt.datetime(2026, 11, 30, 11, 59, 59, 999_999, tzinfo=dt.UTC)
LOCAL = dt.timezone(dt.timedelta(hours=8))


def upload_rows(psn: int) -> list[queries.SampleRow]:
    """Uploads with every shape a row has: registers or none, extreme values, no values, another zone."""
    registers = (wire.Register(1, 5), wire.Register(255, 65535))
    return [
        upload_row(psn, NOW, wire.SendTest(20, 1, (1, -2)), registers),
        upload_row(psn, NOW, wire.SendTest(21, 2, (3, 4, 5)), registers),  # the list does not match
        upload_row(psn, NOW + dt.timedelta(seconds=1), wire.SendTest(0, 3, ()), ()),
        upload_row(psn, NOW.astimezone(LOCAL) + dt.timedelta(seconds=2), wire.SendTest(255, 4, (-32768, 32767)), ()),
    ]


def meter_rows(meter: str) -> list[Any]:
    return [(meter, "energy", NOW, 1.5), (meter, "energy", NOW + dt.timedelta(seconds=1), None),
            (meter, "power", NOW.astimezone(LOCAL), -1e300)]


def stored(engine: Engine, psn: int, meter: str) -> tuple[list[Any], list[Any]]:
    with Session(engine) as session:
        samples = session.execute(
            select(Sample.time, Sample.net_state, Sample.values, Sample.registers)
            .where(Sample.psn == psn).order_by(Sample.id)).all()
        meter_samples = session.execute(
            select(MeterSample.point, MeterSample.time, MeterSample.value)
            .where(MeterSample.meter == meter).order_by(MeterSample.id)).all()
    return [tuple(row) for row in samples], [tuple(row) for row in meter_samples]


def insert_both(engine: Engine, psn: int, meter: str) -> None:
    with Session(engine) as session, session.begin():
        _MultiRowInsert(engine, SAMPLES, queries.SAMPLE_ROW_COLUMNS)(session, upload_rows(psn))
        _MultiRowInsert(engine, METER_SAMPLES, meters.METER_SAMPLE_COLUMNS)(session, meter_rows(meter))


def test_the_driver_chooses_copy_or_insert(postgres_urls: tuple[str, str]) -> None:
    copy_url, insert_url = postgres_urls
    for url, copies in ((copy_url, True), (insert_url, False)):
        engine = open_engine(url)
        assert _MultiRowInsert(engine, SAMPLES, queries.SAMPLE_ROW_COLUMNS).copy is copies
        engine.dispose()


def test_copy_stores_the_rows_the_inserts_store(postgres_urls: tuple[str, str]) -> None:
    copy_url, insert_url = postgres_urls
    copying, inserting = open_engine(copy_url), open_engine(insert_url)
    try:
        insert_both(copying, 1, "copied")
        insert_both(inserting, 2, "inserted")
        by_copy, by_insert = stored(copying, 1, "copied"), stored(copying, 2, "inserted")
        assert by_copy == by_insert
        assert len(by_copy[0]) == 4 and len(by_copy[1]) == 3
        assert by_copy[0][3][0] == NOW + dt.timedelta(seconds=2)  # stored as the same instant, read back in UTC
        with Session(copying) as session:
            values = [s.value for s in queries.query_samples(session, 1)]
        assert values == [1, -2, 3, 4, 5, -32768, 32767]
    finally:
        copying.dispose()
        inserting.dispose()


def count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Sample)) or 0


@pytest.mark.expected_errors("will not be retried", error=DataError)
@pytest_twisted.ensureDeferred
async def test_a_failed_copy_fails_its_batch_and_stores_none_of_it(postgres_urls: tuple[str, str]) -> None:
    store = Store(open_engine(postgres_urls[0]), reactor)
    store.startService()
    try:
        good = upload_rows(3)
        bad = (3, NOW, 70_000, b"", None)  # net_state is a SMALLINT: PostgreSQL refuses the row
        with pytest.raises(DataError):
            await store.add_samples([*good, bad])
        assert count(store.engine) == 0, "the good rows of a failed batch were committed"
        assert store.healthy, "a refused row is the work's failure, not the database's"
        await store.add_samples(good)  # the store goes on
        assert count(store.engine) == len(good)
    finally:
        await store.stopService()


def terminate_backend(engine: Engine, pid: int) -> None:
    """End a server process as an administrator (or a failing server) would, and wait until it is gone."""
    libpq_url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(1000):
            if admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,):
                return
            admin.execute("SELECT pg_sleep(0.01)")
    raise AssertionError(f"backend {pid} still there")


@pytest.mark.expected_errors("Database write of 0 jobs and 4 rows failed", error=OperationalError)
@pytest_twisted.ensureDeferred
async def test_a_copy_whose_connection_dies_is_retried_and_stored_once(postgres_urls: tuple[str, str]) -> None:
    store = Store(open_engine(postgres_urls[0]), reactor)
    killed: list[int] = []

    def kill_once(connection: Any) -> None:
        """Between the transaction's start and its COPY, the server ends the connection."""
        if not killed:
            pid = connection.connection.dbapi_connection.info.backend_pid
            killed.append(pid)
            terminate_backend(store.engine, pid)

    event.listen(store.engine, "begin", kill_once)
    store.startService()
    try:
        await store.add_samples(upload_rows(4))
        assert killed, "the connection was not killed: the test tested nothing"
        assert store.stats.failures >= 1
        assert count(store.engine) == 4
    finally:
        await store.stopService()


def test_a_lost_connection_during_copy_is_the_databases_failure() -> None:
    """What decides between retrying and failing a batch, for the driver's own errors."""
    assert is_transient(OperationalError("COPY", None, psycopg.OperationalError("server closed the connection")))
    assert not is_transient(DataError("COPY", None, psycopg.DataError("out of range")))


@pytest_twisted.ensureDeferred
async def test_a_center_on_psycopg_acknowledges_after_the_copy_and_stores_a_retransmission_once(
    tmp_path: Path, postgres_urls: tuple[str, str],
) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept", db_url=postgres_urls[0])
    try:
        assert center.store._fast_inserts[SAMPLES].copy
        dtu = await connect_dtu(center)
        assert (await dtu.login(1001)).accepted
        upload = wire.SendTest(net_state=25, test_code=9, values=(100, -200, 300))
        dtu.send(upload)
        assert (await dtu.next(wire.SendTestAck)).test_code == 9
        # Acknowledged means committed: another connection sees the rows now.
        assert count(center.store.engine) == 1
        dtu.send(upload)  # the DTU missed the ack and sends again
        assert (await dtu.next(wire.SendTestAck)).test_code == 9
        await center.store.when_idle()
        with Session(center.store.engine) as session:
            assert [s.value for s in queries.query_samples(session, 1001)] == [100, -200, 300]
        dtu.close()
        await until(lambda: 1001 not in center.center.sessions)
    finally:
        await center.stop()
