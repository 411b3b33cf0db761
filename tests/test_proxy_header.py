"""The PROXY protocol in front of a listener (``haproxy:``), with StringTransport and a Clock.

Headers are fed a byte at a time: TCP may deliver a balancer's header in any number of reads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure

from dtucenter.listeners import (
    HEADER_TIMEOUT,
    V1_MAX,
    V2_SIGNATURE,
    HeaderRead,
    HeaderRefused,
    ProxyHeaderFactory,
    ProxyHeaderParser,
    ProxyHeaderProtocol,
    listening_endpoint,
)
from tests.support import Warnings, logged_warnings

BALANCER = IPv4Address("TCP", "10.0.0.5", 40001)

V1_TCP4 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 20000\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 20000\r\n"


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


V2_TCP4 = v2(0x21, 0x11, bytes([203, 0, 113, 7, 192, 0, 2, 1]) + struct.pack("!HH", 51234, 20000),
             tlvs=b"\x05\x00\x04uniq")  # a PP2_TYPE_UNIQUE_ID TLV, which is skipped
V2_TCP6 = v2(0x21, 0x21, bytes.fromhex("20010db8" + "0" * 22 + "07") + bytes(16) + struct.pack("!HH", 51234, 20000))
V2_LOCAL = v2(0x20, 0x00, b"")


class Recorder(Protocol):
    """The protocol behind the header: what it saw, and when."""

    def __init__(self, addr: IAddress | None) -> None:
        self.built_for = addr
        self.peer_at_connect: IAddress | None = None
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer_at_connect = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class Recorders(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: IAddress | None) -> Recorder:
        self.built.append(Recorder(addr))
        return self.built[-1]


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    with logged_warnings("dtucenter.listeners") as observer:
        yield observer


class Connection:
    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.transport = StringTransportWithDisconnection(peerAddress=BALANCER)
        self.protocol = factory.buildProtocol(BALANCER)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def feed_bytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.protocol.dataReceived(data[i:i + 1])

    @property
    def closed(self) -> bool:
        return not self.transport.connected


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def behind() -> Recorders:
    return Recorders()


@pytest.fixture
def factory(behind: Recorders, clock: Clock) -> Iterator[ProxyHeaderFactory]:
    factory = ProxyHeaderFactory(behind, clock, "tcp:20000")
    factory.doStart()
    yield factory
    factory.doStop()


@pytest.mark.parametrize(("header", "client"), [
    (V1_TCP4, IPv4Address("TCP", "203.0.113.7", 51234)),
    (V1_TCP6, IPv6Address("TCP", "2001:db8::7", 51234)),
    (V2_TCP4, IPv4Address("TCP", "203.0.113.7", 51234)),
    (V2_TCP6, IPv6Address("TCP", "2001:db8::7", 51234)),
], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"])
def test_a_header_fed_byte_by_byte_gives_the_protocol_behind_it_the_client_as_its_peer(
    factory: ProxyHeaderFactory, behind: Recorders, clock: Clock, header: bytes, client: IAddress,
) -> None:
    connection = Connection(factory)
    connection.feed_bytewise(header[:-1])
    assert behind.built == [], "built before the header was whole"
    connection.feed_bytewise(header[-1:] + b"LOGIN")
    [recorder] = behind.built
    assert recorder.built_for == client
    assert recorder.peer_at_connect == client
    assert connection.protocol.getPeer() == client
    assert recorder.received == b"LOGIN"
    assert not connection.closed
    assert clock.getDelayedCalls() == []  # the header's deadline is cancelled
    connection.transport.loseConnection()
    assert recorder.lost


def test_the_bytes_after_the_header_in_the_same_read_reach_the_protocol_behind_it(
    factory: ProxyHeaderFactory, behind: Recorders,
) -> None:
    connection = Connection(factory)
    connection.protocol.dataReceived(V2_TCP4 + b"first")
    connection.protocol.dataReceived(b"second")
    assert behind.built[0].received == b"firstsecond"


def test_writes_and_transport_interfaces_go_to_the_socket(factory: ProxyHeaderFactory, behind: Recorders) -> None:
    connection = Connection(factory)
    connection.protocol.dataReceived(V1_TCP4)
    transport = behind.built[0].transport
    assert transport is connection.protocol
    assert transport is not None
    transport.write(b"ack")
    assert connection.transport.value() == b"ack"
    # What the socket provides, the wrapper provides: the Modbus link turns TCP keepalive on through it.
    assert ITCPTransport.providedBy(connection.transport) == ITCPTransport.providedBy(transport)


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n"],
                         ids=["v2-local", "v1-unknown", "v1-unknown-with-addresses"])
def test_the_balancers_own_connection_keeps_the_balancers_address(
    factory: ProxyHeaderFactory, behind: Recorders, header: bytes,
) -> None:
    connection = Connection(factory)
    connection.feed_bytewise(header)
    assert behind.built[0].peer_at_connect == BALANCER


@pytest.mark.parametrize(("data", "kind"), [
    (b"GET / HTTP/1.1\r\n", "not a PROXY header"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n", "malformed v1 header"),
    (b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n", "v1 header's address is not TCP4"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 065536\r\n", "malformed v1 header"),
    (b"PROXY " + b"x" * 200, "v1 header longer than 107 bytes"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c", "v2 header with version and command 0x31"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2 header of 65551 bytes, more than 4112"),
    (v2(0x21, 0x11, b"\x00" * 6), "v2 header too short for its addresses"),
], ids=["http", "v1-fields", "v1-family", "v1-port", "v1-long", "v2-version", "v2-long", "v2-short"])
def test_a_connection_without_a_valid_header_is_closed_and_nothing_is_built(
    factory: ProxyHeaderFactory, behind: Recorders, warnings: Warnings, data: bytes, kind: str,
) -> None:
    connection = Connection(factory)
    connection.feed_bytewise(data)
    assert connection.closed
    assert behind.built == []
    assert len(warnings.texts) == 1
    assert kind in warnings.texts[0]
    assert "10.0.0.5:40001" in warnings.texts[0]


def test_refused_connections_are_summarised_not_logged_one_by_one(
    factory: ProxyHeaderFactory, clock: Clock, warnings: Warnings,
) -> None:
    for _ in range(50):
        Connection(factory).protocol.dataReceived(b"junk")
    assert len(warnings.texts) == 1, "the first is told at once, the others wait for the summary"
    clock.advance(factory.problems.interval)
    Connection(factory).protocol.dataReceived(b"junk")
    assert len(warnings.texts) == 2
    assert "closed 50 connection(s)" in warnings.texts[1]
    Connection(factory).protocol.dataReceived(b"junk")
    factory.doStop()  # what is left untold is told when the listener stops
    factory.doStart()
    assert len(warnings.texts) == 3
    assert "closed 1 connection(s)" in warnings.texts[2]


def test_a_connection_that_sends_no_header_in_time_is_closed(
    factory: ProxyHeaderFactory, behind: Recorders, clock: Clock, warnings: Warnings,
) -> None:
    connection = Connection(factory)
    connection.protocol.dataReceived(V1_TCP4[:10])
    clock.advance(HEADER_TIMEOUT)
    assert connection.closed
    assert behind.built == []
    assert clock.getDelayedCalls() == []
    assert "no header within" in warnings.texts[0]


def test_a_connection_closed_before_sending_anything_is_no_problem(
    factory: ProxyHeaderFactory, clock: Clock, warnings: Warnings,
) -> None:
    """A balancer's health check connects and closes."""
    connection = Connection(factory)
    connection.transport.loseConnection()
    assert clock.getDelayedCalls() == []
    assert warnings.texts == []
    assert not factory.problems.untold


def test_a_connection_closed_in_the_middle_of_its_header_is_counted(
    factory: ProxyHeaderFactory, clock: Clock, warnings: Warnings,
) -> None:
    connection = Connection(factory)
    connection.protocol.dataReceived(V2_TCP4[:20])
    connection.transport.loseConnection()
    assert clock.getDelayedCalls() == []
    assert "closed in the middle of its header" in warnings.texts[0]


HEADERS = [V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6, V2_LOCAL]


@given(st.sampled_from(HEADERS), st.binary(max_size=40), st.lists(st.integers(1, 200), max_size=20))
def test_the_parser_reads_the_same_header_from_any_reads(header: bytes, rest: bytes, cuts: list[int]) -> None:
    whole = ProxyHeaderParser().feed(header + rest)
    assert isinstance(whole, HeaderRead)
    assert whole.rest == rest
    parser = ProxyHeaderParser()
    stream, result = header + rest, None
    while result is None:
        size = cuts.pop() if cuts else 1
        chunk, stream = stream[:size], stream[size:]
        result = parser.feed(chunk)
    assert isinstance(result, HeaderRead)
    assert result.source == whole.source
    assert result.rest + stream == rest


@given(st.binary(max_size=300))
def test_the_parser_never_raises_and_never_holds_more_than_a_header(data: bytes) -> None:
    parser = ProxyHeaderParser()
    for i in range(len(data)):
        result = parser.feed(data[i:i + 1])
        assert len(parser._buffer) <= V1_MAX or data.startswith(V2_SIGNATURE)
        if result is not None:
            assert isinstance(result, HeaderRead | HeaderRefused)
            return


def test_the_haproxy_prefix_wraps_any_listener_with_the_fleet_backlog() -> None:
    endpoint = listening_endpoint(Clock(), "haproxy:tcp:20000:interface=127.0.0.1")
    inner = endpoint._inner  # type: ignore[attr-defined]
    assert inner._backlog == 4096
    assert inner._interface == "127.0.0.1"
    kept = listening_endpoint(Clock(), "haproxy:tcp:20000:backlog=17")
    assert kept._inner._backlog == 17  # type: ignore[attr-defined]
    assert isinstance(ProxyHeaderFactory(Recorders(), Clock(), "x").buildProtocol(None), ProxyHeaderProtocol)
