"""The meter recorder (the bridge's sink) on a real Store: batching, failure streaks, the config sync."""

from __future__ import annotations

import datetime as dt
import tomllib
from typing import Any

import pytest
import pytest_twisted
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from twisted.internet import reactor
from twisted.internet.task import Clock

from dtucenter.config import ConfigError, read_settings
from dtucenter.store import meters
from dtucenter.store.db import open_engine
from dtucenter.store.facade import Store
from dtucenter.store.models import MeterFailure, MeterSample
from dtucenter.store.recorder import MeterRecorder

T0 = 1_800_000_000.0  # a reactor time, seconds since the epoch


def config(*names: str, points: str = "") -> Any:
    text = '[[link]]\nname = "bus"\nserial = "/dev/ttyX"\n'
    for name in names:
        text += f'[[meter]]\nname = "{name}"\nlink = "bus"\nunit = 1\ninterval = 5\n'
        text += points or '[[meter.point]]\nname = "volts"\ntable = "holding"\naddress = 0\nscale = 0.1\n'
    return read_settings(tomllib.loads(text), source="center.toml").modbus


async def started(db_url: str, settings: Any, clock: Any = None) -> tuple[Store, MeterRecorder]:
    store = Store(open_engine(db_url), reactor)
    store.startService()
    recorder = MeterRecorder(store, clock or Clock(), settings, state_interval=10)
    recorder.startService()
    await recorder.synced()
    return store, recorder


async def stop(store: Store, recorder: MeterRecorder) -> None:
    await recorder.stopService()
    await store.stopService()


def streaks(store: Store, meter: str) -> list[tuple[str, float, float, int]]:
    with Session(store.engine) as session:
        rows = session.scalars(select(MeterFailure).where(MeterFailure.meter == meter).order_by(MeterFailure.first))
        return [(r.reason, r.first.timestamp() - T0, r.last.timestamp() - T0, r.count) for r in rows]


@pytest_twisted.ensureDeferred
async def test_values_of_many_meters_share_few_transactions(db_url: str) -> None:
    store, recorder = await started(db_url, config())
    try:
        commits = store.stats.commits
        for i in range(500):
            recorder.record_values(f"m{i}", T0, {"volts": 230.1, "on": True})
        await store.when_idle()
        assert store.stats.commits - commits <= 2
        with Session(store.engine) as session:
            assert session.scalar(select(func.count()).select_from(MeterSample)) == 1000
        assert recorder.stats["meter_values_stored"] == 1000
    finally:
        await stop(store, recorder)


@pytest_twisted.ensureDeferred
async def test_a_failure_streak_is_one_row_until_a_clean_poll_or_another_reason(db_url: str) -> None:
    store, recorder = await started(db_url, config("m"))
    try:
        recorder.record_failure("m", T0 + 1, "timeout")
        recorder.record_failure("m", T0 + 2, "timeout")
        recorder.record_values("m", T0 + 3, {"volts": 1.0})  # some blocks read, one failed: still the streak
        recorder.record_failure("m", T0 + 3, "timeout")
        await recorder.flush()
        assert streaks(store, "m") == [("timeout", 1, 3, 3)]

        recorder.record_failure("m", T0 + 4, "timeout")  # goes on after the flush: an update, not a row
        recorder.record_values("m", T0 + 5, {"volts": 1.0})  # a clean poll ends it
        recorder.record_failure("m", T0 + 6, "timeout")
        recorder.record_failure("m", T0 + 7, "offline")
        recorder.record_failure("m", T0 + 8, "offline")
        await recorder.flush()
        assert streaks(store, "m") == [("timeout", 1, 4, 4), ("timeout", 6, 6, 1), ("offline", 7, 8, 2)]

        with Session(store.engine) as session:
            info = meters.get_meter(session, "m")
        assert info is not None
        assert (info.last_poll, info.last_success, info.last_error_time) == (
            dt.datetime.fromtimestamp(T0 + 8, dt.UTC),
            dt.datetime.fromtimestamp(T0 + 5, dt.UTC),
            dt.datetime.fromtimestamp(T0 + 8, dt.UTC),
        )
        assert info.last_error == "offline" and info.failing
        assert recorder.stats["meter_failures"] == 7
    finally:
        await stop(store, recorder)


@pytest_twisted.ensureDeferred
async def test_state_is_written_on_its_interval_and_at_stop(db_url: str) -> None:
    clock = Clock()
    store, recorder = await started(db_url, config("m"), clock)

    def failing() -> bool:
        with Session(store.engine) as session:
            info = meters.get_meter(session, "m")
        return info is not None and info.failing

    try:
        recorder.record_failure("m", T0, "offline")
        await store.when_idle()
        assert not failing(), "written at once, not batched"
        clock.advance(10)
        await store.when_idle()
        assert failing()
        recorder.record_values("m", T0 + 5, {"volts": 1.0})
    finally:
        await stop(store, recorder)
    assert not failing(), "the last state is written at stop"
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_config_is_synced_and_meters_that_left_it_are_kept(db_url: str) -> None:
    store, recorder = await started(db_url, config("a", "b"))
    recorder.record_values("a", T0, {"volts": 1.0})
    await stop(store, recorder)
    store, recorder = await started(db_url, config("b", "c"))
    try:
        with Session(store.engine) as session:
            found = {m.name: m for m in meters.list_meters(session)}
        assert {name: m.configured for name, m in found.items()} == {"a": False, "b": True, "c": True}
        assert found["a"].last_success == dt.datetime.fromtimestamp(T0, dt.UTC)
        assert found["c"].points == ({"name": "volts", "table": "holding", "address": 0, "type": "uint16",
                                      "scale": 0.1, "unit": None, "writable": True},)
    finally:
        await stop(store, recorder)


@pytest_twisted.ensureDeferred
async def test_values_come_back_as_their_points_hold_them(db_url: str) -> None:
    points = """
[[meter.point]]
name = "count"
table = "input"
address = 0
[[meter.point]]
name = "volts"
table = "holding"
address = 0
scale = 0.1
[[meter.point]]
name = "flow"
table = "holding"
address = 1
type = "float32"
[[meter.point]]
name = "door"
table = "discrete"
address = 0
"""
    store, recorder = await started(db_url, config("m", points=points))
    try:
        recorder.record_values("m", T0, {"count": 7, "volts": 230.1, "flow": float("nan"), "door": True})
        await store.when_idle()
        with Session(store.engine) as session:
            info = meters.get_meter(session, "m")
            assert info is not None
            found = meters.query_meter_samples(session, info)
            expected = [("count", 7), ("volts", 230.1), ("flow", None), ("door", True)]
            assert [(s.point, s.value) for s in found] == expected
            assert type(found[0].value) is int
            assert [s.value for s in meters.query_meter_samples(session, info, point="volts")] == [230.1]
            assert meters.has_samples(session, "m", "flow") and not meters.has_samples(session, "m", "nope")
    finally:
        await stop(store, recorder)


def test_names_longer_than_the_columns_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^center.toml: meter\[0\]: name: at most 100 characters, got 101$"):
        config("m" * 101)
