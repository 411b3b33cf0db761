"""UDP sessions: one per source address, expiring like TCP ones; no socket needed."""

from __future__ import annotations

import gc
from collections import deque
from pathlib import Path
from typing import Any

from twisted.logger import LogEvent, LogLevel, globalLogPublisher

from dtucenter.dtu import wire
from dtucenter.dtu.session import INBOX_LIMIT, DTUSession
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


def test_a_flood_from_forged_addresses_keeps_the_sessions_at_the_cap(tmp_path: Path) -> None:
    h, protocol, sent = udp(tmp_path)
    protocol.max_pending = 200
    h.store.add_dtu(1, password=7)
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 7)), A)
    assert sent.to(A)[0].accepted
    for n in range(100_000):
        # Junk and Logins nobody will answer, each from its own forged address.
        datagram = wire.encode_frame(wire.Login(1_000_000 + n, 1)) if n % 1_000 == 0 else b"\x00"
        protocol.datagramReceived(datagram, (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 9000))
        if n % 1_000 == 999:
            assert len(protocol.links) <= 201, f"{len(protocol.links)} sessions after {n + 1} datagrams"
    # Every session object there is, dropped ones not yet collected included.
    sessions = [o for o in gc.get_objects() if isinstance(o, DTUSession) and o.center is h.center]
    assert protocol.pending == 200 and len(protocol.links) == 201 and len(sessions) == 201
    assert h.center.stats["udp_pending_dropped"] == 100_000 - 200 - h.center.stats["logins_refused"]
    # The DTU that had logged in is still there, and answered.
    assert h.center.sessions[1] is protocol.links[A].session
    protocol.datagramReceived(wire.encode_frame(wire.SendTick()), A)
    assert isinstance(sent.to(A)[-1], wire.SendTickAck)
    protocol.stopProtocol()
    assert h.clock.getDelayedCalls() == []


def test_the_pending_cap_drops_the_oldest_first_and_a_login_leaves_it(tmp_path: Path) -> None:
    h, protocol, _sent = udp(tmp_path, enroll_unknown=True)
    protocol.max_pending = 2
    first, second, third = (("10.0.0.9", port) for port in (1, 2, 3))
    protocol.datagramReceived(b"\x00", first)
    protocol.datagramReceived(wire.encode_frame(wire.Login(2, 2)), A)  # logs in: no longer pending
    protocol.datagramReceived(b"\x00", second)
    protocol.datagramReceived(b"\x00", third)
    assert list(protocol.links) == [A, second, third]
    assert h.center.stats["udp_pending_dropped"] == 1 and set(h.center.sessions) == {2}
    protocol.stopProtocol()


def test_datagrams_are_not_kept_while_a_login_is_checked(tmp_path: Path) -> None:
    h, protocol, sent = udp(tmp_path, enroll_unknown=True)
    h.store.hold = True
    protocol.datagramReceived(wire.encode_frame(wire.Login(3, 3)), A)
    for _ in range(100):
        protocol.datagramReceived(wire.encode_frame(wire.SendTick()), A)
    assert h.center.stats["udp_datagrams_dropped"] == 100 and protocol.links[A].backlog == deque()
    h.store.release()
    assert [type(m) for m in sent.to(A)] == [wire.LoginAck]
    protocol.stopProtocol()


def test_forged_wrong_logins_from_a_dtus_address_neither_end_nor_lock_it_out(tmp_path: Path) -> None:
    h, protocol, sent = udp(tmp_path)
    h.store.add_dtu(1, password=7)
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 7)), A)
    assert sent.to(A)[0].accepted
    sent.sent.clear()
    online = protocol.links[A].session
    forged = wire.encode_frame(wire.Login(1, 666))
    for _ in range(10):  # from the DTU's own address and port, onto its session
        protocol.datagramReceived(forged, A)
    same_host = (A[0], A[1] + 1)
    for _ in range(10):  # from its host, another port: sessions of their own, refused
        protocol.datagramReceived(forged, same_host)
    assert h.center.stats["logins_throttled"] > 0  # the wrong PASS itself is throttled
    # The DTU's session was neither closed nor answered on the forger's behalf.
    assert sent.to(A) == [] and h.center.sessions[1] is online and A in protocol.links
    protocol.datagramReceived(wire.encode_frame(wire.SendTest(1, 1, (5,))), A)
    assert sent.to(A) == [wire.SendTestAck(1)]
    # Its right PASS gets through the throttle: on its session, and from a new port after that session ends.
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 7)), A)
    assert sent.to(A)[-1].accepted
    protocol.forget(A)
    protocol.datagramReceived(wire.encode_frame(wire.Login(1, 7)), same_host)
    assert sent.to(same_host)[-1].accepted and h.center.sessions[1] is protocol.links[same_host].session
    protocol.stopProtocol()
    assert h.clock.getDelayedCalls() == []


def test_forged_addresses_that_never_log_in_are_counted_not_logged_one_by_one(tmp_path: Path) -> None:
    h, protocol, _sent = udp(tmp_path)
    warnings: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for n in range(1_000):
            protocol.datagramReceived(b"\x00", (f"10.0.{n >> 8}.{n & 255}", 9000))
        h.clock.advance(30)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert protocol.links == {} and h.center.stats["login_timeouts"] == 1_000
    assert warnings == []
