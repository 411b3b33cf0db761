"""Retention and roll-ups: the roll-ups against a direct aggregate, expiry (by partitions on PostgreSQL),
the job beside ingest, the dtu_values view, the retention migration on a 0004 database with data,
the API's resolution parameter."""

from __future__ import annotations

import datetime as dt
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from alembic import command
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session
from twisted.internet import reactor
from twisted.internet.task import Clock

from dtucenter.config import (
    ConfigError,
    RetentionSettings,
    SettingChange,
    changed_settings,
    read_settings,
    running_settings,
)
from dtucenter.store import queries, retention, schema
from dtucenter.store.db import open_engine
from dtucenter.store.facade import METER_SAMPLES, Store
from dtucenter.store.models import (
    CommandRecord,
    DtuEdit,
    MeterFailure,
    MeterSample,
    MeterSampleRollup,
    RollupCursor,
    Sample,
    SampleRollup,
)
from dtucenter.store.retention import DAY, HOUR, RetentionJob, RetentionPolicy
from tests.support import make_account, until
from tests.test_accounts import METER, start

#: The job's "now" in these tests: the clock's time.
NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)
PSNS = (10001, 10002)
REGISTERS = struct.pack(">BHBHBH", 1, 100, 1, 101, 2, 0xFFFF)


def clock_at(when: dt.datetime) -> Clock:
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


@asynccontextmanager
async def running_store(db_url: str) -> AsyncIterator[Store]:
    store = Store(open_engine(db_url), reactor)
    store.startService()
    try:
        yield store
    finally:
        await store.stopService()


def random_rows(seed: int, start: dt.datetime, hours: float, count: int) -> tuple[list[Any], list[Any]]:
    """DTU upload rows (3 values, some with register lists) and meter rows (some NaN: NULL), at random times."""
    chance = random.Random(seed)
    samples, meter_samples = [], []
    for _ in range(count):
        when = start + dt.timedelta(seconds=chance.uniform(0, hours * 3600))
        when = when.replace(microsecond=chance.choice((0, 123456, 999999)))
        values = struct.pack(">hhh", *(chance.randint(-32768, 32767) for _ in range(3)))
        samples.append((chance.choice(PSNS), when, 20, values, chance.choice((REGISTERS, None))))
        # Quarters add up exactly in any order.
        value = chance.choice((None, chance.randint(-4000, 4000) / 4))
        meter_samples.append((chance.choice(("m1", "m2")), chance.choice(("power", "volts")), when, value))
    return samples, meter_samples


async def add(store: Store, samples: list[Any], meter_samples: list[Any]) -> None:
    await store.add_samples(samples)
    await store.add_rows(METER_SAMPLES, meter_samples)


def bucket_sql(engine: Engine, period: int) -> str:
    """The start of a row's bucket, by the database itself."""
    unit = "hour" if period == HOUR else "day"
    if engine.dialect.name == "postgresql":
        return f"date_trunc('{unit}', \"time\" AT TIME ZONE 'UTC')"
    return "strftime('%Y-%m-%d %H:00:00', \"time\")" if period == HOUR else "strftime('%Y-%m-%d 00:00:00', \"time\")"


def naive(value: Any) -> dt.datetime:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def direct_aggregates(engine: Engine, period: int, before: dt.datetime | None = None) -> dict[tuple[Any, ...], Any]:
    """Per key and bucket: count, min, max, sum of the raw rows, by GROUP BY over the dtu_values view
    and meter_samples."""
    bucket = bucket_sql(engine, period)
    where = "" if before is None else "WHERE \"time\" < :before"
    found: dict[tuple[Any, ...], Any] = {}
    with engine.connect() as connection:
        for table, key in (("dtu_values", "psn, position"), ("meter_samples", "meter, point")):
            rows = connection.execute(text(
                f"SELECT {key}, {bucket} AS b, count(value), min(value), max(value), sum(value) "
                f"FROM {table} {where} GROUP BY {key}, b"
            ), {"before": before})
            for a, b, start, count, low, high, total in rows:
                found[(table, a, b, naive(start))] = (count, low, high, total)
    return found


def stored_rollups(engine: Engine, period: int) -> dict[tuple[Any, ...], Any]:
    found: dict[tuple[Any, ...], Any] = {}
    with Session(engine) as session:
        for r in session.scalars(select(SampleRollup).where(SampleRollup.period == period)):
            found[("dtu_values", r.psn, r.position, naive(r.start))] = (r.count, r.min, r.max, r.sum)
        for m in session.scalars(select(MeterSampleRollup).where(MeterSampleRollup.period == period)):
            found[("meter_samples", m.meter, m.point, naive(m.start))] = (m.count, m.min, m.max, m.sum)
    return found


def count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def partition_names(engine: Engine, table: str) -> set[str]:
    with Session(engine) as session:
        return set(retention.partitions(session, table))


# -- roll-ups ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rollups_equal_a_direct_aggregate_of_the_raw_rows(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, meter_samples = random_rows(1, NOW - dt.timedelta(days=3), 70, 600)
        await add(store, samples, meter_samples)
        policy = RetentionPolicy(batch_rows=37, settle=300)
        clock = clock_at(NOW)

        # A few steps, then a new job (as after a restart) resumes from the cursors.
        horizon = NOW - dt.timedelta(seconds=policy.settle)
        for _ in range(3):
            await store.maintain(lambda s: retention.rollup_step(s, retention.DTU_SAMPLES, horizon, 37))
        await RetentionJob(store, clock, policy).run()

        for period in (HOUR, DAY):
            expected = direct_aggregates(store.engine, period)
            assert len(expected) >= 40
            assert stored_rollups(store.engine, period) == expected
        # Idempotent: another run changes nothing.
        before = stored_rollups(store.engine, HOUR)
        job = RetentionJob(store, clock, policy)
        await job.run()
        assert stored_rollups(store.engine, HOUR) == before and job.stats.rows_rolled_up == 0
        with Session(store.engine) as session:
            cursors = {c.source: c.time for c in session.scalars(select(RollupCursor))}
        assert cursors == {"samples": max(r[1] for r in samples), "meter_samples": max(r[2] for r in meter_samples)}


@pytest_twisted.ensureDeferred
async def test_rows_within_the_settle_time_wait_and_reads_add_them(db_url: str) -> None:
    async with running_store(db_url) as store:
        # An hour whose first half is rolled up and whose second half is not (within the settle time).
        start = NOW - dt.timedelta(minutes=60)
        early, early_meter = random_rows(2, start - dt.timedelta(hours=5), 5.5, 200)
        late, late_meter = random_rows(3, NOW - dt.timedelta(minutes=4), 0.06, 50)
        await add(store, early + late, early_meter + late_meter)
        await RetentionJob(store, clock_at(NOW), RetentionPolicy(batch_rows=100, settle=300)).run()
        # Only the early rows are rolled up: the late ones are within the settle time.
        rolled = stored_rollups(store.engine, HOUR)
        assert sum(c for key, (c, *_) in rolled.items() if key[0] == "dtu_values") == 3 * len(early)

        expected = direct_aggregates(store.engine, HOUR)
        since, until = NOW - dt.timedelta(hours=6), NOW + dt.timedelta(hours=1)
        with Session(store.engine) as session:
            for psn in PSNS:
                series = retention.read_series(session, retention.DTU_SAMPLES, psn, since, until, "hour")
                assert series.resolution == "hour"
                got = {("dtu_values", psn, p.key, naive(p.start)): (p.count, p.min, p.max, p.mean)
                       for p in series.points}
                want = {key: (c, lo, hi, total / c) for key, (c, lo, hi, total) in expected.items()
                        if key[:2] == ("dtu_values", psn)}
                assert got == want
                assert {p.dev for p in series.points} <= {None, 1, 2}
            series = retention.read_series(session, retention.METER_SAMPLES, "m1", since, until, "hour", "power")
            m1_power = ("meter_samples", "m1", "power")
            want_meter = {key[3]: (c, lo, hi, total / c if c else None)
                          for key, (c, lo, hi, total) in expected.items() if key[:3] == m1_power}
            assert {naive(p.start): (p.count, p.min, p.max, p.mean) for p in series.points} == want_meter
            # Short ranges come raw, value by value.
            raw = retention.read_series(session, retention.DTU_SAMPLES, PSNS[0], NOW - dt.timedelta(hours=1), NOW)
            assert raw.resolution == "raw"
            assert [(p.start, p.key, p.min) for p in raw.points] == [
                (s.time, s.position, s.value) for s in queries.query_samples(
                    session, PSNS[0], NOW - dt.timedelta(hours=1), NOW)]


def test_the_resolution_follows_the_length_of_the_range(db_url: str) -> None:
    assert retention.choose_resolution(NOW - dt.timedelta(hours=47), NOW) == "raw"
    assert retention.choose_resolution(NOW - dt.timedelta(days=30), NOW) == "hour"
    assert retention.choose_resolution(NOW - dt.timedelta(days=400), NOW) == "day"
    assert retention.choose_resolution(None, NOW) == "day"
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            session.add(Sample(psn=PSNS[0], time=NOW, net_state=0, values=b"\0\1"))
        with Session(engine) as session:
            # No end: up to the newest value.
            def resolve(days: int, psn: int = PSNS[0]) -> str:
                since = NOW - dt.timedelta(days=days)
                return retention.resolve_resolution(session, retention.DTU_SAMPLES, psn, since, None)

            assert [resolve(1), resolve(10), resolve(100), resolve(100, PSNS[1])] == ["raw", "hour", "day", "raw"]
    finally:
        engine.dispose()


# -- expiry --------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expiry_removes_what_is_old_and_nothing_else(db_url: str) -> None:
    async with running_store(db_url) as store:
        engine = store.engine
        partitioned = engine.dialect.name == "postgresql"
        days = set()
        if partitioned:  # as the job would have made them ahead on each of those days
            for source in retention.SOURCES:
                for back in range(11):
                    day = (NOW - dt.timedelta(days=back)).date()
                    name = f"{source.name}_p{day:%Y%m%d}"
                    if name not in partition_names(engine, source.name):  # the migration made today's (real) days
                        await store.maintain(partial(retention.add_partition, table=source.name, day=day))
                    days.add(name)
        samples, meter_samples = random_rows(4, NOW - dt.timedelta(days=10), 10 * 24 - 1, 800)
        await add(store, samples, meter_samples)

        def audit_rows(session: Session) -> None:
            for day in range(10):
                when = NOW - dt.timedelta(days=day, hours=1)
                session.add(CommandRecord(psn=1, kind="read_test", request="{}", who="t", queued=when))
                session.add(DtuEdit(psn=1, action="update", fields="{}", who="t", time=when))
                session.add(MeterFailure(meter="m1", reason="timeout", first=when - dt.timedelta(days=2), last=when,
                                         count=3))

        await store.write(audit_rows)
        clock = clock_at(NOW)
        # Kept for ever: a first run only rolls up (and makes the coming days' partitions).
        await RetentionJob(store, clock, RetentionPolicy()).run()
        if partitioned:
            assert days <= partition_names(engine, "samples") | partition_names(engine, "meter_samples")
            with engine.connect() as connection:
                assert connection.execute(text("SELECT count(*) FROM samples_p_default")).scalar() == 0
        hourly_before = stored_rollups(engine, HOUR)

        policy = RetentionPolicy(samples=3, meter_samples=4, meter_failures=5, audit=6, hourly=8, daily=30,
                                 batch_rows=50)
        job = RetentionJob(store, clock, policy)
        await job.run()

        def kept(days: float) -> dt.datetime:
            cutoff = NOW - dt.timedelta(days=days)
            # On PostgreSQL raw samples go by whole days: a day is dropped once all of it has expired.
            return cutoff.replace(hour=0, minute=0, second=0, microsecond=0) if partitioned else cutoff

        with Session(engine) as session:
            times = sorted(session.scalars(select(Sample.time)))
            assert times == sorted(r[1] for r in samples if r[1] >= kept(3))
            meter_times = sorted(session.scalars(select(MeterSample.time)))
            assert meter_times == sorted(r[2] for r in meter_samples if r[2] >= kept(4))
            assert len(session.scalars(select(MeterFailure.id)).all()) == 5
            assert len(session.scalars(select(CommandRecord.id)).all()) == 6
            assert len(session.scalars(select(DtuEdit.id)).all()) == 6
        cutoff = naive(NOW - dt.timedelta(days=8))
        assert stored_rollups(engine, HOUR) == {key: value for key, value in hourly_before.items() if key[3] >= cutoff}
        assert stored_rollups(engine, DAY)  # 30 days: all kept
        if partitioned:
            left = partition_names(engine, "samples") | partition_names(engine, "meter_samples")
            dropped = {f"samples_p{(NOW - dt.timedelta(days=back)).date():%Y%m%d}" for back in range(4, 11)} | {
                f"meter_samples_p{(NOW - dt.timedelta(days=back)).date():%Y%m%d}" for back in range(5, 11)}
            assert days - left == dropped
            assert job.stats.partitions_dropped == len(dropped)
        assert job.stats.rows_expired > 0


@pytest_twisted.ensureDeferred
async def test_raw_rows_are_not_expired_before_they_are_rolled_up(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, meter_samples = random_rows(5, NOW - dt.timedelta(days=5), 24, 50)
        await add(store, samples, meter_samples)

        # A run that cannot reach the rows (its horizon before them) must leave them all.
        job = RetentionJob(store, clock_at(NOW - dt.timedelta(days=7)), RetentionPolicy(samples=1, meter_samples=1))
        await job.run()
        assert count(store.engine, Sample) == 50 and count(store.engine, MeterSample) == 50


# -- the job beside ingest ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_job_runs_while_uploads_are_ingested_and_none_is_lost(db_url: str) -> None:
    async with running_store(db_url) as store:
        old, old_meter = random_rows(6, NOW - dt.timedelta(days=2), 40, 3000)
        await add(store, old, old_meter)
        clock = clock_at(NOW)
        job = RetentionJob(store, clock, RetentionPolicy(samples=1, batch_rows=100, settle=0))
        running = job.run()
        committed_during_the_run = 0
        wave = 0
        while not running.called or wave < 5:
            # Uploads arrive now: after the horizon of the run under way.
            fresh = [(PSNS[0], NOW + dt.timedelta(seconds=wave + i / 100), 1, struct.pack(">h", i), None)
                     for i in range(100)]
            await store.add_samples(fresh)  # acknowledged: committed, or this raises
            wave += 1
            if not running.called:
                committed_during_the_run += 1
            assert wave < 3000, "the job never ended"
        await running
        assert committed_during_the_run >= 2, "uploads waited for the whole run"
        # Every upload is stored, and a later run rolls up each of them exactly once.
        clock.advance(3600)
        await job.run()
        with Session(store.engine) as session:
            recent = session.scalar(select(func.count()).select_from(Sample).where(Sample.time >= NOW))
        assert recent == 100 * wave
        rolled = stored_rollups(store.engine, HOUR)
        assert sum(c for key, (c, *_) in rolled.items() if key[0] == "dtu_values") == 3 * len(old) + 100 * wave
        # The old rows are expired meanwhile (on PostgreSQL too: they are in no day's partition).
        kept_from = NOW + dt.timedelta(hours=1) - dt.timedelta(days=1)
        assert count(store.engine, Sample) == 100 * wave + sum(1 for r in old if r[1] >= kept_from)


@pytest.mark.expected_errors("Retention run failed")
@pytest_twisted.ensureDeferred
async def test_a_failed_run_is_logged_and_the_next_one_goes_on(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_store(db_url) as store:
        samples, meter_samples = random_rows(7, NOW - dt.timedelta(days=1), 10, 40)
        await add(store, samples, meter_samples)
        job = RetentionJob(store, clock_at(NOW), RetentionPolicy())

        def broken(*_: Any, **__: Any) -> int:
            raise RuntimeError("a bug")

        with monkeypatch.context() as patched:
            patched.setattr(retention, "rollup_step", broken)
            await job.run()
        assert job.stats.failed_runs == 1 and job.stats.runs == 0
        await job.run()
        assert job.stats.runs == 1 and stored_rollups(store.engine, HOUR) == direct_aggregates(store.engine, HOUR)


@pytest_twisted.ensureDeferred
async def test_stopping_ends_a_run_after_the_step_under_way(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, meter_samples = random_rows(9, NOW - dt.timedelta(days=1), 10, 500)
        await add(store, samples, meter_samples)
        job = RetentionJob(store, clock_at(NOW), RetentionPolicy(samples=1, batch_rows=50))
        job.startService()  # the first run starts at once
        await job.stopService()
        assert job.stats.rows_rolled_up == 50 and job.stats.runs == 0 and job.stats.failed_runs == 0
        assert count(store.engine, Sample) == 500


@pytest_twisted.ensureDeferred
async def test_the_job_pauses_after_each_step_to_keep_to_its_share(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, meter_samples = random_rows(10, NOW - dt.timedelta(days=1), 10, 300)
        await add(store, samples, meter_samples)
        clock = clock_at(NOW)
        maintain = store.maintain

        def taking_a_second(job: Any) -> Any:  # each step takes a second of the job's clock
            return maintain(job).addCallback(lambda result: (clock.advance(1), result)[1])

        store.maintain = taking_a_second  # type: ignore[method-assign]
        job = RetentionJob(store, clock, RetentionPolicy(batch_rows=100, share=0.25))
        running = job.run()
        pauses = []
        while not running.called:
            await until(lambda: running.called or bool(clock.getDelayedCalls()))
            for call in clock.getDelayedCalls():
                pauses.append(call.getTime() - clock.seconds())
                clock.advance(call.getTime() - clock.seconds())
        await running
        assert job.stats.rows_rolled_up == 600
        # 3 s of pause after each 1 s step, a quarter of the time: 3 full steps and a short one per
        # table (on PostgreSQL, one more per partition made ahead).
        assert set(pauses) == {3.0} and len(pauses) == 8 + job.stats.partitions_added


# -- the view, the migration ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_dtu_values_view_has_one_row_per_value(db_url: str) -> None:
    async with running_store(db_url) as store:
        await store.add_samples([
            (PSNS[0], NOW, 20, struct.pack(">hhh", 1, -2, 32767), REGISTERS),
            (PSNS[0], NOW + dt.timedelta(seconds=1), 20, struct.pack(">hh", -32768, 0), None),
        ])
        with store.engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT \"time\", psn, position, dev, addr, point, value FROM dtu_values ORDER BY \"time\", position"
            )).all()
        with Session(store.engine) as session:
            expected = queries.query_samples(session, PSNS[0])
        assert [(naive(r[0]), r[1], r[2], r[3], r[4], r[6]) for r in rows] == [
            (naive(s.time), s.psn, s.position, s.dev, s.addr, s.value) for s in expected]
        assert [r[5] for r in rows] == ["1-100", "1-101", "2-65535", "0", "1"]


def test_a_0004_database_upgrades_with_its_rows_intact(db_url: str) -> None:
    engine = open_engine(db_url, create=False)
    try:
        with engine.connect() as connection:
            command.upgrade(schema._config(connection), "0004")
            connection.commit()
        samples, meter_samples = random_rows(8, NOW - dt.timedelta(days=20), 24 * 30, 300)
        with engine.begin() as connection:
            connection.execute(Sample.__table__.insert(), [  # type: ignore[attr-defined]
                dict(zip(queries.SAMPLE_ROW_COLUMNS, row, strict=True)) for row in samples])
            connection.execute(MeterSample.__table__.insert(), [  # type: ignore[attr-defined]
                dict(zip(("meter", "point", "time", "value"), row, strict=True)) for row in meter_samples])

        def everything() -> dict[str, list[tuple[Any, ...]]]:
            with engine.connect() as connection:
                return {table: [tuple(r) for r in connection.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
                        for table in ("samples", "meter_samples")}

        before = everything()
        schema.upgrade(engine)
        assert schema.current(engine).kind == "current"
        assert everything() == before
        with Session(engine) as session:
            session.add(Sample(psn=1, time=NOW + dt.timedelta(days=400), net_state=0, values=b"\0\1"))
            session.commit()
            newest = session.scalars(select(Sample).order_by(Sample.id.desc()).limit(1)).one()
            assert newest.id == max(r[0] for r in before["samples"]) + 1
        if engine.dialect.name == "postgresql":
            newest_day = max(r[1] for r in samples).date() + dt.timedelta(days=1)
            names = partition_names(engine, "samples")
            today = dt.datetime.now(dt.UTC).date()
            assert {f"samples_p_before{max(newest_day, today):%Y%m%d}", "samples_p_default"} <= names
            assert len(partition_names(engine, "meter_samples")) == len(names)
    finally:
        engine.dispose()


# -- settings and the API --------------------------------------------------------------------------------


def test_retention_settings_are_read_from_their_table() -> None:
    read = read_settings({"retention": {"samples": 30, "hourly": 365, "batch-rows": 1000}}).retention
    assert (read.samples, read.hourly, read.daily, read.batch_rows) == (30, 365, None, 1000)
    assert read_settings({}).retention == RetentionSettings()  # nothing expires unless configured
    assert RetentionSettings().samples is None and RetentionSettings().job
    with pytest.raises(ConfigError, match=r"retention: hourly .* less long than samples"):
        read_settings({"retention": {"samples": 30, "hourly": 7}}, source="center.toml")
    with pytest.raises(ConfigError, match="retention: sample: unknown key"):
        read_settings({"retention": {"sample": 30}}, source="center.toml")
    # A reload names a changed [retention] as waiting for a restart.
    running = read_settings({}, source="center.toml")
    reread = read_settings({"retention": {"samples": 7}}, source="center.toml")
    assert changed_settings(running, reread) == [
        SettingChange("retention.samples", "center.toml: retention: samples", live=False)]
    assert running_settings(running, reread).retention == running.retention


@pytest_twisted.ensureDeferred
async def test_the_samples_endpoints_answer_rollups_scoped_like_the_rest(tmp_path: Path, db_url: str) -> None:
    center = await start(tmp_path, db_url)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")
        assert (await admin.call("PUT", f"/api/dtus/{PSNS[0]}", {"account": "acme"})).status == 201
        first = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
        await center.store.add_samples([
            (PSNS[0], first + dt.timedelta(minutes=20 * i), 1, struct.pack(">hh", i, -i), None) for i in range(9)])
        path = f"/api/dtus/{PSNS[0]}/samples?since=2026-11-01T00:00:00Z&until=2026-11-02T00:00:00Z"

        hourly = await acme.get(path + "&resolution=hour")
        assert hourly.status == 200, hourly.body
        assert hourly.body["resolution"] == "hour" and hourly.body["more"] is False
        assert [(r["start"], r["position"], r["count"], r["min"], r["max"], r["mean"])
                for r in hourly.body["rollups"] if r["position"] == 0] == [
            ("2026-11-01T00:00:00+00:00", 0, 3, 0, 2, 1), ("2026-11-01T01:00:00+00:00", 0, 3, 3, 5, 4),
            ("2026-11-01T02:00:00+00:00", 0, 3, 6, 8, 7)]
        newest = await acme.get(path + "&resolution=day&order=desc&limit=1")
        assert [(r["position"], r["count"], r["mean"]) for r in newest.body["rollups"]] == [(1, 9, -4)]
        assert newest.body["more"] is True
        auto = await acme.get(path + "&resolution=auto")
        assert auto.body["resolution"] == "raw" and len(auto.body["samples"]) == 18
        assert (await acme.get(path + "&resolution=minute")).status == 400
        hidden = await beta.get(path + "&resolution=hour")
        assert hidden.status == 404 and hidden.error == f"no DTU {PSNS[0]}"

        assert (await admin.call("PUT", f"/api/meters/{METER}/account", {"account": "acme"})).status == 200
        await center.store.add_rows(METER_SAMPLES, [
            (METER, "power", first + dt.timedelta(hours=i), float(i)) for i in range(30)])
        meter_path = f"/api/meters/{METER}/samples?point=power&resolution=day"
        daily = await acme.get(meter_path)
        assert [(r["start"], r["point"], r["count"], r["min"], r["max"]) for r in daily.body["rollups"]] == [
            ("2026-11-01T00:00:00+00:00", "power", 24, 0, 23), ("2026-11-02T00:00:00+00:00", "power", 6, 24, 29)]
        assert (await beta.get(meter_path)).status == 404
        assert (await acme.get(meter_path.replace("power", "nothing"))).status == 404
    finally:
        await center.stop()
