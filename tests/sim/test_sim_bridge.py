"""The serial bridge against a real pty pair made by socat and a real TCP listener."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from simtools import wait_for
from twisted.internet import protocol, reactor
from twisted.internet.serialport import SerialPort

from dtucenter.sim.bridge import SerialBridge
from dtucenter.sim.links import TCPConnector
from dtucenter.sim.stats import SimStats
from tests.modbus.interop_support import PtyPair


class _Center(protocol.Protocol):
    received = b""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Meter(protocol.Protocol):
    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest.fixture
def pty_pair(tmp_path: Path) -> Any:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (.ci/run installs it)")
    pair = PtyPair(links=(str(tmp_path / "bridge"), str(tmp_path / "meter")))
    yield pair.ends
    pair.close()


@pytest_twisted.inlineCallbacks
def test_bytes_are_relayed_both_ways_after_the_registration(pty_pair: tuple[str, str]) -> Any:
    bridge_end, meter_end = pty_pair
    factory = protocol.Factory.forProtocol(_Center)
    factory.connections = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    stats = SimStats()
    bridge = SerialBridge(b"DTU-0042", reactor, stats, heartbeat=b"HB", heartbeat_interval=30)
    bridge_serial = SerialPort(bridge.serial_protocol, bridge_end, reactor, baudrate=9600)
    meter = _Meter()
    meter_serial = SerialPort(meter, meter_end, reactor, baudrate=9600)
    connector = TCPConnector(reactor, bridge, ("127.0.0.1", port.getHost().port), None, random.Random(1))
    connector.startService()
    try:
        yield wait_for(lambda: factory.connections and factory.connections[0].received == b"DTU-0042",
                       "the registration packet")
        center = factory.connections[0]
        center.transport.write(b"\x01\x03\x00\x00\x00\x01\x84\x0a")
        yield wait_for(lambda: meter.received == b"\x01\x03\x00\x00\x00\x01\x84\x0a", "the request on the serial line")
        meter.transport.write(b"\x01\x03\x02\x00\x2a\x38\x5b")
        yield wait_for(lambda: center.received.endswith(b"\x01\x03\x02\x00\x2a\x38\x5b"), "the answer at the center")
        assert stats.counts["bytes_to_serial"] == 8 and stats.counts["bytes_to_center"] == 7
    finally:
        yield connector.stopService()
        bridge_serial.loseConnection()
        meter_serial.loseConnection()
        yield port.stopListening()
