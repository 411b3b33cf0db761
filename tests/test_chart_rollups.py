"""Long charts drawn from the roll-ups: the same minima, maxima and means as from the raw rows, the
same gaps, and the raw rows still read where the roll-up job has not reached or buckets are narrow."""

from __future__ import annotations

import datetime as dt
import math
import struct
from functools import partial
from typing import Any

import pytest_twisted
from sqlalchemy.orm import Session

from dtucenter.store import queries
from dtucenter.store.facade import METER_SAMPLES
from dtucenter.store.retention import DTU_SAMPLES, RetentionJob, RetentionPolicy
from dtucenter.store.retention import METER_SAMPLES as METER_ROLLUPS
from dtucenter.web import charts
from dtucenter.web.downsample import Downsampler
from tests.test_retention import clock_at, running_store

NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)
START = NOW - dt.timedelta(days=5)
PSN = 30001


def uploads_and_polls() -> tuple[list[Any], list[Any]]:
    """An upload and a poll a minute for five days, but for a six-hour outage on day three."""
    samples, polls = [], []
    outage = (START + dt.timedelta(days=2), START + dt.timedelta(days=2, hours=6))
    for minute in range(5 * 24 * 60 - 10):
        when = START + dt.timedelta(minutes=minute)
        if outage[0] <= when < outage[1]:
            continue
        values = (minute % 997 - 400, (minute * 7) % 5000, -(minute % 31))
        samples.append((PSN, when, 20, struct.pack(">hhh", *values), None))
        polls.append(("m1", "power", when, (minute % 400) / 4))
    return samples, polls


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, abs_tol=1e-9))
        for x, y in zip(a, b, strict=True)
    )


@pytest_twisted.ensureDeferred
async def test_a_long_chart_from_the_rollups_equals_the_one_from_the_raw_rows(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, polls = uploads_and_polls()
        await store.add_samples(samples)
        await store.add_rows(METER_SAMPLES, polls)
        await store.write(lambda session: queries.upsert_dtu(session, PSN, {}, NOW))
        await RetentionJob(store, clock_at(NOW), RetentionPolicy()).run()

        since, until = START, START + dt.timedelta(days=4)  # hour-aligned: a chart bucket is whole roll-ups
        width_hours = 2

        def sampler() -> Downsampler:
            return Downsampler(since.timestamp(), until.timestamp(), int(96 / width_hours))

        def read(job: Any) -> Any:
            with Session(store.engine) as session:
                return job(session)

        assert read(lambda s: charts.rollup_resolution(s, DTU_SAMPLES, sampler(), since)) == "hour"
        rolled = sampler()
        places = read(partial(charts.reduce_dtu_samples, psn=PSN, scope=None, sampler=rolled, since=since, until=until))
        assert places == {}, "no register list: positions only"
        raw = sampler()
        read(lambda s: raw.add_rows(queries.upload_seconds(s, PSN, since, until)))
        from_rollups, from_raw = rolled.result(), raw.result()
        assert from_rollups["gaps"] == from_raw["gaps"] == 1, "the outage is a gap either way"
        for key in ("mean", "min", "max"):
            assert len(from_rollups[key]) == 3
            for series in range(3):
                assert same(from_rollups[key][series], from_raw[key][series]), (key, series)
        assert rolled.samples == raw.samples, "every upload is counted once, rolled up or not"

        meter_rolled = sampler()
        read(lambda s: charts.feed_rollups(s, METER_ROLLUPS, "m1", "hour", meter_rolled, since, until, lambda _: 0))
        meter_raw = sampler()
        read(lambda s: [meter_raw.add_bucket(b.index, b.first, b.last, 0, b.samples, b.count, b.low, b.high, b.total)
                        for b in charts.meters.meter_buckets(s, "m1", None, since, until, meter_raw.width)])
        assert meter_rolled.result()["gaps"] == meter_raw.result()["gaps"] == 1
        for key in ("mean", "min", "max"):
            assert same(meter_rolled.result()[key][0], meter_raw.result()[key][0]), key


@pytest_twisted.ensureDeferred
async def test_raw_rows_are_read_where_buckets_are_narrow_or_nothing_is_rolled_up(db_url: str) -> None:
    async with running_store(db_url) as store:
        samples, _ = uploads_and_polls()
        await store.add_samples(samples[:100])
        since, until = START, START + dt.timedelta(days=4)
        with Session(store.engine) as session:
            wide = Downsampler(since.timestamp(), until.timestamp(), 48)
            assert charts.rollup_resolution(session, DTU_SAMPLES, wide, since) is None, "nothing rolled up yet"
        await RetentionJob(store, clock_at(NOW), RetentionPolicy()).run()
        with Session(store.engine) as session:
            narrow = Downsampler(since.timestamp(), until.timestamp(), 1000)  # 346 s buckets
            assert charts.rollup_resolution(session, DTU_SAMPLES, narrow, since) is None
            assert charts.rollup_resolution(session, DTU_SAMPLES, wide, since) == "hour"
            days = Downsampler(since.timestamp(), until.timestamp(), 4)
            assert charts.rollup_resolution(session, DTU_SAMPLES, days, since) == "day"
            later = since + dt.timedelta(days=1)  # past the last upload rolled up: raw
            assert charts.rollup_resolution(session, DTU_SAMPLES, wide, later) is None


@pytest_twisted.ensureDeferred
async def test_a_range_of_weeks_is_drawn_from_the_hourly_rollups_however_wide_the_chart(db_url: str) -> None:
    """The console asks for as many points as the chart has pixels: a month at 4000 points would read every
    raw row of the month (buckets of 648 s), where the month's hourly roll-ups already fill the chart."""
    async with running_store(db_url) as store:
        samples, _ = uploads_and_polls()
        await store.add_samples(samples)
        await store.write(lambda session: queries.upsert_dtu(session, PSN, {}, NOW))
        await RetentionJob(store, clock_at(NOW), RetentionPolicy()).run()
        until = START + dt.timedelta(days=4)
        with Session(store.engine) as session:
            for days, points, expected in [(30, 4000, "hour"), (21, 10_000, "hour"), (20, 1000, None),
                                           (7, 4000, None), (30, 30, "day")]:
                since = until - dt.timedelta(days=days)
                sampler = Downsampler(since.timestamp(), until.timestamp(), points)
                assert charts.rollup_resolution(session, DTU_SAMPLES, sampler, since) == expected, (days, points)
            wide = Downsampler((until - dt.timedelta(days=30)).timestamp(), until.timestamp(), 4000)
            rolled = charts.reduce_dtu_samples(session, PSN, None, wide, until - dt.timedelta(days=30), until)
            assert rolled == {} and wide.samples == len([s for s in samples if s[1] < until])
            assert len(wide.result()["time"]) <= 4 * 24 + 1, "one point per hour of data (and the outage's gap)"

