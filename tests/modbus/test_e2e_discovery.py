"""Discovery end to end over real sockets, on SQLite and PostgreSQL: a DTU with an unknown IMEI
registration shows up as pending, an account finds it by that registration and adopts it with a
template, and its values are stored with no restart and on the same TCP connection; another
account sees none of it; a flood of random registrations from one address neither fills the
table nor pushes out another address's device nor locks out a good DTU behind the same address;
rules and the ``adopt:`` and ``reject`` policies."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from pymodbus.framer import FramerType
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from dtucenter import cli
from dtucenter.store import meters as device_meters
from dtucenter.store import pending as pending_rows
from tests.modbus.interop_support import FakeDtu, PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import ApiClient, RunningCenter, eventually, make_account, start_center

IMEI = b"864512034567891"
SHARED = ("--modbus", "tcp:0:interface=127.0.0.1")


async def pending(api: ApiClient, query: str = "") -> list[dict[str, Any]]:
    response = await api.get(f"/api/pending{query}")
    assert response.status == 200, response.body
    return list(response.body["pending"])


async def link_remote(api: ApiClient, link: str) -> str | None:
    body = (await api.get(f"/api/links/{link}")).body
    return body.get("remote") if body.get("online") else None


@pytest_twisted.ensureDeferred
async def test_an_unknown_dtu_is_pending_then_adopted_and_polled_on_the_same_connection(
    tmp_path: Path, db_url: str
) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, *SHARED, db_url=db_url)
    dtu = FakeDtu(registration=IMEI, registration_alone=True)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")
        await dtu.start(await center.modbus_port(), bus.port)
        assert dtu.center is not None
        local = f"127.0.0.1:{dtu.center.transport.getHost().port}"

        listed = await eventually(lambda: pending(admin), "the unknown DTU listed as pending")
        assert [(d["kind"], d["registration"], d["peer"]) for d in listed] == [("modbus", IMEI.decode(), local)]
        assert listed[0]["first_bytes"] == IMEI.hex() and listed[0]["times_seen"] == 1
        # An account browses nothing; it finds its device by the registration it was given.
        assert await pending(acme) == []
        found = await pending(acme, f"?registration={IMEI.decode()}")
        assert [d["id"] for d in found] == [listed[0]["id"]]
        device_id = found[0]["id"]
        # Written to the database in the next batch.
        stored = await eventually(lambda: center.store.read(pending_rows.list_pending), "the pending row")
        assert [(d.id, d.registration) for d in stored] == [(device_id, IMEI)]

        taken = await beta.post(f"/api/pending/{device_id}/adopt", {"account": "acme"})
        assert taken.status == 403, "an account adopts only into itself"
        adopted = await acme.post(
            f"/api/pending/{device_id}/adopt", {"template": "eastron-sdm120", "unit": 1, "interval": 0.2}
        )
        assert adopted.status == 201, adopted.body
        name = IMEI.decode()
        assert adopted.body == {"adopted": device_id, "link": name, "meter": name, "account": "acme"}

        values = await eventually(lambda: latest_poll(acme, name), "the adopted meter's values stored")
        assert values == SDM120_VALUES
        # The very connection the DTU opened: no reconnect.
        assert await link_remote(acme, name) == local
        assert not dtu.center.lost.called

        assert await pending(admin) == []
        await eventually(lambda: _no_rows(center), "the pending row deleted")
        audit = await center.store.read(lambda s: device_meters.list_operations(s, "adopt", name, 10))
        assert [(a.who, a.outcome) for a in audit] == [("acme/ops", "ok")]

        # Another account sees none of it, through any endpoint.
        assert await pending(beta, f"?registration={name}") == []
        assert (await beta.get("/api/links")).body == {"links": []}
        assert (await beta.get("/api/meters")).body == {"meters": []}
        for path in (f"/api/links/{name}", f"/api/meters/{name}", f"/api/meters/{name}/samples",
                     f"/api/meters/{name}/latest"):
            assert (await beta.get(path)).status == 404, path
        assert (await beta.post(f"/api/pending/{device_id}/adopt", {})).status == 404
        assert (await acme.post(f"/api/pending/{device_id}/adopt", {})).status == 404, "adopted once"
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


async def _no_rows(center: RunningCenter) -> bool:
    return not await center.store.read(pending_rows.list_pending)


class _Dialer(Protocol):
    def __init__(self, first: bytes) -> None:
        self.first = first

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.first)


async def dial(port: int, data: bytes, bind: str = "127.0.0.1") -> _Dialer:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(bind, 0)), _Dialer(data))


@pytest_twisted.ensureDeferred
async def test_a_flood_of_random_registrations_from_one_address_is_bounded(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    config = tmp_path / "center.toml"
    config.write_text(
        '[[link]]\nname = "good"\nregistration = "GOOD-0001"\n\n'
        '[[meter]]\nname = "good-1"\nlink = "good"\nunit = 1\ninterval = 0.2\ntemplate = "eastron-sdm120"\n'
    )
    center = await start_center(
        tmp_path, *SHARED, "--config", str(config), "--pending-per-host", "5", db_url=db_url
    )
    other = FakeDtu(registration=b"OTHER-HOST-1", registration_alone=True, bind="127.0.0.2")
    good = FakeDtu(registration=b"GOOD-0001")
    flood: list[_Dialer] = []
    try:
        admin = center.api()
        port = await center.modbus_port()
        await other.start(port, bus.port)
        await eventually(lambda: pending(admin), "the other address's device pending")
        for _ in range(40):
            flood.append(await dial(port, b"RND-" + secrets.token_hex(8).encode()))
        await eventually(lambda: _pending_from(admin, "127.0.0.1", 5), "the flooding address at its share")
        await deferLater(reactor, 1.0, lambda: None)  # every flood connection decided by now
        listed = await pending(admin)
        assert sum(d["peer"].startswith("127.0.0.1:") for d in listed) == 5
        assert [d["registration"] for d in listed if d["peer"].startswith("127.0.0.2:")] == ["OTHER-HOST-1"]
        assert center.bridge.unknown.held == 6
        assert (await admin.get("/api/status")).body["modbus"]["held_connections"] == 6
        await eventually(lambda: _rows(center, 6), "the table holding the same six, no more")
        assert await _pending_gauge(admin) == 6

        # A good DTU behind the flooding address is served.
        await good.start(port, bus.port)
        values = await eventually(lambda: latest_poll(admin, "good-1"), "the good DTU polled")
        assert values == SDM120_VALUES
    finally:
        for dialer in flood:
            if dialer.transport is not None:
                dialer.transport.loseConnection()
        await good.stop()
        await other.stop()
        await center.stop()
        bus.stop()


async def _pending_gauge(api: ApiClient) -> float:
    """``dtucenter_pending_devices`` as the API's /metrics shows it."""
    response = await treq.get(api.base + "/metrics", headers={"Authorization": f"Bearer {api.token}"},
                              pool=api.pool)
    assert response.code == 200
    text = (await treq.content(response)).decode()
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == "dtucenter_pending_devices")
    (sample,) = family.samples
    return sample.value


async def _pending_from(api: ApiClient, host: str, count: int) -> bool:
    return sum(d["peer"].startswith(host + ":") for d in await pending(api)) == count


@pytest_twisted.ensureDeferred
async def test_a_rule_adopts_a_matching_registration_on_first_contact(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    config = tmp_path / "center.toml"
    config.write_text('[[rule]]\nmatch = "regex:[0-9]{15}"\ntemplate = "eastron-sdm120"\ninterval = 0.2\n'
                      'account = "acme"\n')
    center = await start_center(tmp_path, *SHARED, "--config", str(config), db_url=db_url)
    # The FakeDtu glues a heartbeat to its registration: the rule says where the IMEI ends.
    dtu = FakeDtu(registration=IMEI)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        await dtu.start(await center.modbus_port(), bus.port)
        name = IMEI.decode()
        await eventually(lambda: _meter_named(acme, name), "the rule's meter made")
        assert await eventually(lambda: latest_poll(acme, name), "the rule's meter polled") == SDM120_VALUES
        assert dtu.center is not None and not dtu.center.lost.called
        shown = (await acme.get(f"/api/links/{name}")).body
        assert shown["account"] == "acme" and shown["managed_by"] == "api"
        assert await pending(admin) == []
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


@pytest_twisted.ensureDeferred
async def test_the_adopt_policy_makes_every_unknown_registration_a_link(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(
        tmp_path, *SHARED, "--unknown-registration", "adopt:admin:eastron-sdm120", db_url=db_url
    )
    dtu = FakeDtu(registration=b"SITE-77", registration_alone=True)
    try:
        admin = center.api()
        await dtu.start(await center.modbus_port(), bus.port)
        meter = await eventually(lambda: _meter_named(admin, "SITE-77"), "the policy's meter")
        assert meter["account"] == "admin" and meter["definition"]["template"] == "eastron-sdm120"
        assert await link_remote(admin, "SITE-77") is not None
        assert dtu.center is not None and not dtu.center.lost.called
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


async def _meter_named(api: ApiClient, name: str) -> dict[str, Any] | None:
    response = await api.get(f"/api/meters/{name}")
    return response.body if response.status == 200 else None


@pytest_twisted.ensureDeferred
async def test_the_reject_policy_closes_an_unknown_registration(tmp_path: Path) -> None:
    center = await start_center(tmp_path, *SHARED, "--unknown-registration", "reject")
    try:
        dialer = await dial(await center.modbus_port(), b"NOBODY-1")
        lost = _lost(dialer)
        await lost
        assert await pending(center.api()) == []
    finally:
        await center.stop()


def _lost(dialer: _Dialer) -> Any:
    from twisted.internet.defer import Deferred

    gone: Deferred[None] = Deferred()
    original = dialer.connectionLost

    def lost(reason: Any = None) -> None:
        original(reason)
        gone.callback(None)

    dialer.connectionLost = lost  # type: ignore[method-assign]
    return gone


@pytest_twisted.ensureDeferred
async def test_pending_devices_offline_with_the_cli_taken_up_at_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, *SHARED)
    url = center.db_url
    dtu = FakeDtu(registration=IMEI, registration_alone=True)
    stranger = FakeDtu(registration=b"STRANGER-9", registration_alone=True)
    try:
        await dtu.start(await center.modbus_port(), bus.port)
        await stranger.start(await center.modbus_port(), bus.port)
        await eventually(lambda: _rows(center, 2), "both pending in the database")
    finally:
        await dtu.stop()
        await stranger.stop()
        await center.stop()
    status, listed = run_cli("pending", "list", "--json", "--db", url)
    devices = {d["registration"]: d["id"] for d in json.loads(listed)["pending"]}
    assert status == 0 and set(devices) == {IMEI.decode(), "STRANGER-9"}
    assert run_cli("pending", "adopt", "nope", "--db", url)[0] == 1
    assert "no pending device 'nope'" in capsys.readouterr().err
    assert run_cli("pending", "adopt", devices[IMEI.decode()], "--template", "eastron-sdm120", "--interval", "0.2",
                   "--account", "nobody", "--db", url)[0] == 1
    assert "no account 'nobody'" in capsys.readouterr().err
    adopted = run_cli("pending", "adopt", devices[IMEI.decode()], "--template", "eastron-sdm120", "--interval", "0.2",
                      "--db", url)
    name = IMEI.decode()
    assert adopted == (0, f"adopted link {name} with meter {name} (served from the center's next start)\n")
    assert run_cli("pending", "drop", devices["STRANGER-9"], "--db", url) == (
        0, f"dropped pending device {devices['STRANGER-9']}\n")
    assert run_cli("pending", "list", "--db", url)[1].splitlines()[1:] == []

    center = await start_center(tmp_path, *SHARED)
    dtu = FakeDtu(registration=IMEI, registration_alone=True)
    try:
        await dtu.start(await center.modbus_port(), bus.port)
        values = await eventually(lambda: latest_poll(center.api(), IMEI.decode()), "the CLI's adoption served")
        assert values == SDM120_VALUES
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


async def _rows(center: RunningCenter, count: int) -> bool:
    return len(await center.store.read(pending_rows.list_pending)) == count


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


def worked_example() -> str:
    """The shell commands of docs/api.md's seed-002 flow, as the reader would paste them."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text.split("### The whole flow, from sign-up to stored values", 1)[1].split("\n#", 1)[0]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    return "\n".join(lines) + "\n"


@pytest_twisted.ensureDeferred
async def test_the_worked_example_of_the_docs_runs_as_written(tmp_path: Path) -> None:
    from twisted.internet.utils import getProcessOutputAndValue

    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, *SHARED)
    dtu = FakeDtu(registration=IMEI, registration_alone=True)
    try:
        await dtu.start(await center.modbus_port(), bus.port)
        await eventually(lambda: pending(center.api()), "the DTU pending")
        script = worked_example().replace("http://127.0.0.1:8080", f"http://127.0.0.1:{center.api_port}")
        assert (tmp_path / "dtucenter.token").exists()
        out, err, status = await getProcessOutputAndValue(
            "/bin/bash", ("-euo", "pipefail", "-c", script), env={"PATH": "/usr/bin:/bin"}, path=str(tmp_path)
        )
        assert status == 0, (out, err)
        assert b'"link": "864512034567891", "meter": "864512034567891", "account": "acme"' in out, out
        acme = (await center.api().get("/api/accounts/acme")).body
        assert acme["meters"] == 1
        values = await eventually(lambda: latest_poll(center.api(), IMEI.decode()), "the values stored")
        assert values == SDM120_VALUES
        assert dtu.center is not None and not dtu.center.lost.called
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


@pytest_twisted.ensureDeferred
async def test_an_account_the_policy_or_a_rule_names_but_the_database_lacks_is_reported_at_start(
    tmp_path: Path,
) -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher

    config = tmp_path / "center.toml"
    config.write_text('[[rule]]\nmatch = "prefix:SITE-"\ntemplate = "eastron-sdm120"\naccount = "ghost"\n')
    said: list[str] = []

    def observe(event: LogEvent) -> None:
        said.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        center = await start_center(
            tmp_path, *SHARED, "--config", str(config), "--unknown-registration", "adopt:nobody"
        )
        await center.stop()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert sorted(line for line in said if "yet" in line) == [
        "--unknown-registration: no account 'nobody' yet: adoptions into it fail until it is made",
        "rule prefix:SITE-: no account 'ghost' yet: adoptions into it fail until it is made",
    ]


@pytest_twisted.ensureDeferred
async def test_an_account_adopts_with_a_template_of_its_own(tmp_path: Path) -> None:
    from tests.test_account_templates import TEMPLATE

    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, *SHARED)
    dtu = FakeDtu(registration=IMEI, registration_alone=True)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")
        assert (await acme.post("/api/templates", TEMPLATE)).status == 201
        await dtu.start(await center.modbus_port(), bus.port)
        (device,) = await eventually(lambda: pending(acme, f"?registration={IMEI.decode()}"), "pending")
        theirs = await beta.post(f"/api/pending/{device['id']}/adopt", {"template": TEMPLATE["name"]})
        assert theirs.status == 400 and TEMPLATE["name"] in theirs.error, "another account's template"
        adopted = await acme.post(f"/api/pending/{device['id']}/adopt", {"template": TEMPLATE["name"], "interval": 0.2})
        assert adopted.status == 201, adopted.body
        values = await eventually(lambda: latest_poll(acme, IMEI.decode()), "the own template's values")
        assert values == {"volts": SDM120_VALUES["voltage"]}
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


@pytest_twisted.ensureDeferred
async def test_an_adoption_the_bridge_refuses_leaves_the_device_pending(tmp_path: Path) -> None:
    config = tmp_path / "center.toml"
    config.write_text('[[link]]\nname = "longer"\nregistration = "DTU-0011"\n')
    center = await start_center(tmp_path, *SHARED, "--config", str(config), "--login-timeout", "1")
    try:
        admin = center.api()
        # The start of a known registration: decided at the login timeout, pending.
        dialer = await dial(await center.modbus_port(), b"DTU-001")
        (device,) = await eventually(lambda: pending(admin), "the prefix pending")
        await eventually(lambda: _rows(center, 1), "its row")
        refused = await admin.post(f"/api/pending/{device['id']}/adopt", {"template": "eastron-sdm120"})
        assert refused.status == 409 and "cannot be told apart" in refused.error, refused.body
        assert [d["id"] for d in await pending(admin)] == [device["id"]]
        assert (await admin.get("/api/links/DTU-001")).status == 404
        assert (await admin.get("/api/meters/DTU-001")).status == 404
        await eventually(lambda: _rows(center, 1), "its row written again")
        assert dialer.transport is not None
        dialer.transport.loseConnection()
    finally:
        await center.stop()
