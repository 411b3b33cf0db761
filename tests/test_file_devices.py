"""The file's links and meters imported at start, marked file-managed, beside the API's."""

from __future__ import annotations

import datetime as dt
import json
import tomllib

import pytest
import pytest_twisted
from sqlalchemy import select
from sqlalchemy.orm import Session
from twisted.internet.testing import MemoryReactorClock

from dtucenter.config import read_settings
from dtucenter.modbus.service import ModbusBridge
from dtucenter.modbus.templates import TemplateCatalog
from dtucenter.store import links
from dtucenter.store.models import MANAGED_BY_API, MANAGED_BY_FILE, Link, Meter
from dtucenter.tap import start_database_devices
from tests.test_recorder import started, stop

FILE = """
[modbus]
listen = "tcp:0:interface=127.0.0.1"

[[link]]
name = "site-a"
registration = "hex:00FF41"
registration_mode = "data"

[[link]]
name = "bus"
serial = "/dev/ttyX"

[[meter]]
name = "sdm"
link = "site-a"
unit = 3
template = "eastron-sdm120"
"""

NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def api_devices(session: Session) -> None:
    """A link and a meter the API made: the file's import must leave them alone."""
    session.add(Link(name="api-link", account_id=1, managed_by=MANAGED_BY_API, definition='{"name": "api-link"}',
                     created=NOW))
    session.add(Meter(name="api-meter", account_id=1, link="api-link", unit=1, interval=5.0, points="[]",
                      managed_by=MANAGED_BY_API, definition='{"name": "api-meter"}', configured=True))


@pytest_twisted.ensureDeferred
async def test_the_files_devices_are_imported_with_their_definitions_and_the_apis_kept(db_url: str) -> None:
    settings = read_settings(tomllib.loads(FILE)).modbus
    store, recorder = await started(db_url, settings)
    try:
        await store.write(api_devices)
    finally:
        await stop(store, recorder)
    # The file changes: one link left it, one meter left it. A restart imports it again.
    smaller = read_settings(tomllib.loads(FILE.replace('name = "bus"\nserial = "/dev/ttyX"', 'name = "bus2"\n'
                                                        'serial = "/dev/ttyY"'))).modbus
    store, recorder = await started(db_url, smaller)
    try:
        with Session(store.engine) as session:
            rows = {row.name: row for row in session.scalars(select(Link))}
            assert sorted(rows) == ["api-link", "bus2", "site-a"]
            assert rows["api-link"].managed_by == MANAGED_BY_API
            site_a = rows["site-a"]
            assert site_a.managed_by == MANAGED_BY_FILE and site_a.registration == b"\x00\xffA"
            assert json.loads(site_a.definition) == {
                "name": "site-a", "registration": "hex:00FF41", "registration_mode": "data",
            }
            meters = {row.name: row for row in session.scalars(select(Meter))}
            assert meters["sdm"].managed_by == MANAGED_BY_FILE and meters["sdm"].configured
            assert json.loads(meters["sdm"].definition or "") == {
                "name": "sdm", "link": "site-a", "unit": 3, "template": "eastron-sdm120",
            }
            assert meters["api-meter"].configured and meters["api-meter"].managed_by == MANAGED_BY_API
            listed = [(row.name, row.account, row.managed_by) for row in links.list_links(session)]
            assert listed == [("api-link", "admin", "api"), ("bus2", "admin", "file"), ("site-a", "admin", "file")]
            assert links.list_links(session, account_id=2) == []
    finally:
        await stop(store, recorder)


def api_devices_to_start(session: Session) -> None:
    for name, definition in (
        ("api-link", {"name": "api-link", "registration": "API-1"}),
        ("clash", {"name": "clash", "registration": "API-1"}),  # cannot be told apart from api-link's
        ("broken", {"name": "broken", "timeout": -1}),
    ):
        session.add(Link(name=name, account_id=1, managed_by=MANAGED_BY_API, definition=json.dumps(definition)))
    for name, definition in (
        ("api-meter", {"name": "api-meter", "link": "api-link", "unit": 2, "template": "eastron-sdm120"}),
        ("orphan", {"name": "orphan", "link": "nowhere", "unit": 2, "template": "eastron-sdm120"}),
    ):
        session.add(Meter(name=name, account_id=1, link=definition["link"], unit=2, interval=10.0, points="[]",
                          managed_by=MANAGED_BY_API, definition=json.dumps(definition), configured=True))


@pytest.mark.expected_errors("database: link 'clash': not served")
@pytest.mark.expected_errors("database: link 'broken': not served")
@pytest.mark.expected_errors("database: meter 'orphan': not polled")
@pytest_twisted.ensureDeferred
async def test_the_apis_devices_are_started_from_the_database_and_a_bad_one_is_skipped(db_url: str) -> None:
    settings = read_settings(tomllib.loads(FILE)).modbus
    store, recorder = await started(db_url, settings)
    bridge = ModbusBridge(settings, MemoryReactorClock(), recorder)
    try:
        await store.write(api_devices_to_start)
        await start_database_devices(store, bridge, TemplateCatalog())
        assert sorted(bridge.links) == ["api-link", "bus", "site-a"]
        assert bridge.links["api-link"].settings.registration == b"API-1"
        assert sorted(bridge.poller.meter_names()) == ["api-meter", "sdm"]
        assert bridge.meter_status("api-meter").unit == 2
    finally:
        await stop(store, recorder)
