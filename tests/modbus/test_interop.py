"""The bridge against real, independent peers: pymodbus's server over TCP, over a socat pty
pair, and behind a fake DTU that dials in; all on loopback with the real reactor."""

from __future__ import annotations

import tomllib

import pytest
import pytest_twisted
from pymodbus.framer import FramerType
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from dtucenter.config import read_settings
from dtucenter.modbus.errors import ModbusExceptionResponse
from dtucenter.modbus.service import ModbusBridge
from tests.modbus.interop_support import (
    FakeDtu,
    WaitingSink,
    matches_unit_1,
    meter_toml,
)
from tests.modbus.modbus_helpers import read_input


async def start_bridge(toml: str, sink: WaitingSink, **options) -> ModbusBridge:
    bridge = ModbusBridge(read_settings(tomllib.loads(toml)).modbus, reactor, sink, **options)
    bridge.startService()
    return bridge


# -- the center dials the DTU: Modbus TCP and transparent RTU ---------------------------------


@pytest.mark.parametrize(("protocol", "framer"), [("tcp", FramerType.SOCKET), ("rtu", FramerType.RTU)])
@pytest_twisted.ensureDeferred
async def test_meter_reached_over_an_outgoing_connection(meter_server, protocol: str, framer: FramerType) -> None:
    server = meter_server(framer)
    toml = f"""
[[link]]
name = "plant"
protocol = "{protocol}"
connect = "tcp:host=127.0.0.1:port={server.port}"
timeout = 2.0
""" + meter_toml("m1", "plant", 1)
    sink = WaitingSink()
    bridge = await start_bridge(toml, sink)
    try:
        await sink.wait_for("values of m1", lambda: matches_unit_1(sink.latest("m1")))
        status = bridge.links["plant"].status()
        assert status.online and status.remote.startswith("127.0.0.1:")
        assert status.counters["requests"] >= 4, "holding, input, coil and discrete blocks"

        await bridge.write("m1", "voltage", 231.7)
        await bridge.write("m1", "relay", False)
        await sink.wait_for(
            "the written values to be read back",
            lambda: (sink.latest("m1") or {}).get("voltage") == 231.7 and sink.latest("m1")["relay"] is False,
        )
        await bridge.write("m1", "total", 4_000_000_000)
        await sink.wait_for("an FC 16 write to be read back", lambda: sink.latest("m1")["total"] == 4_000_000_000)
    finally:
        await bridge.stopService()
    assert not bridge.links["plant"].online


@pytest_twisted.ensureDeferred
async def test_exception_responses_of_a_real_server_are_recorded(meter_server) -> None:
    server = meter_server()
    toml = f"""
[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port={server.port}"

[[meter]]
name = "gappy"
link = "plant"
unit = 1
interval = 0.2

[[meter.point]]
name = "present"
table = "holding"
address = 0

[[meter.point]]
name = "absent"
table = "input"
address = 900
"""
    sink = WaitingSink()
    bridge = await start_bridge(toml, sink)
    try:
        refused = "input 900+1: unit 1 answered function 4 with exception 2 (illegal data address)"
        await sink.wait_for("the exception for gappy", lambda: refused in sink.reasons("gappy"))
        # Until the outgoing connection is up, polls find the link offline.
        assert set(sink.reasons("gappy")) <= {refused, "link plant is offline"}
        assert sink.latest("gappy") == {"present": 2301}
        with pytest.raises(ModbusExceptionResponse) as caught:
            await bridge.links["plant"].request(read_input(1, 900))
        assert caught.value.exception_code == 2
    finally:
        await bridge.stopService()


# -- a local serial line ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_meter_on_a_serial_line(meter_server, pty_pair) -> None:
    meter_end, center_end = pty_pair
    meter_server(serial_port=meter_end)
    toml = f"""
[[link]]
name = "panel"
serial = "{center_end}"
baudrate = 9600
timeout = 1.0
""" + meter_toml("m1", "panel", 1)
    sink = WaitingSink()
    bridge = await start_bridge(toml, sink)
    try:
        await sink.wait_for("values of m1 over the pty", lambda: matches_unit_1(sink.latest("m1")))
        assert bridge.links["panel"].status().remote == center_end
        await bridge.write("m1", "offset", -7)
        await sink.wait_for("the write over the pty", lambda: sink.latest("m1")["offset"] == -7)
    finally:
        await bridge.stopService()
    assert not bridge.links["panel"].online


# -- DTUs that dial the center ------------------------------------------------------------------


def shared_toml(prefix: bool = False, with_dead_meter: bool = False) -> str:
    return f"""
[modbus]
listen = "tcp:0:interface=127.0.0.1"
login_timeout = 5

[[link]]
name = "site-a"
registration = "DTU-0001"
registration_prefix = {str(prefix).lower()}
heartbeat = "HB"
timeout = 0.3
retries = 0

[[link]]
name = "site-b"
registration = "hex:00FF00FF"

[[meter]]
name = "m2"
link = "site-a"
unit = 2
interval = 0.2

[[meter.point]]
name = "serial"
table = "input"
address = 0

""" + (DEAD_METER if with_dead_meter else "") + meter_toml("m1", "site-a", 1)


# Unit 9 never answers: the fake DTU drops whatever is sent to it.
DEAD_METER = """
[[meter]]
name = "dead"
link = "site-a"
unit = 9
interval = 0.2

[[meter.point]]
name = "serial"
table = "input"
address = 0
"""


@pytest.mark.parametrize("prefix", [False, True], ids=["registration-once", "registration-prefix"])
@pytest_twisted.ensureDeferred
async def test_meters_behind_a_dtu_that_dials_in(meter_server, prefix: bool) -> None:
    bus = meter_server(FramerType.RTU, units=(1, 2))
    sink = WaitingSink()
    bridge = await start_bridge(shared_toml(prefix, with_dead_meter=True), sink)
    dtu = None
    try:
        port = (await bridge.listening()).getHost().port
        dtu = await FakeDtu(prefix=prefix, silent_units=SILENT).start(port, bus.port)
        await sink.wait_for("values of m1", lambda: matches_unit_1(sink.latest("m1")))
        await sink.wait_for("values of m2", lambda: sink.latest("m2") == {"serial": 502})
        await sink.wait_for(
            "unit 9 timing out", lambda: "unit 9 did not answer function 4 (1 attempt)" in sink.reasons("dead")
        )
        status = bridge.links["site-a"].status()
        assert status.online and status.remote.startswith("127.0.0.1:")
        assert status.counters["heartbeats"] > 0
        assert status.counters["timeouts"] > 0
        assert not bridge.links["site-b"].online
        assert sink.reasons("m1") in ([], ["link site-a is offline"] * len(sink.reasons("m1")))
    finally:
        if dtu is not None:
            await dtu.stop()
        await bridge.stopService()


@pytest_twisted.ensureDeferred
async def test_a_dtu_that_drops_mid_request_and_comes_back(meter_server) -> None:
    bus = meter_server(FramerType.RTU, units=(1, 2))
    sink = WaitingSink()
    bridge = await start_bridge(shared_toml(), sink)
    dtus: list[FakeDtu] = []
    try:
        port = (await bridge.listening()).getHost().port
        dtus.append(await FakeDtu(silent_units=SILENT).start(port, bus.port))
        await sink.wait_for("values of m1", lambda: matches_unit_1(sink.latest("m1")))
        dtus[0].drop_on_request = True
        earlier = len(sink.failures)

        def since_drop() -> set[str]:
            return {reason for _, _, reason in sink.failures[earlier:]}

        await sink.wait_for(
            "the poll cut short by the hang-up",
            lambda: "link site-a disconnected before the answer arrived" in since_drop(),
        )
        await sink.wait_for("polls to find the link offline", lambda: "link site-a is offline" in since_drop())
        assert not bridge.links["site-a"].online
        values_before = len(sink.values)
        dtus.append(await FakeDtu(silent_units=SILENT).start(port, bus.port))
        await sink.wait_for("values after the DTU came back", lambda: len(sink.values) > values_before + 2)
        assert bridge.links["site-a"].status().counters["connects"] == 2
    finally:
        for dtu in dtus:
            await dtu.stop()
        await bridge.stopService()


@pytest_twisted.ensureDeferred
async def test_a_reconnecting_dtu_replaces_its_older_connection(meter_server) -> None:
    bus = meter_server(FramerType.RTU, units=(1, 2))
    sink = WaitingSink()
    bridge = await start_bridge(shared_toml(), sink)
    dtus: list[FakeDtu] = []
    try:
        port = (await bridge.listening()).getHost().port
        dtus.append(await FakeDtu(silent_units=SILENT).start(port, bus.port))
        await sink.wait_for("values of m1", lambda: sink.latest("m1") is not None)
        dtus.append(await FakeDtu(silent_units=SILENT).start(port, bus.port))
        await dtus[0].center.lost  # the center closed the older connection
        values_before = len(sink.values)
        await sink.wait_for("values over the new connection", lambda: len(sink.values) > values_before + 2)
        local_port = dtus[1].center.transport.getHost().port
        assert bridge.links["site-a"].status().remote == f"127.0.0.1:{local_port}"
    finally:
        for dtu in dtus:
            await dtu.stop()
        await bridge.stopService()


SILENT = frozenset({9})


class _Probe(Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_unknown_registration_is_closed(meter_server) -> None:
    sink = WaitingSink()
    bridge = await start_bridge(shared_toml(), sink)
    try:
        port = (await bridge.listening()).getHost().port
        probe = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Probe())
        probe.transport.write(b"DTU-0009")
        guard = reactor.callLater(10, probe.transport.abortConnection)
        await probe.lost
        assert guard.active(), "the center closed the connection, not the guard"
        guard.cancel()
        assert not any(link.online for link in bridge.links.values())
    finally:
        await bridge.stopService()


@pytest_twisted.ensureDeferred
async def test_dtu_in_modbus_tcp_mode_on_a_dedicated_port(meter_server) -> None:
    bus = meter_server(FramerType.SOCKET)
    toml = """
[[link]]
name = "yard"
protocol = "tcp"
listen = "tcp:0:interface=127.0.0.1"
heartbeat = "HB"
timeout = 1.0
""" + meter_toml("m1", "yard", 1)
    sink = WaitingSink()
    bridge = await start_bridge(toml, sink)
    dtu = None
    try:
        port = (await bridge.listening("yard")).getHost().port
        dtu = await FakeDtu(registration=None, framing="tcp").start(port, bus.port)
        await sink.wait_for("values of m1 through the Modbus TCP DTU", lambda: matches_unit_1(sink.latest("m1")))
        assert bridge.links["yard"].status().counters["heartbeats"] > 0
    finally:
        if dtu is not None:
            await dtu.stop()
        await bridge.stopService()
