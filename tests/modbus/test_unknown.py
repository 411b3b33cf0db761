"""Unknown registrations on the shared listener, on a memory reactor, bytes fed one at a time:
held as pending and handed to a link added later with no reconnect; the registration window;
the bounds; rules and the policies; the pending book's expiry, refusal summary and batches."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from dtucenter.config import read_settings
from dtucenter.discovery import MODBUS, PendingBook, PendingDevice, PendingLimits
from dtucenter.modbus.config import LinkSettings
from dtucenter.modbus.rules import Adoption, unknown_policy
from dtucenter.modbus.service import ModbusBridge
from tests.modbus.modbus_helpers import holding_response, read_holding, result_of, rtu

PORT = 5020
IMEI = b"864512034567891"


class Sink:
    def record_values(self, meter: str, time: float, values: Any) -> None:
        pass

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        pass


class MemoryStore:
    """The book's durable copy, as lists: each save is one batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[PendingDevice], list[str]]] = []

    def load_pending(self) -> defer.Deferred[list[PendingDevice]]:
        return defer.succeed([])

    def save_pending(self, saved: Sequence[PendingDevice], removed: Sequence[str], expired_before: float
                     ) -> defer.Deferred[None]:
        self.batches.append((list(saved), list(removed)))
        return defer.succeed(None)


class Adopter:
    def __init__(self, bridge: ModbusBridge) -> None:
        self.bridge = bridge
        self.asked: list[tuple[bytes, Adoption]] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def adopt_registration(self, registration: bytes, adoption: Adoption, why: str) -> defer.Deferred[None]:
        self.asked.append((registration, adoption))
        return self.done


class Running:
    def __init__(self, extra: str = "", limits: PendingLimits | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.store = MemoryStore()
        self.book = PendingBook(self.reactor, limits or PendingLimits(), self.store)
        settings = read_settings(tomllib.loads(f'[modbus]\nlisten = "tcp:{PORT}"\n{extra}')).modbus
        self.bridge = ModbusBridge(settings, self.reactor, Sink(), book=self.book)
        self.bridge.startService()
        self.book.start()
        self.open: dict[int, tuple[Any, StringTransport]] = {}

    def dial(self, host: str = "10.1.2.3", port: int = 40000) -> tuple[Any, StringTransport]:
        (factory,) = [f for p, f, *_ in self.reactor.tcpServers if p == PORT]
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.open[id(transport)] = (protocol, transport)
        return protocol, transport

    def feed(self, protocol: Any, data: bytes) -> None:
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])

    def lose(self, transport: StringTransport) -> None:
        assert transport.disconnecting
        protocol, _ = self.open.pop(id(transport))
        protocol.connectionLost(Failure(ConnectionError("closed")))

    def stop(self) -> None:
        result_of(self.book.stop())
        self.bridge.stopService()
        for protocol, _ in list(self.open.values()):
            protocol.connectionLost(Failure(ConnectionError("closed")))
        assert self.reactor.getDelayedCalls() == []


def test_an_unknown_registration_is_held_then_handed_to_the_link_made_for_it() -> None:
    running = Running()
    protocol, transport = running.dial()
    running.feed(protocol, IMEI)
    assert running.book.devices() == [], "the registration is read to the end of its window first"
    running.reactor.advance(0.5)
    (device,) = running.book.devices()
    assert (device.kind, device.registration, device.peer, device.first_bytes) == (
        MODBUS, IMEI, "10.1.2.3:40000", IMEI
    )
    running.feed(protocol, b"www.usr.cn" * 20)  # heartbeats while pending: dropped
    running.reactor.advance(3600)  # no login timeout for a held connection
    assert not transport.disconnecting and transport.value() == b""

    running.bridge.add_link(LinkSettings(name=IMEI.decode(), registration=IMEI, timeout=2.0, retries=0))
    link = running.bridge.links[IMEI.decode()]
    assert link.online, "the held connection is the link's, with no reconnect"
    answer = link.request(read_holding(1, 0, 1))
    assert transport.value() == rtu(read_holding(1, 0, 1))
    running.feed(protocol, rtu(holding_response(1, [230])))
    assert result_of(answer).registers == [230]
    assert running.bridge.unknown.held == 0
    assert running.book.devices() == [], "a link takes it: no longer pending"
    running.stop()


def test_what_starts_like_a_known_registration_is_decided_at_the_login_timeout() -> None:
    running = Running('\n[[link]]\nname = "a"\nregistration = "DTU-0001"\n')
    protocol, transport = running.dial()
    running.feed(protocol, b"DTU-0")
    running.reactor.advance(1)
    assert running.book.devices() == []
    running.reactor.advance(30)
    assert [d.registration for d in running.book.devices()] == [b"DTU-0"]
    assert not transport.disconnecting
    running.stop()


def test_pending_devices_are_bounded_per_host_and_a_flood_pushes_out_no_other_host() -> None:
    running = Running(limits=PendingLimits(per_host=3, total=10))
    other, _ = running.dial(host="10.9.9.9")
    running.feed(other, b"OTHER-1")
    running.reactor.advance(0.5)
    refused = []
    for i in range(20):
        protocol, transport = running.dial(port=41000 + i)
        running.feed(protocol, b"RANDOM-%d" % i)
        running.reactor.advance(0.5)
        if transport.disconnecting:
            refused.append(transport)
            running.lose(transport)
    assert len(refused) == 17
    by_host = sorted((d.host, d.registration) for d in running.book.devices())
    assert by_host == [("10.1.2.3", b"RANDOM-0"), ("10.1.2.3", b"RANDOM-1"), ("10.1.2.3", b"RANDOM-2"),
                       ("10.9.9.9", b"OTHER-1")]
    # One summary line for the refusals, not one per connection.
    logged: list[str] = []

    def observe(event: LogEvent) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        running.book.expire()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [line for line in logged if "Refused" in line] == [
        "Refused 17 new unknown device(s) from 10.1.2.3: it has 3 pending (at most 3), 4 pending in all (at most 10)"
    ]
    running.stop()


def test_a_redial_replaces_the_held_connection_and_counts_as_seen_again() -> None:
    running = Running()
    first, first_transport = running.dial(port=40001)
    running.feed(first, IMEI)
    running.reactor.advance(0.5)
    second, _ = running.dial(port=40002)
    running.feed(second, IMEI)
    running.reactor.advance(0.5)
    assert first_transport.disconnecting
    running.lose(first_transport)
    (device,) = running.book.devices()
    assert (device.times_seen, device.peer) == (2, "10.1.2.3:40002")
    assert running.bridge.unknown.held == 1
    running.stop()


def test_dropping_or_expiring_a_pending_device_closes_its_held_connection() -> None:
    running = Running(limits=PendingLimits(expire_after=100.0))
    protocol, transport = running.dial()
    running.feed(protocol, IMEI)
    running.reactor.advance(0.5)
    running.reactor.advance(99)
    assert not transport.disconnecting
    running.reactor.advance(60)  # the expiry round after it went unseen for 100 s
    assert running.book.devices() == [] and transport.disconnecting
    running.lose(transport)
    assert running.bridge.unknown.held == 0
    running.stop()


def test_book_writes_are_coalesced_into_batches() -> None:
    clock = Clock()
    store = MemoryStore()
    book = PendingBook(clock, PendingLimits(flush_interval=1.0), store)
    book.start()
    for port in range(100):  # one DTU redialling a hundred times within a second
        book.sighted(MODBUS, IMEI, host="10.1.2.3", peer=f"10.1.2.3:{port}", listener="modbus", first_bytes=IMEI)
    clock.advance(1.0)
    ((saved, removed),) = store.batches
    assert [(d.registration, d.times_seen) for d in saved] == [(IMEI, 100)] and removed == []
    clock.advance(1.0)
    assert len(store.batches) == 1, "nothing changed: nothing written"
    result_of(book.stop())
    assert clock.getDelayedCalls() == []


def test_a_rule_or_the_adopt_policy_asks_for_an_adoption_and_holds_the_connection() -> None:
    running = Running('\n[[rule]]\nmatch = "regex:[0-9]{15}"\ntemplate = "eastron-sdm120"\naccount = "acme"\n')
    adopter = Adopter(running.bridge)
    running.bridge.unknown.adopter = adopter
    protocol, transport = running.dial()
    running.feed(protocol, IMEI + b"HB")  # the rule says where the registration ends
    running.reactor.advance(0.5)
    assert adopter.asked == [(IMEI, Adoption("acme", "eastron-sdm120", 1, 10.0, "rtu"))]
    assert running.book.devices() == [] and not transport.disconnecting
    adopter.done.errback(Failure(ValueError("no account 'acme'")))
    assert transport.disconnecting, "an adoption that failed closes the connection"
    running.lose(transport)

    running.bridge.unknown.policy = unknown_policy("adopt:ops")
    protocol, transport = running.dial()
    running.feed(protocol, b"SITE-1")
    running.reactor.advance(0.5)
    assert adopter.asked[-1] == (b"SITE-1", Adoption("ops", None))
    running.stop()


def test_under_reject_an_unknown_registration_is_closed_at_once() -> None:
    running = Running('unknown_registration = "reject"\n')
    protocol, transport = running.dial()
    running.feed(protocol, b"NOBODY")
    assert transport.disconnecting and running.book.devices() == []
    running.lose(transport)
    running.stop()


def test_a_reload_hands_the_new_policy_and_window_to_the_next_unknown_dtu() -> None:
    running = Running()
    before, before_transport = running.dial(port=40001)
    running.feed(before, b"EARLY-1")
    running.reactor.advance(0.5)
    new = read_settings(tomllib.loads(f'[modbus]\nlisten = "tcp:{PORT}"\nunknown_registration = "reject"\n'
                                      "registration_window = 2\n")).modbus
    running.bridge.apply_settings(new)
    protocol, transport = running.dial(port=40002)
    running.feed(protocol, b"LATE-1")
    assert transport.disconnecting, "refused at once under reject"
    running.lose(transport)
    assert not before_transport.disconnecting, "what was pending stays pending"
    assert [d.registration for d in running.book.devices()] == [b"EARLY-1"]
    running.bridge.apply_settings(attrs.evolve(new, unknown_registration=unknown_policy("pending")))
    protocol, transport = running.dial(port=40003)
    running.feed(protocol, b"LATER-1")
    running.reactor.advance(1.9)
    assert len(running.book.devices()) == 1, "the new window is two seconds"
    running.reactor.advance(0.1)
    assert len(running.book.devices()) == 2
    running.stop()
