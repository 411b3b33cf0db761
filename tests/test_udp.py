"""UDP sessions: one per source address, expiring like TCP ones; no socket needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtucenter.dtu import wire
from dtucenter.dtu.session import INBOX_LIMIT
from dtucenter.dtu.udp import BACKLOG_LIMIT, DTUDatagramProtocol
from tests.test_session import Harness


class SentDatagrams:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def to(self, addr: Any) -> list[Any]:
        parser = wire.FrameParser()
        return [m for data, a in self.sent if a == addr for m in parser.feed(data)]


A = ("10.0.0.1", 4000)
B = ("10.0.0.2", 4000)


def udp(tmp_path: Path, **settings: Any) -> tuple[Harness, DTUDatagramProtocol, SentDatagrams]:
    h = Harness(tmp_path, **settings)
    protocol = DTUDatagramProtocol(h.center, h.clock)
    transport = SentDatagrams()
    protocol.transport = transport  # type: ignore[assignment]
    return h, protocol, transport


def test_sessions_per_source_address_and_replies_to_it(tmp_path: Path) -> None:
    h, protocol, sent = udp(tmp_path, enroll_unknown=True)
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 1)) + wire.encode_frame(wire.SendTick()), A)
    login = wire.encode_frame(wire.Login(2, 2))
    protocol.datagramReceived(login[:4], B)  # a frame split over datagrams
    protocol.datagramReceived(login[4:], B)
    assert [type(m) for m in sent.to(A)] == [wire.LoginAck, wire.SendTickAck]
    assert [type(m) for m in sent.to(B)] == [wire.LoginAck]
    assert set(h.center.sessions) == {1, 2}
    protocol.stopProtocol()
    assert h.center.sessions == {} and h.clock.getDelayedCalls() == []


def test_sessions_expire_like_tcp(tmp_path: Path) -> None:
    h, protocol, _sent = udp(tmp_path, enroll_unknown=True)
    protocol.datagramReceived(b"\x00", B)  # never logs in
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 1)), A)  # tick time 60
    h.clock.advance(30)
    assert list(protocol.links) == [A]
    h.clock.advance(90)
    assert protocol.links == {} and h.center.sessions == {}
    assert not h.store.dtu(1).online  # type: ignore[union-attr]
    assert h.clock.getDelayedCalls() == []


def test_waiting_for_the_store_keeps_a_bounded_backlog(tmp_path: Path) -> None:
    h, protocol, sent = udp(tmp_path, enroll_unknown=True)
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 1)), A)
    h.store.hold = True
    protocol.datagramReceived(wire.encode_frame(wire.SendTest(1, 1, (1,))), A)
    # INBOX_LIMIT queue in the session, then the link pauses and keeps BACKLOG_LIMIT more.
    for code in range(2, 2 + INBOX_LIMIT + BACKLOG_LIMIT + 5):
        protocol.datagramReceived(wire.encode_frame(wire.SendTest(1, code & 0xFF, (code,))), A)
    assert h.center.stats["udp_datagrams_dropped"] == 5
    h.store.release()
    acks = [m for m in sent.to(A) if isinstance(m, wire.SendTestAck)]
    assert [a.test_code for a in acks] == list(range(1, 2 + INBOX_LIMIT + BACKLOG_LIMIT))
    protocol.stopProtocol()
