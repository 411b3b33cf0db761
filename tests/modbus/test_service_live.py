"""Links and meters added, changed and removed while the bridge runs, on a memory reactor."""

from __future__ import annotations

import tomllib

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dtucenter.config import read_settings
from dtucenter.modbus.config import LinkSettings, MeterSettings
from dtucenter.modbus.poller import UnknownMeter
from dtucenter.modbus.service import LinkConflict, ModbusBridge, UnknownLink
from tests.modbus.modbus_helpers import holding_response, read_holding, result_of, rtu

SHARED_PORT = 5020

DEVICES = """
[modbus]
listen = "tcp:5020:interface=127.0.0.1"

[[link]]
name = "site-a"
registration = "DTU-0001"
timeout = 2

[[link]]
name = "yard"
listen = "tcp:20101:interface=127.0.0.1"

[[meter]]
name = "m1"
link = "site-a"
unit = 1
interval = 10

[[meter.point]]
name = "voltage"
table = "holding"
address = 0

[[meter]]
name = "m1-current"
link = "site-a"
unit = 1
interval = 10

[[meter.point]]
name = "current"
table = "holding"
address = 6
"""

_parsed = read_settings(tomllib.loads(DEVICES)).modbus
SITE_A, YARD = _parsed.links
M1, M1_CURRENT = _parsed.meters


class Sink:
    def __init__(self) -> None:
        self.values: list[tuple[str, float, dict[str, object]]] = []
        self.failures: list[tuple[str, str]] = []

    def record_values(self, meter, time, values):
        self.values.append((meter, time, dict(values)))

    def record_failure(self, meter, time, reason):
        self.failures.append((meter, reason))


class Bridge:
    """A running bridge with no device yet, and a way to dial its shared listener."""

    def __init__(self, config: str = '[modbus]\nlisten = "tcp:5020:interface=127.0.0.1"\n') -> None:
        self.reactor = MemoryReactorClock()
        self.sink = Sink()
        self.bridge = ModbusBridge(read_settings(tomllib.loads(config)).modbus, self.reactor, self.sink)
        self.bridge.startService()
        self.protocols: dict[int, object] = {}
        self.open: dict[int, StringTransport] = {}

    def dial(self, data: bytes, port: int = SHARED_PORT) -> StringTransport:
        (factory,) = [f for p, f, *_ in self.reactor.tcpServers if p == port]
        address = IPv4Address("TCP", "10.1.2.3", 40000)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        self.protocols[id(transport)] = protocol
        self.open[id(transport)] = transport
        return transport

    def closed(self, transport: StringTransport) -> None:
        """What the reactor does after loseConnection."""
        assert transport.disconnecting
        del self.open[id(transport)]
        self.protocols[id(transport)].connectionLost(Failure(ConnectionError("closed")))

    def stop(self) -> None:
        self.bridge.stopService()
        for transport in list(self.open.values()):
            self.closed(transport)
        assert self.reactor.getDelayedCalls() == []


def test_a_shared_link_added_while_running_accepts_its_registration_at_once() -> None:
    running = Bridge()
    refused = running.dial(b"DTU-0001")
    assert refused.disconnecting  # unknown for now
    running.closed(refused)

    running.bridge.add_link(SITE_A)
    accepted = running.dial(b"DTU-0001")
    assert not accepted.disconnecting
    assert running.bridge.links["site-a"].online
    running.stop()


def test_a_meter_added_while_running_is_polled_and_a_change_uses_its_new_points_from_the_next_slot() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    dtu = running.dial(b"DTU-0001")
    running.bridge.set_meter(M1)
    running.reactor.advance(0)
    assert dtu.value() == rtu(read_holding(1, 0, 1))
    dtu.clear()
    running.protocols[id(dtu)].dataReceived(rtu(holding_response(1, [2301])))
    assert [(m, v) for m, _, v in running.sink.values] == [("m1", {"voltage": 2301.0})]
    next_poll = running.bridge.meter_status("m1").next_poll
    assert next_poll == 10.0

    current = attrs.evolve(M1_CURRENT, name="m1")
    running.bridge.set_meter(current)
    assert running.bridge.meter_status("m1").next_poll == next_poll  # the schedule is kept
    running.reactor.advance(9.5)
    assert dtu.value() == b""
    running.reactor.advance(0.5)
    assert dtu.value() == rtu(read_holding(1, 6, 1))
    running.protocols[id(dtu)].dataReceived(rtu(holding_response(1, [52])))
    assert running.sink.values[-1][2] == {"current": 52.0}
    running.stop()


def test_a_new_interval_applies_from_the_next_slot_of_the_new_period() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    running.bridge.set_meter(M1)
    running.reactor.advance(0)  # first poll: the link is offline
    running.reactor.advance(3)
    running.bridge.set_meter(attrs.evolve(M1, interval=5.0))
    assert running.bridge.meter_status("m1").next_poll == 5.0
    running.bridge.set_meter(attrs.evolve(M1, interval=2.0))
    assert running.bridge.meter_status("m1").next_poll == 4.0
    running.stop()


def test_a_removed_link_closes_its_connection_refuses_its_registration_and_stops_its_meters() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    running.bridge.set_meter(M1)
    running.bridge.set_meter(M1_CURRENT)
    dtu = running.dial(b"DTU-0001")
    gone = running.bridge.remove_link("site-a")
    running.closed(dtu)
    assert result_of(gone) is None
    assert running.bridge.poller.meter_names() == []
    assert "site-a" not in running.bridge.links
    again = running.dial(b"DTU-0001")
    assert again.disconnecting
    running.closed(again)
    running.reactor.advance(100)
    assert running.sink.values == [] and running.sink.failures == []
    running.stop()


def test_a_meter_removed_during_its_poll_is_not_reported() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    dtu = running.dial(b"DTU-0001")
    running.bridge.set_meter(M1)
    running.reactor.advance(0)
    running.bridge.remove_meter("m1")
    running.protocols[id(dtu)].dataReceived(rtu(holding_response(1, [2301])))
    assert running.sink.values == []
    with pytest.raises(UnknownMeter):
        running.bridge.remove_meter("m1")
    running.stop()


def test_a_changed_link_is_served_anew_and_its_meters_follow_it() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    running.bridge.set_meter(M1)
    dtu = running.dial(b"DTU-0001")
    gone = running.bridge.update_link(attrs.evolve(SITE_A, registration=b"DTU-0002"))
    running.closed(dtu)
    assert result_of(gone) is None
    old = running.dial(b"DTU-0001")
    assert old.disconnecting
    running.closed(old)
    new = running.dial(b"DTU-0002")
    assert not new.disconnecting
    running.reactor.advance(10)
    assert new.value() == rtu(read_holding(1, 0, 1))
    assert running.bridge.poller.meter_names() == ["m1"]
    running.stop()


def test_a_listen_link_opens_and_closes_its_own_port_while_running() -> None:
    running = Bridge()
    running.bridge.add_link(YARD)
    assert result_of(running.bridge.listening("yard")).getHost().port == 20101
    dtu = running.dial(b"", port=20101)
    assert running.bridge.links["yard"].online
    gone = running.bridge.remove_link("yard")
    running.closed(dtu)
    assert result_of(gone) is None
    assert running.reactor.tcpServers[-1][0] == 20101
    with pytest.raises(KeyError):
        running.bridge.listening("yard")
    running.stop()


def test_conflicting_links_and_meters_on_unknown_links_are_refused() -> None:
    running = Bridge()
    running.bridge.add_link(SITE_A)
    with pytest.raises(LinkConflict, match="a link named 'site-a' exists"):
        running.bridge.add_link(SITE_A)
    with pytest.raises(LinkConflict, match="cannot be told apart from b'DTU-0001' of link 'site-a'"):
        running.bridge.add_link(attrs.evolve(SITE_A, name="site-b"))
    with pytest.raises(LinkConflict, match="cannot be told apart"):
        running.bridge.add_link(attrs.evolve(SITE_A, name="site-b", registration=b"DTU-00011"))
    running.bridge.add_link(attrs.evolve(SITE_A, name="site-b", registration=b"DTU-0002"))
    with pytest.raises(LinkConflict, match="of link 'site-a'"):
        running.bridge.update_link(attrs.evolve(SITE_A, name="site-b", registration=b"DTU-000"))
    assert running.bridge.links["site-b"].settings.registration == b"DTU-0002"  # refused changes change nothing
    with pytest.raises(UnknownLink):
        running.bridge.set_meter(attrs.evolve(M1, link="nowhere"))
    with pytest.raises(UnknownLink):
        running.bridge.remove_link("nowhere")
    running.stop()

    without_listener = Bridge(config="")
    with pytest.raises(LinkConflict, match="listener is off"):
        without_listener.bridge.add_link(SITE_A)
    assert without_listener.reactor.tcpServers == []
    without_listener.stop()


def test_the_bridge_built_from_settings_serves_the_same_devices_as_added_ones() -> None:
    running = Bridge(config=DEVICES)
    assert sorted(running.bridge.links) == ["site-a", "yard"]
    assert sorted(running.bridge.poller.meter_names()) == ["m1", "m1-current"]
    assert isinstance(SITE_A, LinkSettings) and isinstance(M1, MeterSettings)
    running.stop()
