"""The link layer over StringTransport: login, replacement, throttling, serial reopening."""

from __future__ import annotations

from typing import Self

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from dtucenter.modbus.config import LinkSettings, SerialSettings
from dtucenter.modbus.errors import LinkDisconnected, LinkOffline
from dtucenter.modbus.links import (
    Link,
    LoginFactory,
    MasterFactory,
    SerialLinkService,
    link_factory,
)
from dtucenter.throttle import LoginThrottle
from tests.modbus.modbus_helpers import (
    SerialOpener,
    byte_by_byte,
    fired,
    holding_response,
    read_holding,
    result_of,
    rtu,
)

LOGIN_TIMEOUT = 30.0


def peer(host: str = "10.1.2.3", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def shared_link(name: str = "site-a", registration: bytes = b"DTU-0001", **kw) -> LinkSettings:
    return LinkSettings(name=name, registration=registration, heartbeat=b"HB", timeout=3.0, retries=0, **kw)


class Listener:
    def __init__(self, *settings: LinkSettings) -> None:
        self.clock = Clock()
        self.links = {s.name: Link(s, self.clock) for s in settings}
        by_registration = {link.settings.registration: link for link in self.links.values()}
        self.factory = LoginFactory(by_registration, self.clock, LOGIN_TIMEOUT)

    def connect(self, host: str = "10.1.2.3", port: int = 40000):
        protocol = self.factory.buildProtocol(peer(host, port))
        transport = StringTransport(peerAddress=peer(host, port))
        protocol.makeConnection(transport)
        return protocol, transport


def close(protocol, transport) -> None:
    """What the reactor does after loseConnection/abortConnection."""
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionError("closed")))


def test_registration_split_then_glued_to_a_response_brings_the_link_online() -> None:
    listener = Listener(shared_link())
    link = listener.links["site-a"]
    protocol, transport = listener.connect()
    assert not link.online
    for byte in byte_by_byte(b"DTU-000"):
        protocol.dataReceived(byte)
    assert not link.online
    protocol.dataReceived(b"1HB")
    assert link.online
    assert link.status().remote == "10.1.2.3:40000"
    assert listener.clock.getDelayedCalls() == [], "login deadline cancelled"

    d = link.request(read_holding(1, 0, 1))
    assert transport.value() == rtu(read_holding(1, 0, 1))
    protocol.dataReceived(rtu(holding_response(1, [5])) + b"HB")
    assert result_of(d).registers == [5]
    counters = link.status().counters
    assert counters["connects"] == 1
    assert counters["heartbeats"] == 2
    assert counters["bytes_in"] == len(b"DTU-0001HB") + len(rtu(holding_response(1, [5]))) + 2


def test_registration_glued_to_the_first_heartbeat_in_one_read() -> None:
    listener = Listener(shared_link())
    protocol, _ = listener.connect()
    protocol.dataReceived(b"DTU-0001HBHB")
    assert listener.links["site-a"].status().counters["heartbeats"] == 2


def test_each_registration_finds_its_own_link() -> None:
    listener = Listener(shared_link("a", b"DTU-A"), shared_link("b", b"DTU-B"))
    protocol, _ = listener.connect()
    protocol.dataReceived(b"DTU-B")
    assert (listener.links["a"].online, listener.links["b"].online) == (False, True)


class Warnings:
    """The warnings the links module logs while it is in use."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "dtucenter.modbus.links" and event.get("log_level") == LogLevel.warn:
            self.events.append(event)

    def __enter__(self) -> Self:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *_: object) -> None:
        globalLogPublisher.removeObserver(self)

    def take(self) -> list[str]:
        texts = [formatEvent(e) for e in self.events]
        self.events.clear()
        return texts


def test_unknown_registration_is_closed_and_a_repeating_one_no_longer_logged() -> None:
    listener = Listener(shared_link())
    with Warnings() as warnings:
        for _ in range(3):
            protocol, transport = listener.connect()
            protocol.dataReceived(b"NOT-A-DTU")
            close(protocol, transport)
        assert len(warnings.take()) == 3
        # Three failures in a row: the next one is closed as well, but not logged.
        protocol, transport = listener.connect()
        protocol.dataReceived(b"NOT-A-DTU")
        close(protocol, transport)
        assert warnings.take() == []
        # The block ends.
        listener.clock.advance(10.0)
        protocol, transport = listener.connect()
        protocol.dataReceived(b"NOT-A-DTU")
        close(protocol, transport)
        assert len(warnings.take()) == 1


def test_a_misconfigured_dtu_does_not_lock_out_a_good_one_behind_the_same_nat_address() -> None:
    listener = Listener(shared_link())
    with Warnings() as warnings:
        # One DTU with a wrong registration redials every 5 s for 75 s from the carrier's NAT address
        # (blocks of 10, 20 and 40 s after its third failure).
        for attempt in range(15):
            protocol, transport = listener.connect(port=30000 + attempt)
            protocol.dataReceived(b"DTU-0009HB")
            close(protocol, transport)
            listener.clock.advance(5.0)
        logged = warnings.take()
        assert len(logged) == 5, "it is throttled: logged at failures 1, 2, 3, then as each block ends"
        # A good DTU behind the same address gets in while that one is blocked.
        protocol, transport = listener.connect(port=40000)
        protocol.dataReceived(b"DTU-0001")
        assert listener.links["site-a"].online and not transport.disconnecting
        # The misconfigured one is still throttled.
        bad, bad_transport = listener.connect(port=30100)
        bad.dataReceived(b"DTU-0009")
        close(bad, bad_transport)
        assert warnings.take() == []
    assert listener.links["site-a"].online
    assert listener.clock.getDelayedCalls() == []


def test_the_throttle_key_holds_a_registration_s_worth_of_what_was_sent() -> None:
    listener = Listener(shared_link())
    with Warnings() as warnings:
        for attempt in range(4):  # the same wrong registration, each time followed by other bytes
            protocol, transport = listener.connect()
            protocol.dataReceived(b"DTU-0009" + bytes([attempt]) * 1000)
            close(protocol, transport)
        # Keyed on a registration's worth of bytes, not on all that came: the fourth is throttled.
        assert len(warnings.take()) == 3


def test_no_registration_within_the_login_timeout_closes() -> None:
    listener = Listener(shared_link())
    protocol, transport = listener.connect()
    protocol.dataReceived(b"DTU")
    listener.clock.advance(LOGIN_TIMEOUT - 1)
    assert not transport.disconnecting
    listener.clock.advance(1)
    assert transport.disconnecting
    close(protocol, transport)
    protocol.dataReceived(b"-0001")  # arriving while the close is under way
    assert not listener.links["site-a"].online
    assert listener.clock.getDelayedCalls() == []


def test_throttle_doubles_the_block_and_forgives_a_good_login() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock, threshold=2, block=10.0, max_block=25.0)
    assert throttle.failed("h") == 0
    assert throttle.failed("h") == 10.0
    assert throttle.failed("h") == 20.0
    assert throttle.failed("h") == 25.0
    assert throttle.blocked("h")
    clock.advance(25.0)
    assert not throttle.blocked("h")
    throttle.succeeded("h")
    assert throttle.failed("h") == 0


def test_throttle_forgets_the_oldest_hosts_first() -> None:
    throttle = LoginThrottle(Clock(), threshold=1, max_tracked=2)
    for host in ("a", "b", "c"):
        throttle.failed(host)
    assert not throttle.blocked("a")
    assert throttle.blocked("b") and throttle.blocked("c")


def test_reconnecting_dtu_replaces_its_older_connection() -> None:
    listener = Listener(shared_link())
    link = listener.links["site-a"]
    old, old_transport = listener.connect(port=1111)
    old.dataReceived(b"DTU-0001")
    pending = link.request(read_holding(1, 0, 1))

    new, new_transport = listener.connect(port=2222)
    new.dataReceived(b"DTU-0001")
    assert old_transport.disconnecting, "the older connection is closed"
    assert link.status().remote == "10.1.2.3:2222"
    close(old, old_transport)  # its close arrives after the new login
    assert result_of(pending).check(LinkDisconnected)
    assert link.online, "the late close of the old connection does not take the new one down"

    d = link.request(read_holding(1, 0, 1))
    assert new_transport.value() == rtu(read_holding(1, 0, 1))
    new.dataReceived(rtu(holding_response(1, [8])))
    assert result_of(d).registers == [8]
    assert link.status().counters["connects"] == 2


def test_offline_link_fails_fast_and_disconnect_fires_when_gone() -> None:
    listener = Listener(shared_link())
    link = listener.links["site-a"]
    assert result_of(link.request(read_holding(1, 0, 1))).check(LinkOffline)
    assert fired(link.disconnect())

    protocol, transport = listener.connect()
    protocol.dataReceived(b"DTU-0001")
    gone = link.disconnect()
    assert transport.disconnecting and not fired(gone)
    close(protocol, transport)
    assert fired(gone)
    status = link.status()
    assert (status.online, status.last_disconnect) == (False, 0.0)
    assert result_of(link.request(read_holding(1, 0, 1))).check(LinkOffline)


def test_dedicated_port_without_registration_attaches_at_once() -> None:
    clock = Clock()
    link = Link(LinkSettings(name="yard", listen="tcp:0", retries=0), clock)
    factory = link_factory(link, clock, LOGIN_TIMEOUT)
    assert isinstance(factory, MasterFactory)
    protocol = factory.buildProtocol(peer())
    protocol.makeConnection(StringTransport(peerAddress=peer()))
    assert link.online


def test_dedicated_port_with_registration_expects_it() -> None:
    clock = Clock()
    link = Link(LinkSettings(name="yard", listen="tcp:0", registration=b"R1"), clock)
    factory = link_factory(link, clock, LOGIN_TIMEOUT)
    assert isinstance(factory, LoginFactory)
    protocol = factory.buildProtocol(peer())
    transport = StringTransport(peerAddress=peer())
    protocol.makeConnection(transport)
    protocol.dataReceived(b"R2")
    assert transport.disconnecting and not link.online


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A StringTransport that is TCP, as the reactor's connections are."""

    keep_alive = False

    def setTcpKeepAlive(self, enabled: int) -> None:
        self.keep_alive = bool(enabled)


def test_tcp_connections_get_keepalive_and_other_transports_are_left_alone() -> None:
    clock = Clock()
    link = Link(LinkSettings(name="yard", listen="tcp:0"), clock)
    tcp = TCPStringTransport(peerAddress=peer())
    link.build_master().makeConnection(tcp)
    assert link.online and tcp.keep_alive
    link.build_master().makeConnection(StringTransport(peerAddress=peer("10.1.2.4")))  # no keep-alive to set
    assert link.online and link.status().remote == "10.1.2.4:40000"
    assert tcp.disconnecting, "replaced"


def test_link_status_is_json_ready() -> None:
    status = Link(shared_link(), Clock()).status().as_json()
    assert status["name"] == "site-a"
    assert status["kind"] == "shared"
    assert status["online"] is False
    assert status["counters"]["requests"] == 0


# -- serial ---------------------------------------------------------------------------


@pytest.fixture
def serial_setup():
    clock = Clock()
    link = Link(LinkSettings(name="panel", serial=SerialSettings("/dev/ttyUSB9")), clock)
    opener = SerialOpener()
    service = SerialLinkService(link, clock, open_port=opener, initial_delay=1.0, max_delay=4.0)
    return clock, link, opener, service


def test_serial_port_that_cannot_open_is_retried_with_backoff(serial_setup) -> None:
    clock, link, opener, service = serial_setup
    opener.fail_next = 3
    service.startService()
    assert not link.online
    clock.advance(1.0)
    clock.advance(2.0)
    assert not link.online
    clock.advance(4.0)
    assert link.online
    assert link.status().remote == "/dev/ttyUSB9"
    service.stopService()
    assert not link.online
    assert clock.getDelayedCalls() == []


def test_vanished_serial_port_is_reopened(serial_setup) -> None:
    clock, link, opener, service = serial_setup
    service.startService()
    d = link.request(read_holding(1, 0, 1))
    opener.ports[0].loseConnection()  # USB adapter unplugged
    assert result_of(d).check(LinkDisconnected)
    clock.advance(1.0)
    assert link.online and len(opener.ports) == 2
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_stopping_while_waiting_to_reopen_cancels_the_retry(serial_setup) -> None:
    clock, _link, opener, service = serial_setup
    opener.fail_next = 1
    service.startService()
    service.stopService()
    assert clock.getDelayedCalls() == []
