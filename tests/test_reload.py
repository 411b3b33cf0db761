"""Reloading the config file while the center runs: which settings a reload applies and which
wait for a restart, what it changes of the file's links and meters, and the reloads of a
running center (in this process, on SQLite and PostgreSQL): links added and removed and a
meter's points changed over real sockets, a broken file changing nothing, reloads one at a time.
The same through a real ``twistd dtucenter`` and SIGHUP: tests/test_reload_process.py."""

from __future__ import annotations

import datetime as dt
import socket
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from pymodbus.framer import FramerType
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.python.logfile import LogFile

from dtucenter.config import (
    ModbusSettings,
    RetentionSettings,
    Settings,
    changed_settings,
    read_settings,
    running_settings,
)
from dtucenter.mqtt.config import MqttSettings
from dtucenter.process import OwnProcess
from dtucenter.reload import DevicePlan, plan_devices
from dtucenter.setting import METADATA_KEY, Reload, reload_of
from dtucenter.store.models import MANAGED_BY_API, MANAGED_BY_FILE, Link, Meter
from tests.modbus.interop_support import FakeDtu, PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import RunningCenter, eventually, start_center, until


def settings(text: str, *options: tuple[str, str]) -> Settings:
    return read_settings(tomllib.loads(text), dict(options), source="center.toml")


# -- which settings a reload applies --------------------------------------------------------------

#: Every setting a reload applies to the running center. Adding one here means something takes it up.
LIVE = {
    "dtu_udp_pending", "unknown_dtu", "login_timeout", "command_timeout", "log_rotate_size", "log_keep",
    "modbus.login_timeout", "modbus.probe", "modbus.probe_after", "modbus.rules",
    "modbus.unknown_registration", "modbus.registration_window", "modbus.held_connections",
    "modbus.held_connections_per_host", "alarms",
}


def declared_reloads() -> dict[str, Reload]:
    found = {}
    for prefix, cls in (
        ("", Settings), ("modbus.", ModbusSettings), ("retention.", RetentionSettings), ("mqtt.", MqttSettings)
    ):
        for attribute in attrs.fields(cls):
            if attribute.eq:
                found[prefix + attribute.name] = reload_of(attribute)
    return found


def test_each_setting_says_whether_a_reload_applies_it_and_silence_means_a_restart() -> None:
    reloads = declared_reloads()
    assert {name for name, kind in reloads.items() if kind is Reload.LIVE} == LIVE
    assert reloads["modbus"] is Reload.TABLE and reloads["retention"] is Reload.TABLE
    assert reloads["mqtt"] is Reload.TABLE
    assert {reloads[name] for name in reloads if name.startswith("retention.")} == {Reload.RESTART}
    assert {name for name, kind in reloads.items() if kind is Reload.DEVICES} == {"modbus.links", "modbus.meters"}
    for name in ("dtu", "db", "api", "api_token", "manhole", "frame_head", "modbus.listen", "source", "mqtt.url"):
        assert reloads[name] is Reload.RESTART, name
    # A field declared without a word about reloads needs a restart.
    undeclared = attrs.make_class("Later", {"x": attrs.field(default=0, metadata={})})
    assert reload_of(attrs.fields(undeclared).x) is Reload.RESTART
    composed_fields = ("modbus", "mqtt", "alarms", "retention", "source")
    assert all(METADATA_KEY in a.metadata or a.name in composed_fields for a in attrs.fields(Settings) if a.eq)


def test_changed_settings_name_each_change_where_it_comes_from_and_whether_it_is_live() -> None:
    before = settings('login_timeout = 5\n[modbus]\nlisten = "tcp:0"\n')
    after = settings(
        'login_timeout = 6\napi = "tcp:9"\ncommand_timeout = 2\n[modbus]\nlisten = "tcp:1"\nprobe = "hex:01"\n'
    )
    changes = {change.name: (change.where, change.live) for change in changed_settings(before, after)}
    assert changes == {
        "login_timeout": ("center.toml: login_timeout", True),
        "command_timeout": ("center.toml: command_timeout", True),
        "api": ("center.toml: api", False),
        "modbus.listen": ("center.toml: modbus: listen", False),
        "modbus.probe": ("center.toml: modbus: probe", True),
        "modbus.login_timeout": ("login_timeout", True),  # the top-level one, as [modbus] gives none
    }
    assert changed_settings(before, before) == []


def test_an_option_on_the_command_line_still_wins_over_the_reread_file() -> None:
    before = settings('api = "tcp:1"\nlogin_timeout = 5\n', ("api", "tcp:7"), ("login-timeout", "9"))
    after = settings('api = "tcp:2"\nlogin_timeout = 6\n', ("api", "tcp:7"), ("login-timeout", "9"))
    assert changed_settings(before, after) == []


def test_the_running_settings_keep_what_needs_a_restart_and_take_the_rest() -> None:
    before = settings('login_timeout = 5\nmax_frame_length = 1024\n[modbus]\nlisten = "tcp:0"\n')
    after = settings('login_timeout = 6\nmax_frame_length = 2048\n[modbus]\nlisten = "tcp:1"\nprobe = "hex:01"\n')
    running = running_settings(before, after)
    assert (running.login_timeout, running.modbus.login_timeout, running.modbus.probe) == (6, 6, b"\x01")
    assert (running.max_frame_length, running.modbus.listen) == (1024, "tcp:0")
    # The next reload of the same file finds the same restart-only changes, and only those.
    assert [change.name for change in changed_settings(running, after)] == ["max_frame_length", "modbus.listen"]


# -- the file's links and meters ------------------------------------------------------------------

DEVICES = """
[modbus]
listen = "tcp:0"

[[link]]
name = "a"
registration = "A-1"

[[link]]
name = "b"
registration = "B-1"

[[meter]]
name = "ma"
link = "a"
unit = 1
template = "eastron-sdm120"

[[meter]]
name = "mb"
link = "b"
unit = 1
template = "eastron-sdm120"
"""


def test_the_plan_names_what_was_added_changed_and_removed() -> None:
    before = settings(DEVICES).modbus
    text = DEVICES.replace('name = "b"\nregistration = "B-1"', 'name = "c"\nregistration = "C-1"')
    text = text.replace('link = "b"', 'link = "c"').replace('registration = "A-1"', 'registration = "A-2"')
    text = text.replace('name = "ma"\nlink = "a"\nunit = 1', 'name = "ma"\nlink = "a"\nunit = 2')
    after = settings(text).modbus
    plan = plan_devices(before, after)
    assert [link.name for link in plan.links_added] == ["c"]
    assert [link.name for link in plan.links_changed] == ["a"]
    assert plan.links_removed == ("b",)
    assert ([m.name for m in plan.meters_added], [m.name for m in plan.meters_changed]) == ([], ["ma", "mb"])
    assert plan.meters_removed == ()
    assert plan.summary() == "links 1 added, 1 changed, 1 removed; meters 0 added, 2 changed, 0 removed"
    assert plan_devices(before, before) == DevicePlan()
    # What the bridge does not run (refused, or its port would not bind) is tried again.
    unserved = plan_devices(before, before, served=["a"], polled=["ma"])
    assert ([link.name for link in unserved.links_added], [m.name for m in unserved.meters_added]) == (["b"], ["mb"])
    assert unserved.links_removed == unserved.meters_removed == ()


# -- a running center ------------------------------------------------------------------------------

LISTEN = "tcp:0:interface=127.0.0.1"


def config_text(listen: str, links: str, meter: str, top: str = "") -> str:
    """A config file: ``top``-level keys, the shared listener, links and a meter."""
    return f'{top}\n[modbus]\nlisten = "{listen}"\n{links}\n{meter}\n'


def link(name: str, registration: str) -> str:
    return f'[[link]]\nname = "{name}"\nregistration = "{registration}"\ntimeout = 1.0\nretries = 0\n'


TEMPLATE_METER = '[[meter]]\nname = "m1"\nlink = "site-a"\nunit = 1\ninterval = 0.2\ntemplate = "eastron-sdm120"\n'
#: m1 with one point of its own instead of its template's.
VOLTS_METER = TEMPLATE_METER.replace(
    'template = "eastron-sdm120"\n', '[[meter.point]]\nname = "volts"\ntable = "input"\naddress = 0\ntype = "float32"\n'
)

BEFORE = config_text(LISTEN, link("site-a", "DTU-A") + link("site-b", "DTU-B"), TEMPLATE_METER, "login_timeout = 30")
#: site-b gone, site-c new, m1 with one point of its own; a live setting, a restart-only one, and
#: one the command line gives (--api), which the file cannot change.
AFTER = config_text(
    LISTEN, link("site-a", "DTU-A") + link("site-c", "DTU-C"), VOLTS_METER,
    'login_timeout = 20\nmax_frame_length = 2048\napi = "tcp:9"',
)


def file_links(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return {row.name: row.managed_by for row in session.scalars(select(Link))}
    finally:
        engine.dispose()


def api_devices(session: Session) -> None:
    """An API link and a meter of the API's on the file's site-b: the meter stops with the link."""
    session.add(Link(name="api-link", account_id=1, managed_by=MANAGED_BY_API, definition='{"name": "api-link"}',
                     created=dt.datetime(2026, 11, 30, tzinfo=dt.UTC)))
    session.add(Meter(name="api-meter", account_id=1, link="site-b", unit=2, interval=5.0, points="[]",
                      managed_by=MANAGED_BY_API, definition='{"name": "api-meter"}', configured=True))


@pytest_twisted.ensureDeferred
async def test_a_reload_applies_the_files_changes_to_the_running_center(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    config = tmp_path / "center.toml"
    config.write_text(BEFORE)
    center = await start_center(tmp_path, "--config", str(config), db_url=db_url)
    dtus = {name: FakeDtu(registration=name.encode()) for name in ("DTU-A", "DTU-B", "DTU-C")}
    try:
        api = center.api()
        reloader = center.service.reloader  # type: ignore[attr-defined]
        port = await center.modbus_port()
        await dtus["DTU-A"].start(port, bus.port)
        await dtus["DTU-B"].start(port, bus.port)
        assert await eventually(lambda: latest_poll(api, "m1"), "m1 polled") == SDM120_VALUES
        await center.store.write(api_devices)

        config.write_text(AFTER)
        outcome = await reloader.reload()
        assert outcome is not None
        assert outcome.devices.summary() == "links 1 added, 0 changed, 1 removed; meters 0 added, 1 changed, 0 removed"
        assert outcome.applied == ("login_timeout", "modbus.login_timeout")
        assert outcome.need_restart == ("max_frame_length",)

        closed = dtus["DTU-B"].center
        assert closed is not None
        await closed.lost  # the removed link's connection is closed
        await dtus["DTU-C"].start(port, bus.port)  # the new link's registration is accepted at once
        await eventually(lambda: online(center, "site-c"), "site-c online")
        volts = {"volts": SDM120_VALUES["voltage"]}
        await eventually(lambda: polled(api, "m1", volts), "m1 polled with its new points")
        assert center.center.settings.login_timeout == 20
        assert center.bridge.login_timeout == 20
        assert center.bridge._login_factory is not None and center.bridge._login_factory.login_timeout == 20
        assert center.bridge.settings.listen == LISTEN
        assert reloader.settings.max_frame_length == 1024  # still what the center runs with
        assert file_links(db_url) == {"site-a": MANAGED_BY_FILE, "site-c": MANAGED_BY_FILE, "api-link": MANAGED_BY_API}
        retired = (await api.get("/api/meters/api-meter")).body
        assert retired["configured"] is False
    finally:
        for dtu in dtus.values():
            await dtu.stop()
        await center.stop()
        bus.stop()


async def online(center: Any, link: str) -> bool:
    return link in center.bridge.links and bool(center.bridge.links[link].online)


async def polled(api: Any, meter: str, values: dict[str, float]) -> bool:
    return await latest_poll(api, meter) == values


async def started_with(tmp_path: Path, text: str, *options: str) -> tuple[Path, RunningCenter]:
    """A center in this process on SQLite, reading the config file ``text``, which a test edits."""
    config = tmp_path / "center.toml"
    config.write_text(text)
    return config, await start_center(tmp_path, "--config", str(config), *options,
                                      db_url=f"sqlite:///{tmp_path / 'c.db'}")


@pytest.mark.expected_errors('center.toml: link "site-a": timeout: must be a number > 0, got 0')
@pytest_twisted.ensureDeferred
async def test_a_file_that_does_not_read_changes_nothing(tmp_path: Path) -> None:
    config, center = await started_with(tmp_path, BEFORE)
    try:
        reloader = center.service.reloader  # type: ignore[attr-defined]
        before = reloader.settings
        config.write_text(AFTER.replace("timeout = 1.0", "timeout = 0"))
        assert await reloader.reload() is None
        assert reloader.settings is before
        assert sorted(center.bridge.links) == ["site-a", "site-b"]
        assert center.center.settings.login_timeout == 30
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_reloads_run_one_at_a_time_and_those_asked_for_meanwhile_are_one(tmp_path: Path) -> None:
    config, center = await started_with(tmp_path, BEFORE)
    try:
        reloader = center.service.reloader  # type: ignore[attr-defined]
        recorder = center.service.getServiceNamed("meter-recorder")
        await reloader.reload()  # past the start-up: the next one runs at once
        real_resync = recorder.resync
        syncs: list[Deferred[None]] = []
        reads: list[str] = []

        def slow_resync(modbus: ModbusSettings) -> Deferred[Any]:
            reads.append("sync")
            gate: Deferred[None] = Deferred()
            syncs.append(gate)
            return gate.addCallback(lambda _: real_resync(modbus))

        recorder.resync = slow_resync
        first = reloader.reload()
        await until(lambda: reads == ["sync"])  # read the file; now waits for its database sync
        config.write_text(AFTER)
        second, third = reloader.reload(), reloader.reload()
        # The others wait for the first, as one reload queued behind it.
        assert reads == ["sync"] and reloader._lock.locked and len(reloader._lock.waiting) == 1
        assert center.bridge.links.keys() == {"site-a", "site-b"}
        syncs[0].callback(None)
        done = await first
        assert done is not None and done.devices == DevicePlan()  # it read the file before the edit
        await until(lambda: len(reads) == 2)  # one more, for both the later ones
        syncs[1].callback(None)
        outcome = await second
        assert outcome is await third and outcome is not None
        assert [link.name for link in outcome.devices.links_added] == ["site-c"]
        assert center.bridge.links.keys() == {"site-a", "site-c"}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_live_settings_reach_what_uses_them(tmp_path: Path) -> None:
    text = f'unknown_dtu = "reject"\ndtu_udp_pending = 5\n[modbus]\nlisten = "{LISTEN}"\n'
    config, center = await started_with(tmp_path, text, "--dtu-udp", "127.0.0.1:0")
    try:
        config.write_text(
            'unknown_dtu = "accept"\ndtu_udp_pending = 7\ncommand_timeout = 2\n'
            '[modbus]\nlisten = "tcp:0:interface=127.0.0.1"\nprobe = "hex:010400000001"\nprobe_after = 1\n'
        )
        outcome = await center.service.reloader.reload()  # type: ignore[attr-defined]
        assert outcome is not None and outcome.need_restart == ()
        assert (center.center.settings.enroll_unknown, center.center.settings.command_timeout) == (True, 2)
        assert center.service.getServiceNamed("dtu-udp").protocol.max_pending == 7  # type: ignore[attr-defined]
        factory = center.bridge._login_factory
        assert factory is not None and factory.probe is not None
        assert (factory.probe.request, factory.probe.after) == (bytes.fromhex("010400000001"), 1)
    finally:
        await center.stop()


def test_a_reload_sets_the_log_files_bounds_for_its_next_rotation(tmp_path: Path) -> None:
    log_file = LogFile.fromFullPath(str(tmp_path / "center.log"), rotateLength=1000, maxRotatedFiles=3)
    try:
        process = OwnProcess(MultiService(), None, log_file)
        process.apply_log_settings(settings("log_rotate_size = 5000\nlog_keep = 7\n"))
        assert (log_file.rotateLength, log_file.maxRotatedFiles) == (5000, 7)
    finally:
        log_file.close()


def test_a_key_taken_out_of_the_file_is_named_where_it_was() -> None:
    before = settings('api = "tcp:1"\n')
    (change,) = changed_settings(before, settings(""))
    assert (change.name, change.where, change.live) == ("api", "center.toml: api (gone: back to its default)", False)


def test_registration_rules_changed_are_applied_live() -> None:
    rule = '\n[[rule]]\nmatch = "prefix:PLANT-"\ntemplate = "eastron-sdm630"\n'
    before = settings(f'[modbus]\nlisten = "{LISTEN}"\n')
    after = settings(f'[modbus]\nlisten = "{LISTEN}"\n' + rule)
    (change,) = changed_settings(before, after)
    assert (change.name, change.where, change.live) == ("modbus.rules", "center.toml: rules", True)
    assert running_settings(before, after).modbus.rules == after.modbus.rules


def test_every_setting_a_reload_may_report_can_be_named() -> None:
    defaults = settings("")
    for name, kind in declared_reloads().items():
        if kind in (Reload.LIVE, Reload.RESTART):
            assert defaults.where(name), name


def own_port_link(port: int, timeout: float = 1.0) -> str:
    return f'[[link]]\nname = "own"\nlisten = "tcp:{port}:interface=127.0.0.1"\ntimeout = {timeout}\n'


@pytest.mark.expected_errors("Listener own cannot listen")
@pytest.mark.expected_errors("Reload: link own of")
@pytest_twisted.ensureDeferred
async def test_a_link_whose_port_will_not_bind_is_tried_again_at_the_next_reload(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    config, center = await started_with(tmp_path, f'[modbus]\nlisten = "{LISTEN}"\n')
    try:
        reloader = center.service.reloader  # type: ignore[attr-defined]
        config.write_text(f'[modbus]\nlisten = "{LISTEN}"\n' + own_port_link(port))
        assert await reloader.reload() is not None
        assert "own" not in center.bridge.links  # logged as not served, not left half there
        blocker.close()
        outcome = await reloader.reload()  # the same file: tried again
        assert [link.name for link in outcome.devices.links_added] == ["own"]
        assert (await center.bridge.listening("own")).getHost().port == port
        # Changed, on the same port: served anew there.
        config.write_text(f'[modbus]\nlisten = "{LISTEN}"\n' + own_port_link(port, timeout=2.0))
        outcome = await reloader.reload()
        assert [link.name for link in outcome.devices.links_changed] == ["own"]
        assert center.bridge.links["own"].settings.timeout == 2.0
        assert (await center.bridge.listening("own")).getHost().port == port
    finally:
        blocker.close()
        await center.stop()
