"""How ModbusBridge wires settings into services, on a memory reactor."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from dtucenter.config import read_settings
from dtucenter.modbus.service import ModbusBridge, PortRecordingEndpoint, ScadaUnitTaken
from tests.modbus.modbus_helpers import SerialOpener, result_of
from tests.support import run_process

CONFIG = """
[modbus]
listen = "tcp:5020:interface=127.0.0.1"

[[link]]
name = "site-a"
registration = "DTU-0001"

[[link]]
name = "yard"
listen = "tcp:20101:interface=127.0.0.1"

[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port=1502"

[[link]]
name = "panel"
serial = "/dev/ttyTEST0"

[[meter]]
name = "m1"
link = "panel"
unit = 1
interval = 5

[[meter.point]]
name = "voltage"
table = "holding"
address = 0
"""


class NoSink:
    def record_values(self, meter, time, values):
        pass

    def record_failure(self, meter, time, reason):
        pass


def test_bridge_builds_listeners_clients_serial_ports_and_the_poller() -> None:
    reactor = MemoryReactorClock()
    open_serial = SerialOpener()
    bridge = ModbusBridge(read_settings(tomllib.loads(CONFIG)).modbus, reactor, NoSink(), open_serial=open_serial)
    bridge.startService()
    assert sorted(port for port, *_ in reactor.tcpServers) == [5020, 20101]
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 1502)]
    assert len(open_serial.ports) == 1
    assert result_of(bridge.listening()).getHost().port == 5020
    assert result_of(bridge.listening("yard")).getHost().port == 20101

    statuses = {status.name: status for status in bridge.link_statuses()}
    assert {name: s.kind for name, s in statuses.items()} == {
        "site-a": "shared", "yard": "listen", "plant": "connect", "panel": "serial",
    }
    assert statuses["panel"].online and statuses["panel"].remote == "/dev/ttyTEST0"
    assert not statuses["site-a"].online
    reactor.advance(0)
    (meter,) = bridge.meter_statuses()
    assert (meter.name, meter.polls, meter.next_poll) == ("m1", 1, 5.0)
    assert bridge.meter_status("m1").link == "panel"
    bridge.stopService()
    assert reactor.getDelayedCalls() == []


@implementer(IStreamServerEndpoint)
class PendingEndpoint:
    def __init__(self) -> None:
        self.listening: Deferred[IListeningPort] = Deferred()

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        return self.listening


@pytest.mark.expected_errors("Listener modbus cannot listen")
def test_a_failure_to_listen_fails_every_waiter_and_leaves_the_service_no_port() -> None:
    endpoint = PendingEndpoint()
    recording = PortRecordingEndpoint(endpoint, "modbus")
    early = recording.when_listening()
    for_the_service = recording.listen(Factory())
    endpoint.listening.errback(CannotListenError("127.0.0.1", 5020, OSError("in use")))
    assert result_of(for_the_service) is None
    assert result_of(early).check(CannotListenError)
    assert result_of(recording.when_listening()).check(CannotListenError)


def test_the_bridge_stands_apart_from_the_rest_of_the_center(tmp_path: Path) -> None:
    # Integration wires the bridge in; the bridge must not reach back. It may share
    # leaf helpers that import nothing of the center (addresses, the event records and hub, time
    # conversions, the junk window, the latency histogram, the login throttle, the settings'
    # declarations, transport handling, the book of pending devices), and the listeners' endpoints,
    # which use only those.
    code = (
        "import sys, dtucenter.modbus.service\n"
        "print(sorted(m for m in sys.modules if m.startswith('dtucenter.') and not m.startswith('dtucenter.modbus')))"
    )
    result = run_process([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    shared = [
        "addresses", "discovery", "events", "isotime", "junk", "latency", "listeners", "setting", "throttle",
        "transports",
    ]
    assert out.strip() == repr([f"dtucenter.{module}" for module in shared])


def test_a_scada_unit_answers_for_one_meter_at_a_time() -> None:
    reactor = MemoryReactorClock()
    served = CONFIG.replace("interval = 5\n", "interval = 5\nscada_unit = 7\n")
    bridge = ModbusBridge(read_settings(tomllib.loads(served)).modbus, reactor, NoSink(), open_serial=SerialOpener())
    [m1] = bridge.poller.meter_settings()
    assert bridge.scada_meter(7) == m1 and bridge.scada_meter(8) is None
    m2 = attrs.evolve(m1, name="m2")
    with pytest.raises(ScadaUnitTaken, match="scada_unit 7 is already the scada_unit of meter 'm1'"):
        bridge.set_meter(m2)
    assert bridge.poller.meter_names() == ["m1"], "refused before it is polled"
    taken = bridge.set_meter_unserved_if_taken(m2)
    assert isinstance(taken, ScadaUnitTaken) and bridge.poller.settings_of("m2").scada_unit is None
    assert bridge.scada_meter(7) == m1, "the unit stays with the meter that held it"
    assert bridge.set_meter_unserved_if_taken(attrs.evolve(m1, interval=6.0)) is None
    bridge.remove_meter("m2")
    bridge.set_meter(attrs.evolve(m1, scada_unit=8))
    bridge.set_meter(m2)
    assert (bridge.scada_meter(7), bridge.scada_meter(8).name) == (m2, "m1")
    bridge.remove_meter("m2")
    assert bridge.scada_meter(7) is None
    result_of(bridge.remove_link("panel"))
    assert bridge.scada_meter(8) is None, "its link's meters went with it"
