"""The event hub, and what the DTU and Modbus halves tell it, with StringTransport and task.Clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dtucenter.dtu import wire
from dtucenter.dtu.center import DTUCenter
from dtucenter.dtu.session import DTUFactory, DTUProtocol
from dtucenter.events import (
    DtuOffline,
    DtuOnline,
    Event,
    EventHub,
    LinkDown,
    LinkUp,
    MeterFailed,
    MeterRead,
    UploadStored,
)
from dtucenter.modbus.config import LinkSettings
from dtucenter.modbus.links import Link, LoginFactory
from dtucenter.modbus.points import Value
from dtucenter.modbus.service import PublishingSink
from dtucenter.store.db import open_engine
from dtucenter.store.dtus import DtuStore
from tests.stores import HeldStore

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def heard(hub: EventHub) -> list[Event]:
    events: list[Event] = []
    hub.subscribe(events.append)
    return events


def test_listeners_hear_events_in_order_until_they_stop() -> None:
    hub = EventHub()
    assert not hub.listening
    first: list[Event] = []
    stop_first = hub.subscribe(first.append)
    second = heard(hub)
    assert hub.listening
    online = DtuOnline(1, "10.0.0.1:5000", T0)
    hub.publish(online)
    stop_first()
    stop_first()  # twice is harmless
    offline = DtuOffline(1, "10.0.0.1:5000", T0)
    hub.publish(offline)
    assert first == [online]
    assert second == [online, offline]


@pytest.mark.expected_errors("A listener failed on UploadStored")
def test_a_failing_listener_is_logged_and_the_others_still_hear() -> None:
    hub = EventHub()

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    hub.subscribe(broken)
    after = heard(hub)
    event = UploadStored(7, T0, (1, 2))
    hub.publish(event)  # does not raise into the publisher
    assert after == [event]


def test_a_listener_may_unsubscribe_while_hearing() -> None:
    hub = EventHub()
    calls: list[Event] = []

    def once(event: Event) -> None:
        calls.append(event)
        stop()

    stop = hub.subscribe(once)
    later = heard(hub)
    hub.publish(LinkDown("a", T0))
    hub.publish(LinkDown("b", T0))
    assert [e.link for e in calls if isinstance(e, LinkDown)] == ["a"]
    assert len(later) == 2


# -- the DTU half ----------------------------------------------------------------------------


class DtuHarness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(T0.timestamp())
        self.store = HeldStore(open_engine(f"sqlite:///{tmp_path / 'events.db'}"))
        self.hub = EventHub()
        self.center = DTUCenter(DtuStore(self.store), self.clock, events=self.hub)  # type: ignore[arg-type]
        self.factory = DTUFactory(self.center, self.clock)

    def connect(self) -> tuple[DTUProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.8.7", 4000))
        protocol.makeConnection(transport)
        return protocol, transport

    @staticmethod
    def feed(protocol: DTUProtocol, *messages: wire.Message) -> None:
        for byte in b"".join(wire.encode_frame(m) for m in messages):
            protocol.dataReceived(bytes([byte]))


@pytest.fixture
def dtu(tmp_path: Path) -> Iterator[DtuHarness]:
    harness = DtuHarness(tmp_path)
    yield harness
    harness.store.engine.dispose()


def test_a_dtu_is_told_online_its_upload_once_stored_and_offline(dtu: DtuHarness) -> None:
    events = heard(dtu.hub)
    dtu.store.add_dtu(42, password=7)
    protocol, _ = dtu.connect()
    dtu.feed(protocol, wire.Login(42, 7, "HS121", 1, "CCID"))
    assert events == [DtuOnline(42, "10.9.8.7:4000", T0)]
    dtu.store.hold = True
    dtu.clock.advance(1.5)
    dtu.feed(protocol, wire.SendTest(20, 5, (10, 20, 30)))
    assert len(events) == 1, "an upload is told once it is stored, not when it arrives"
    dtu.store.release()
    assert events[1] == UploadStored(42, T0 + dt.timedelta(seconds=1.5), (10, 20, 30))
    protocol.connectionLost(None)  # type: ignore[arg-type]
    assert isinstance(events[2], DtuOffline) and events[2].psn == 42
    assert dtu.clock.getDelayedCalls() == []


@pytest.mark.expected_errors("could not be stored")
def test_an_upload_that_failed_to_store_is_not_told(dtu: DtuHarness) -> None:
    events = heard(dtu.hub)
    dtu.store.add_dtu(42, password=7)
    protocol, _ = dtu.connect()
    dtu.feed(protocol, wire.Login(42, 7, "HS121", 1, "CCID"))
    dtu.store.hold = True
    dtu.feed(protocol, wire.SendTest(20, 5, (1,)))
    dtu.store.fail()
    assert [type(e) for e in events] == [DtuOnline]
    protocol.connectionLost(None)  # type: ignore[arg-type]


def test_a_refused_login_is_not_told(dtu: DtuHarness) -> None:
    events = heard(dtu.hub)
    dtu.store.add_dtu(42, password=7)
    protocol, _ = dtu.connect()
    dtu.feed(protocol, wire.Login(42, 8, "HS121", 1, "CCID"))
    protocol.connectionLost(None)  # type: ignore[arg-type]
    assert events == []


# -- the Modbus half -------------------------------------------------------------------------


def test_a_link_is_told_up_when_its_dtu_registers_and_down_when_it_goes() -> None:
    clock = Clock()
    clock.advance(T0.timestamp())
    hub = EventHub()
    events = heard(hub)
    link = Link(LinkSettings(name="site-a", registration=b"DTU-1"), clock, events=hub)
    factory = LoginFactory({b"DTU-1": link}, clock, 30.0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.1.1", 1234))
    protocol.makeConnection(transport)
    for byte in b"DTU-1":
        protocol.dataReceived(bytes([byte]))
    assert events == [LinkUp("site-a", "10.1.1.1:1234", T0)]
    clock.advance(2)
    protocol.connectionLost(None)
    assert events[1] == LinkDown("site-a", T0 + dt.timedelta(seconds=2))


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, object]] = []

    def record_values(self, meter: str, time: float, values: dict[str, Value]) -> None:
        self.calls.append(("values", meter, time, dict(values)))

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        self.calls.append(("failure", meter, time, reason))


def test_poll_outcomes_reach_the_store_and_the_listeners() -> None:
    hub = EventHub()
    sink = RecordingSink()
    publishing = PublishingSink(sink, hub)
    publishing.record_values("m1", T0.timestamp(), {"voltage": 230.5})  # nobody listens yet: still stored
    events = heard(hub)
    publishing.record_values("m1", T0.timestamp(), {"voltage": 231.0})
    publishing.record_failure("m1", T0.timestamp() + 10, "timeout")
    assert [call[0] for call in sink.calls] == ["values", "values", "failure"]
    assert events == [
        MeterRead("m1", T0, {"voltage": 231.0}),
        MeterFailed("m1", T0 + dt.timedelta(seconds=10), "timeout"),
    ]
