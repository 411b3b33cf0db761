"""The Modbus bridge inside the real center, end to end.

The center is started as twistd would start it, from a config file; the
meters are pymodbus servers behind a DTU that dials in with registration
and heartbeat packets, a DTU the center dials, a DTU in Modbus TCP mode and
a serial line (a socat pty pair). What they answer must land in the store
and come out of the HTTP API and the CLI.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest_twisted
from pymodbus.framer import FramerType

from dtucenter import cli
from tests.modbus.interop_support import FakeDtu, PymodbusServer, matches_unit_1, meter_toml, read_back
from tests.support import ApiClient, RunningCenter, eventually, start_center

FULL_METERS = ("m-dialin", "m-connect", "m-tcp", "m-serial")


def one_point_meter(name: str, link: str, unit: int, point: str, table: str, address: int) -> str:
    return (
        f'[[meter]]\nname = "{name}"\nlink = "{link}"\nunit = {unit}\ninterval = 0.2\n'
        f'[[meter.point]]\nname = "{point}"\ntable = "{table}"\naddress = {address}\n\n'
    )


def center_config(plant: PymodbusServer, serial_device: str) -> str:
    return f"""
[modbus]
# --modbus on the command line wins over this
listen = "tcp:0:interface=127.0.0.2"
login_timeout = 5

[[link]]
name = "site-a"
registration = "DTU-0001"
heartbeat = "HB"
timeout = 0.3
retries = 0

[[link]]
name = "site-b"
registration = "DTU-0002"

[[link]]
name = "plant"
connect = "tcp:host=127.0.0.1:port={plant.port}"
timeout = 1.0

[[link]]
name = "yard"
protocol = "tcp"
listen = "tcp:0:interface=127.0.0.1"
heartbeat = "HB"
timeout = 1.0

[[link]]
name = "panel"
serial = "{serial_device}"
baudrate = 9600
timeout = 1.0

""" + "".join([
        # The fake DTU drops whatever is sent to unit 9; site-b's DTU never dials in;
        # holding 900 is not mapped, so every read and write of m-bad gets exception 2.
        one_point_meter("m-bus2", "site-a", 2, "serial", "input", 0),
        one_point_meter("dead", "site-a", 9, "setpoint", "holding", 0),
        one_point_meter("m-offline", "site-b", 1, "setpoint", "holding", 0),
        one_point_meter("m-bad", "plant", 1, "unmapped", "holding", 900),
    ]) + "\n".join([
        meter_toml("m-dialin", "site-a", 1), meter_toml("m-connect", "plant", 1),
        meter_toml("m-tcp", "yard", 1), meter_toml("m-serial", "panel", 1),
    ])


async def latest_poll(api: ApiClient, meter: str) -> dict[str, Any] | None:
    """The values of a meter's latest stored poll, through the API."""
    response = await api.get(f"/api/meters/{meter}/samples?limit=100000")
    assert response.status == 200, response.body
    samples = response.body["samples"]
    if not samples:
        return None
    newest = samples[-1]["time"]
    return {s["point"]: s["value"] for s in samples if s["time"] == newest}


async def stored_poll_matches(api: ApiClient, meter: str) -> bool:
    return matches_unit_1(await latest_poll(api, meter))


@pytest_twisted.ensureDeferred
async def test_meters_on_four_transports_land_in_the_store_api_and_cli(
    tmp_path: Path, db_url: str, meter_server, pty_pair
) -> None:
    site_a_bus = meter_server(FramerType.RTU, units=(1, 2))
    plant = meter_server(FramerType.RTU)  # a DTU in transparent mode as TCP server: RTU frames over TCP
    yard_bus = meter_server(FramerType.SOCKET)
    meter_end, center_end = pty_pair
    meter_server(serial_port=meter_end)
    config = tmp_path / "center.toml"
    config.write_text(center_config(plant, center_end))

    center = await start_center(
        tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url
    )
    dtus: list[FakeDtu] = []
    try:
        assert (await center.bridge.listening()).getHost().host == "127.0.0.1"
        dtus.append(await FakeDtu(silent_units=frozenset({9})).start(await center.modbus_port(), site_a_bus.port))
        yard_dtu = FakeDtu(registration=None, framing="tcp")
        dtus.append(await yard_dtu.start(await center.modbus_port("yard"), yard_bus.port))
        api = center.api()
        for meter in FULL_METERS:
            await eventually(lambda meter=meter: stored_poll_matches(api, meter), f"the stored values of {meter}")
        assert await latest_poll(api, "m-bus2") == {"serial": 502}

        await check_meter_states(api)
        await check_links(api, center_end)
        await check_writes(api, plant, yard_bus)
        check_cli(center.db_url)
        status = await api.get("/api/status")
        assert status.body["counters"]["meter_values_stored"] > 0
        polling = status.body["modbus"]
        links = (await api.get("/api/links")).body["links"]
        assert (polling["links"], polling["links_online"]) == (len(links), sum(link["online"] for link in links))
        assert polling["polls"] > polling["failed"] > 0 and polling["timed_out"] > 0  # unit 9 never answers
        assert polling["request_timeouts"] >= polling["timed_out"]
        assert sum(polling["duration_histogram"].values()) == polling["polls"]
        assert 0 < polling["duration_p50_s"] <= polling["duration_p99_s"]
    finally:
        for dtu in dtus:
            await dtu.stop()
        await center.stop()
    await check_what_outlives_the_config(tmp_path, db_url)


async def check_meter_states(api: ApiClient) -> None:
    listing = await api.get("/api/meters")
    assert listing.status == 200
    assert {m["name"] for m in listing.body["meters"]} == {*FULL_METERS, "m-bus2", "dead", "m-offline", "m-bad"}
    assert all(m["configured"] for m in listing.body["meters"])

    dialin = (await api.get("/api/meters/m-dialin")).body
    assert dialin["link"] == "site-a" and dialin["link_online"] and dialin["link_remote"].startswith("127.0.0.1:")
    assert dialin["last_poll"] is not None and dialin["polls"] > 0
    assert {p["name"] for p in dialin["points"]} >= {"voltage", "energy", "relay"}
    assert next(p for p in dialin["points"] if p["name"] == "voltage")["unit"] == "V"

    async def dead_timed_out() -> dict[str, Any] | None:
        body = (await api.get("/api/meters/dead")).body
        return body if body["last_error"] == "unit 9 did not answer function 3 (1 attempt)" else None

    dead = await eventually(dead_timed_out, "the dead meter's timeout")
    assert dead["failing"] and dead["link_online"] and dead["timeouts_in_a_row"] >= 1
    offline = (await api.get("/api/meters/m-offline")).body
    assert offline["failing"] and offline["last_error"] == "link site-b is offline" and offline["link_online"] is False
    bad = (await api.get("/api/meters/m-bad")).body
    assert bad["last_error"] == "holding 900+1: unit 1 answered function 3 with exception 2 (illegal data address)"

    assert (await api.get("/api/meters/nope")).status == 404
    unknown_point = await api.get("/api/meters/m-dialin/samples?point=nope")
    assert (unknown_point.status, unknown_point.error) == (404, "meter m-dialin has no point 'nope'")
    one = await api.get("/api/meters/m-dialin/samples?point=voltage&limit=1")
    assert [s["value"] for s in one.body["samples"]] == [230.1]
    assert (await api.get("/api/meters/m-dialin/samples?limit=0")).status == 400
    # Newest first, and the latest value of each point, both at least as new as what was stored before.
    before = (await api.get("/api/meters/m-dialin/samples?limit=100000")).body["samples"]
    newest = (await api.get("/api/meters/m-dialin/samples?point=voltage&order=desc&limit=3")).body["samples"]
    times = [s["time"] for s in newest]
    assert times == sorted(times, reverse=True) and times[0] >= before[-1]["time"]
    latest = (await api.get("/api/meters/m-dialin/latest")).body["samples"]
    stored_points = {s["point"] for s in before}
    assert [s["point"] for s in latest] == [p["name"] for p in dialin["points"] if p["name"] in stored_points]
    assert all(s["time"] >= max(b["time"] for b in before if b["point"] == s["point"]) for s in latest)
    assert next(s for s in latest if s["point"] == "voltage")["value"] == 230.1
    assert (await api.get("/api/meters/nope/latest")).status == 404


async def check_links(api: ApiClient, serial_device: str) -> None:
    links = {link["name"]: link for link in (await api.get("/api/links")).body["links"]}
    assert {name: (link["kind"], link["online"]) for name, link in links.items()} == {
        "site-a": ("shared", True), "site-b": ("shared", False), "plant": ("connect", True),
        "yard": ("listen", True), "panel": ("serial", True),
    }
    assert links["site-a"]["remote"].startswith("127.0.0.1:") and links["site-a"]["connected_since"]
    assert links["site-a"]["counters"]["heartbeats"] > 0 and links["yard"]["counters"]["heartbeats"] > 0
    assert links["site-a"]["counters"]["timeouts"] > 0
    assert links["site-a"]["meters"] == ["m-bus2", "dead", "m-dialin"]
    assert links["panel"]["remote"] == serial_device
    assert links["site-b"]["remote"] is None
    assert (await api.get("/api/links/plant")).body["counters"]["responses"] > 0
    assert (await api.get("/api/links/nope")).status == 404


async def check_writes(api: ApiClient, plant: PymodbusServer, yard_bus: PymodbusServer) -> None:
    async def write(meter: str, point: str, value: Any, status: int = 200) -> Any:
        response = await api.post(f"/api/meters/{meter}/write", {"point": point, "value": value})
        assert response.status == status, response.body
        return response.body if status == 200 else response.error

    assert await write("m-connect", "voltage", 231.7) == {"meter": "m-connect", "point": "voltage", "value": 231.7}
    assert await read_back(plant.port, FramerType.RTU, "holding", 0) == [2317]
    await write("m-connect", "relay", False)
    assert await read_back(plant.port, FramerType.RTU, "coil", 2) == [False]
    await write("m-tcp", "total", 4_000_000_000)  # FC 16 through the DTU in Modbus TCP mode
    assert await read_back(yard_bus.port, FramerType.SOCKET, "holding", 10, 2) == [0xEE6B, 0x2800]

    assert await write("nope", "voltage", 1, 404) == "no meter named 'nope'"
    assert await write("m-connect", "nope", 1, 404) == "meter m-connect has no point 'nope'"
    assert await write("m-connect", "voltage", "high", 400) == "voltage takes a number, not 'high'"
    assert "out of range" in await write("m-connect", "voltage", 1e9, 400)
    assert await write("m-connect", "energy", 10**400, 400) == "value out of range for energy"
    assert await write("m-connect", "serial", 1, 400) == "serial is in the read-only input table"
    extra = await api.post("/api/meters/m-connect/write", {"point": "voltage", "value": 1, "unit": 2})
    assert (extra.status, extra.error) == (400, "the body: unknown field unit")
    assert await write("m-offline", "setpoint", 1, 409) == "link site-b is offline"
    assert await write("dead", "setpoint", 1, 504) == "unit 9 did not answer function 6 (1 attempt)"
    refused = await write("m-bad", "unmapped", 1, 502)
    assert refused == "unit 1 answered function 6 with exception 2 (illegal data address)"

    trail = (await api.get("/api/meters/m-connect/writes")).body["writes"]
    assert [(w["point"], w["value"], w["outcome"]) for w in trail] == [("relay", 0.0, "ok"), ("voltage", 231.7, "ok")]
    assert trail[0]["who"] == "admin/api-token"
    [dead_write] = (await api.get("/api/meters/dead/writes")).body["writes"]
    assert (dead_write["outcome"], dead_write["error"]) == ("timeout", "unit 9 did not answer function 6 (1 attempt)")
    assert [w["outcome"] for w in (await api.get("/api/meters/m-bad/writes")).body["writes"]] == ["refused"]


def check_cli(db_url: str) -> None:
    out = io.StringIO()
    assert cli.main(["samples", "--meter", "m-serial", "--point", "voltage", "--limit", "2", "--db", db_url], out) == 0
    header, *rows = out.getvalue().splitlines()
    assert header == "time,meter,point,value"
    assert [row.split(",")[1:] for row in rows] == [["m-serial", "voltage", "230.1"]] * 2
    out = io.StringIO()
    args = ["samples", "--meter", "m-serial", "--point", "relay", "--limit", "1", "--format", "json", "--db", db_url]
    assert cli.main(args, out) == 0
    assert '"value": true' in out.getvalue()


async def check_what_outlives_the_config(tmp_path: Path, db_url: str) -> None:
    """Restarted without any meter configured, the center still serves what was stored."""
    center: RunningCenter = await start_center(tmp_path, db_url=db_url)
    try:
        api = center.api()
        listing = (await api.get("/api/meters")).body["meters"]
        assert listing and not any(m["configured"] for m in listing)
        offline = (await api.get("/api/meters/m-offline")).body
        assert offline["last_error"] == "link site-b is offline" and offline["polls"] is None
        # One row for a meter that failed the same way at every poll, not one per poll.
        [streak] = (await api.get("/api/meters/m-offline/failures")).body["failures"]
        assert streak["reason"] == "link site-b is offline" and streak["count"] >= 3
        assert streak["first"] < streak["last"]
        # Its timeouts are kept. (A poll of it may also have been on the wire when the first center's
        # DTUs hung up: that is a streak of its own, "link site-a disconnected before the answer arrived".)
        dead = (await api.get("/api/meters/dead/failures")).body["failures"]
        assert "unit 9 did not answer function 3 (1 attempt)" in {streak["reason"] for streak in dead}
        voltage = await api.get("/api/meters/m-serial/samples?point=voltage&limit=1")
        assert voltage.body["samples"][0]["value"] == 230.1
        assert (await api.get("/api/links")).body == {"links": []}
        gone = await api.post("/api/meters/m-connect/write", {"point": "voltage", "value": 1})
        assert (gone.status, gone.error) == (404, "no meter named 'm-connect'")
    finally:
        await center.stop()
