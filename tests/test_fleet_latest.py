"""GET /api/latest: the latest values of many meters in one request, a page by name, scoped to the account."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import pytest_twisted
from sqlalchemy import insert
from sqlalchemy.orm import Session

from dtucenter.store import accounts, meters, retention
from dtucenter.store.db import open_engine
from dtucenter.store.models import Meter, MeterSample
from tests.support import ApiClient, make_account, start_center

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
POINTS = [{"name": "power", "table": "holding", "address": 0, "type": "int16"},
          {"name": "on", "table": "coil", "address": 0, "type": "bool"},
          {"name": "never", "table": "holding", "address": 9, "type": "float32"}]


def meter(name: str, account: int, link: str) -> Meter:
    return Meter(name=name, account_id=account, link=link, unit=1, interval=60.0, points=json.dumps(POINTS))


def sample(name: str, point: str, minutes_ago: float, value: float | None) -> dict[str, object]:
    return {"meter": name, "point": point, "time": NOW - dt.timedelta(minutes=minutes_ago), "value": value}


def fill(session: Session) -> tuple[int, int, str]:
    """Meters m-0..m-4 of the admin's on two links and acme's meter a-0, their values (older ones first);
    acme's token."""
    admin = accounts.first_admin_id(session)
    accounts.create_account(session, "acme", False, NOW)
    acme = accounts.account_id(session, "acme")
    token = accounts.create_token(session, "acme", "ops", NOW)
    session.add_all([meter(f"m-{n}", admin, "north" if n < 3 else "South-Site") for n in range(5)])
    session.add(meter("a-0", acme, "north"))
    session.flush()
    rows = []
    for n in range(5):
        rows += [sample(f"m-{n}", "power", minutes_ago, 100 * n + minutes_ago) for minutes_ago in (30, 20, 10)]
        if n != 4:
            rows += [sample(f"m-{n}", "on", 10, 1.0), sample(f"m-{n}", "on", 5, 0.0)]
    # Older than a day: found all the same (on PostgreSQL by the second, unbounded lookup).
    rows.append(sample("m-4", "on", 3 * 24 * 60, 1.0))
    rows.append(sample("m-1", "gone", 1, 7.0))  # a point no longer configured
    rows.append(sample("m-2", "power", 0.5, None))  # a NaN read, stored as NULL
    rows.append(sample("a-0", "power", 1, 4242.0))
    session.execute(insert(MeterSample), rows)
    return admin, acme, token


def partition_past_days(session: Session) -> None:
    """On PostgreSQL, the days before NOW in partitions of their own, as a running center makes them."""
    if not retention.is_partitioned(session, "meter_samples"):
        return
    made = retention.partitions(session, "meter_samples")
    for days in range(1, 4):
        day = (NOW - dt.timedelta(days=days)).date()
        if f"meter_samples_p{day:%Y%m%d}" not in made:
            retention.add_partition(session, "meter_samples", day)


def test_latest_values_of_many_meters_newest_per_point_scoped_paged_and_filtered(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            partition_past_days(session)
            admin, acme, _ = fill(session)
        with Session(engine) as session:
            every = meters.latest_values(session, None, NOW)
            assert [m.meter for m in every] == ["a-0", "m-0", "m-1", "m-2", "m-3", "m-4"]
            by_name = {m.meter: m for m in every}
            assert [(s.point, s.value, s.time) for s in by_name["m-3"].samples] == [
                ("power", 310, NOW - dt.timedelta(minutes=10)), ("on", False, NOW - dt.timedelta(minutes=5))]
            assert by_name["m-3"].to_json()["link"] == "South-Site"
            assert [(s.point, s.value) for s in by_name["m-1"].samples] == [("power", 110), ("on", False)], \
                "configured points only, in the config's order, typed as the point says"
            assert [(s.point, s.value) for s in by_name["m-2"].samples] == [("power", None), ("on", False)]
            assert [(s.point, s.value, s.time) for s in by_name["m-4"].samples] == [
                ("power", 410, NOW - dt.timedelta(minutes=10)), ("on", True, NOW - dt.timedelta(days=3))]

            assert [m.meter for m in meters.latest_values(session, acme, NOW)] == ["a-0"]
            assert [(s.point, s.value) for s in meters.latest_values(session, acme, NOW)[0].samples] == [
                ("power", 4242)]
            assert [m.meter for m in meters.latest_values(session, admin, NOW)] == [f"m-{n}" for n in range(5)]
            assert [m.meter for m in meters.latest_values(session, admin, NOW, after="m-1", limit=2)] == ["m-2", "m-3"]
            assert [m.meter for m in meters.latest_values(session, None, NOW, needle="SOUTH")] == ["m-3", "m-4"]
            assert [m.meter for m in meters.latest_values(session, None, NOW, needle="a-")] == ["a-0"]
            assert [m.meter for m in meters.latest_values(session, None, NOW, needle="%")] == [], "LIKE escaped"
            assert [m.meter for m in meters.latest_values(session, admin, NOW, link="north")] == ["m-0", "m-1", "m-2"]
    finally:
        engine.dispose()


def test_latest_values_in_chunks_find_every_pair(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            fill(session)
        with Session(engine) as session:
            whole = [m.to_json() for m in meters.latest_values(session, None, NOW)]
            monkeypatch.setattr(meters, "NEWEST_CHUNK", 3)
            assert [m.to_json() for m in meters.latest_values(session, None, NOW)] == whole
    finally:
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_the_latest_values_endpoint_pages_and_scopes(tmp_path: Path, db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            partition_past_days(session)
            _, _, token = fill(session)
    finally:
        engine.dispose()
    center = await start_center(tmp_path, db_url=db_url)
    try:
        admin = center.api()
        first = await admin.get("/api/latest?limit=4")
        assert first.status == 200
        assert [m["meter"] for m in first.body["meters"]] == ["a-0", "m-0", "m-1", "m-2"]
        assert first.body["next"] == "m-2"
        assert first.body["meters"][1]["samples"][0]["point"] == "power"
        rest = await admin.get("/api/latest?limit=4&after=m-2")
        assert [m["meter"] for m in rest.body["meters"]] == ["m-3", "m-4"] and rest.body["next"] is None
        south = await admin.get("/api/latest?q=south")
        assert [m["meter"] for m in south.body["meters"]] == ["m-3", "m-4"]
        assert [m["meter"] for m in (await admin.get("/api/latest?link=north")).body["meters"]] == [
            "a-0", "m-0", "m-1", "m-2"]

        acme = ApiClient(admin.base, token)
        assert [m["meter"] for m in (await acme.get("/api/latest")).body["meters"]] == ["a-0"]
        assert (await acme.get("/api/latest?link=South-Site")).body == {"meters": [], "next": None}
        beta = await make_account(admin, "beta")
        assert (await beta.get("/api/latest")).body == {"meters": [], "next": None}

        for query, message in [("limit=0", "limit must be a whole number 1..10000"),
                               ("limit=10001", "limit must be"), ("page=2", "unknown query parameter 'page'")]:
            bad = await admin.get(f"/api/latest?{query}")
            assert bad.status == 400 and message in bad.error, (query, bad.body)
    finally:
        await center.stop()
