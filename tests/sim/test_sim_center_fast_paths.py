"""The center changes the load benchmark led to: one row per upload, and pausing only a deep inbox."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from sqlalchemy.orm import Session
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dtucenter.dtu import wire
from dtucenter.dtu.center import CenterSettings, DTUCenter, upload_row
from dtucenter.dtu.session import INBOX_LIMIT, DTUProtocol, write_now
from dtucenter.listeners import ProxyHeaderFactory
from dtucenter.store import queries
from dtucenter.store.db import open_engine
from dtucenter.store.facade import SAMPLES, _MultiRowInsert
from tests.support import until

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def test_upload_rows_read_back_one_sample_per_value(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'c.db'}")
    registers = (wire.Register(1, 5), wire.Register(2, 6))
    rows = [
        upload_row(7, NOW, wire.SendTest(20, 1, (1, -2)), registers),
        upload_row(7, NOW, wire.SendTest(21, 2, (3, 4, 5)), registers),  # list does not match
        upload_row(7, NOW + dt.timedelta(seconds=1), wire.SendTest(22, 3, ()), ()),
        upload_row(7, NOW + dt.timedelta(seconds=2), wire.SendTest(23, 4, (-32768, 32767)), ()),
    ]
    with Session(engine) as session, session.begin():
        _MultiRowInsert(engine, SAMPLES, queries.SAMPLE_ROW_COLUMNS)(session, rows)
    with Session(engine) as session:
        samples = queries.query_samples(session, 7)
        assert [(s.net_state, s.position, s.dev, s.addr, s.value) for s in samples] == [
            (20, 0, 1, 5, 1), (20, 1, 2, 6, -2),
            (21, 0, None, None, 3), (21, 1, None, None, 4), (21, 2, None, None, 5),
            (23, 0, None, None, -32768), (23, 1, None, None, 32767),
        ]
        assert samples[0].time == NOW
        assert len(queries.query_samples(session, 7, limit=3)) == 3
        assert [s.value for s in queries.query_samples(session, 7, since=NOW + dt.timedelta(seconds=1))] == [
            -32768, 32767]
    engine.dispose()


class _PendingStore:
    """A store whose commits never finish (until the test says so)."""

    def __init__(self) -> None:
        self.uploads: list[Deferred[None]] = []

    def write(self, job: Any) -> Deferred[Any]:
        return Deferred()

    def add_samples(self, rows: list[Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.uploads.append(d)
        return d

    def add_samples_then(self, rows: list[Any], settle: Callable[[Failure | None], None]) -> None:
        self.add_samples(rows).addBoth(lambda result: settle(result if isinstance(result, Failure) else None))


def test_reading_pauses_only_when_the_inbox_is_deep_and_resumes_when_it_drains() -> None:
    clock = Clock()
    store = _PendingStore()
    center = DTUCenter(store, clock, CenterSettings())  # type: ignore[arg-type]
    protocol = DTUProtocol(center, clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    session = protocol.session
    session.state = session.ONLINE  # logged in (login itself is the foundation's business)
    session.psn = 9
    session.tick_time = 60

    def upload(code: int) -> None:
        for byte in wire.encode_frame(wire.SendTest(20, code, (code,))):
            protocol.dataReceived(bytes([byte]))

    upload(1)
    assert transport.producerState == "producing"  # one upload waiting for its commit: keep reading
    for code in range(2, INBOX_LIMIT + 2):
        upload(code)
    assert transport.producerState == "paused"
    acked = 0
    while store.uploads:
        store.uploads.pop(0).callback(None)
        acked += 1
    assert transport.producerState == "producing"
    acks = wire.FrameParser().feed(transport.value())
    assert [a.test_code for a in acks] == list(range(1, INBOX_LIMIT + 2))
    assert acked == INBOX_LIMIT + 1
    protocol.connectionLost()
    assert clock.getDelayedCalls() == []


class _Writers:
    """The part of a reactor a TCP transport tells what it waits for; only writing matters here."""

    def __init__(self) -> None:
        self.writers: set[Any] = set()

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass


def test_replies_go_out_at_once_and_what_the_socket_refuses_follows_in_order() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setblocking(False)
    clock, reactor = Clock(), _Writers()
    protocol = DTUProtocol(DTUCenter(_PendingStore(), clock, CenterSettings()), clock)  # type: ignore[arg-type]
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    protocol.makeConnection(transport)
    try:
        protocol.write(b"first")
        assert theirs.recv(100) == b"first"
        assert reactor.writers == set(), "sent without waiting for the reactor"
        big = bytes(range(256)) * 4096
        protocol.write(big)
        protocol.write(b"last")
        assert reactor.writers == {transport}, "the socket took part of it; the reactor sends the rest"
        received = bytearray()
        while len(received) < len(big) + 4:
            transport.doWrite()
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(1 << 16)
        assert bytes(received) == big + b"last"
    finally:
        protocol.connectionLost()
        ours.close()
        theirs.close()
    assert clock.getDelayedCalls() == []



class _Replier(Protocol):
    """Answers each read with write_now and looks, before it returns to the reactor, where the answer is."""

    def __init__(self, peer: socket.socket) -> None:
        self.peer = peer
        self.seen: list[tuple[bytes, bool]] = []
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        write_now(self.transport, b"ack:" + data)
        socket_transport = getattr(self.transport, "relays_to", self.transport)
        registered = socket_transport in reactor.getWriters()  # type: ignore[attr-defined]
        try:
            arrived = self.peer.recv(100)
        except BlockingIOError:
            arrived = b""
        self.seen.append((arrived, registered))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _ReplierFactory(Factory):
    def __init__(self, peer: socket.socket) -> None:
        self.peer = peer
        self.built: list[_Replier] = []

    def buildProtocol(self, addr: IAddress) -> _Replier:
        self.built.append(_Replier(self.peer))
        return self.built[-1]


@pytest.mark.parametrize("proxied", [False, True], ids=["tcp", "haproxy"])
@pytest_twisted.ensureDeferred
async def test_write_now_takes_the_fast_path_on_the_installed_twisted(proxied: bool) -> None:
    """On a real loopback TCP connection the ack is in the peer's socket before write_now returns, and the
    transport never asked the reactor to be told of writability. This fails when a Twisted release moves the
    private send buffer write_now reads (it then falls back to transport.write, and the gain is gone).
    Behind the PROXY protocol too: the listener's wrapper must not cost the fast path."""
    peer = socket.socket()
    factory = _ReplierFactory(peer)
    listened: IProtocolFactory = ProxyHeaderFactory(factory, reactor, "test") if proxied else factory
    listening = reactor.listenTCP(0, listened, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        peer.connect(("127.0.0.1", listening.getHost().port))  # the kernel completes it without the reactor
        peer.setblocking(False)
        if proxied:
            peer.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 20000\r\n")
        peer.sendall(b"ping")
        await until(lambda: factory.built and factory.built[0].seen)
        assert factory.built[0].seen == [(b"ack:ping", False)]
    finally:
        peer.close()
        await listening.stopListening()
        if factory.built:
            await factory.built[0].lost
