"""Session rules with StringTransport and task.Clock: no sockets, no threads, no sleeps.

The store is a stand-in that runs the real queries against a real SQLite
file synchronously, but lets each test decide when (and whether) a commit
"finishes", which is what the session's promises are about.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from dtucenter.discovery import PendingBook, PendingLimits
from dtucenter.dtu import wire
from dtucenter.dtu.center import CenterSettings, DTUCenter
from dtucenter.dtu.session import INBOX_LIMIT, DTUFactory, DTUProtocol
from dtucenter.store import queries
from dtucenter.store.db import open_engine
from dtucenter.store.dtus import DtuStore
from tests.stores import HeldStore


class Harness:
    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.store = HeldStore(open_engine(f"sqlite:///{tmp_path / 'held.db'}"))
        self.center = DTUCenter(DtuStore(self.store), self.clock, CenterSettings(**settings))  # type: ignore[arg-type]
        self.factory = DTUFactory(self.center, self.clock)

    def connect(self) -> tuple[DTUProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)  # type: ignore[arg-type]
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    @staticmethod
    def feed(protocol: DTUProtocol, *messages: Any) -> None:
        for byte in b"".join(wire.encode_frame(m) for m in messages):
            protocol.dataReceived(bytes([byte]))

    @staticmethod
    def replies(transport: StringTransport) -> list[Any]:
        data = transport.value()
        transport.clear()
        return wire.FrameParser().feed(data)

    @staticmethod
    def lose(protocol: DTUProtocol) -> None:
        protocol.connectionLost(None)  # type: ignore[arg-type]

    def logged_in(self, psn: int = 1, password: int = 7, **fields: Any) -> tuple[DTUProtocol, StringTransport]:
        self.store.add_dtu(psn, password=password, **fields)
        protocol, transport = self.connect()
        self.feed(protocol, wire.Login(psn, password, "HS121", 1, "CCID"))
        assert self.replies(transport)[0].accepted
        return protocol, transport


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.store.engine.dispose()


def test_no_login_in_time_closes(h: Harness) -> None:
    protocol, transport = h.connect()
    h.clock.advance(29.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)
    assert transport.disconnecting
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_any_other_frame_before_login_closes(h: Harness) -> None:
    protocol, transport = h.connect()
    h.feed(protocol, wire.SendTest(1, 1, (1,)))
    assert transport.disconnecting and transport.value() == b""
    h.lose(protocol)
    assert h.store.samples(1) == [] and h.clock.getDelayedCalls() == []


#: The refused LoginAck on the wire: head, Type 0x81, Length 14, Right 0 and every other field 0, checksum.
REFUSED_FRAME = bytes.fromhex("aa55 81 000e 00 00 00 00 00 0000 0000 00000000 8f")


def test_refused_login_gets_all_zeros_then_close(h: Harness) -> None:
    h.store.add_dtu(5, password=1)
    protocol, transport = h.connect()
    h.feed(protocol, wire.Login(5, 2))
    assert transport.value() == REFUSED_FRAME
    assert transport.disconnecting
    h.lose(protocol)
    assert h.center.sessions == {} and h.clock.getDelayedCalls() == []


def test_login_ack_carries_stored_parameters(h: Harness) -> None:
    h.store.add_dtu(9, tick_time=20, send_test_mode=3, send_test_time=15, fota_flag=1,
                    new_ver=4, new_port=20001, new_ip="10.1.2.3")
    protocol, transport = h.connect()
    h.feed(protocol, wire.Login(9, 99))
    assert h.replies(transport) == [wire.LoginAck(0xEA, 1, 20, 3, 15, 4, 20001, "10.1.2.3")]
    assert h.store.dtu(9).password_set  # type: ignore[union-attr]
    h.lose(protocol)


def test_silence_for_twice_tick_time_disconnects_and_marks_offline(h: Harness) -> None:
    protocol, transport = h.logged_in(tick_time=10)
    h.clock.advance(19)
    h.feed(protocol, wire.SendTick())
    assert h.replies(transport) == [wire.SendTickAck()]
    h.clock.advance(19.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)
    assert transport.disconnecting
    h.lose(protocol)
    assert not h.store.dtu(1).online  # type: ignore[union-attr]
    assert h.clock.getDelayedCalls() == []


def test_idle_deadline_follows_the_last_frame_and_a_new_tick_time_at_once(h: Harness) -> None:
    protocol, transport = h.logged_in(tick_time=30)
    for _ in range(5):  # a frame every 11 s: never 60 s of silence
        h.clock.advance(11)
        h.feed(protocol, wire.SendTick())
    h.clock.advance(59.9)
    assert not transport.disconnecting
    h.feed(protocol, wire.SendTick())
    # Logging in again on the same link with TickTime 5 takes effect at once, not at the old deadline.
    h.store.add_dtu(1, tick_time=5)
    h.clock.advance(1)
    h.feed(protocol, wire.Login(1, 7, "HS121", 1, "CCID"))
    h.clock.advance(9.9)
    assert not transport.disconnecting
    h.clock.advance(0.2)
    assert transport.disconnecting
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_upload_is_acknowledged_only_after_commit_and_reading_pauses(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    h.feed(protocol, wire.SendTest(20, 5, (1, 2)), wire.SendTick())
    assert transport.value() == b""
    # A short queue behind a slow commit is normal; a deep one stops reading from the DTU.
    assert transport.producerState == "producing"
    h.feed(protocol, *[wire.SendTick()] * (INBOX_LIMIT - 1))
    assert transport.producerState == "paused"
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(5)] + [wire.SendTickAck()] * INBOX_LIMIT
    assert transport.producerState == "producing"
    assert h.store.samples(1) == [1, 2]
    h.lose(protocol)


@pytest.mark.expected_errors("Upload 5 of DTU 1 could not be stored")
def test_failed_store_is_never_acknowledged(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.store.hold = True
    h.feed(protocol, wire.SendTest(20, 5, (1, 2)))
    h.store.fail()
    assert h.replies(transport) == []
    assert transport.disconnecting
    h.lose(protocol)
    # The DTU resends on its next connection, and this time it is stored.
    h.store.hold = False
    protocol, transport = h.logged_in()
    h.feed(protocol, wire.SendTest(20, 5, (1, 2)))
    assert h.replies(transport) == [wire.SendTestAck(5)]
    assert h.store.samples(1) == [1, 2]
    h.lose(protocol)


def test_slow_store_does_not_count_as_dtu_silence(h: Harness) -> None:
    protocol, transport = h.logged_in(tick_time=10)
    h.store.hold = True
    h.feed(protocol, wire.SendTest(20, 5, (1,)))
    h.clock.advance(60)
    assert not transport.disconnecting
    h.store.release()
    assert h.replies(transport) == [wire.SendTestAck(5)]
    h.lose(protocol)


def test_retransmission_while_first_copy_is_in_flight_is_stored_once(h: Harness) -> None:
    old, old_transport = h.logged_in()
    h.store.hold = True
    h.feed(old, wire.SendTest(20, 8, (4, 5)))
    # The DTU gave up on the old link, dialled again and resends the same frame.
    h.store.hold = False
    new, new_transport = h.connect()
    h.feed(new, wire.Login(1, 7))
    h.store.hold = True
    h.feed(new, wire.SendTest(20, 8, (4, 5)))
    assert old_transport.disconnecting  # replaced by the newer login
    h.store.release()
    assert h.replies(new_transport)[-1] == wire.SendTestAck(8)
    assert h.store.samples(1) == [4, 5]
    h.lose(old)
    h.lose(new)


def test_a_new_test_code_with_same_values_is_new_data(h: Harness) -> None:
    protocol, transport = h.logged_in()
    h.feed(protocol, wire.SendTest(20, 1, (3,)), wire.SendTest(20, 2, (3,)), wire.SendTest(20, 2, (3,)))
    assert h.replies(transport) == [wire.SendTestAck(1), wire.SendTestAck(2), wire.SendTestAck(2)]
    assert h.store.samples(1) == [3, 3]
    h.lose(protocol)


def test_newer_login_replaces_older_session_and_older_loss_keeps_it_online(h: Harness) -> None:
    old, old_transport = h.logged_in()
    new, _new_transport = h.connect()
    h.feed(new, wire.Login(1, 7))
    assert old_transport.disconnecting
    h.lose(old)
    assert h.center.sessions[1] is new.session
    assert h.store.dtu(1).online  # type: ignore[union-attr]
    h.lose(new)
    assert not h.store.dtu(1).online  # type: ignore[union-attr]
    assert h.clock.getDelayedCalls() == []


def test_connection_lost_during_authentication_leaves_dtu_offline(h: Harness) -> None:
    h.store.add_dtu(3, password=1)
    protocol, _transport = h.connect()
    h.store.hold = True
    h.feed(protocol, wire.Login(3, 1))
    h.lose(protocol)
    h.store.release()
    assert h.center.sessions == {}
    assert not h.store.dtu(3).online  # type: ignore[union-attr]
    assert h.clock.getDelayedCalls() == []


def test_a_login_whose_connection_died_does_not_replace_the_live_session(h: Harness) -> None:
    live, live_transport = h.logged_in()
    dead, dead_transport = h.connect()
    h.store.hold = True
    h.feed(dead, wire.Login(1, 7))
    h.lose(dead)  # a half-open redial that died before its LoginAck
    h.store.release()
    assert dead_transport.value() == b""
    assert not live_transport.disconnecting
    assert h.center.sessions == {1: live.session}
    assert h.center.stats["logins_abandoned"] == 1 and h.center.stats["sessions_replaced"] == 0
    assert h.store.dtu(1).online  # type: ignore[union-attr]
    # The live session goes on as before.
    h.feed(live, wire.SendTest(20, 3, (9,)))
    assert h.replies(live_transport) == [wire.SendTestAck(3)]
    h.lose(live)
    assert not h.store.dtu(1).online  # type: ignore[union-attr]
    assert h.clock.getDelayedCalls() == []


def test_a_login_closed_by_the_center_while_deciding_does_not_replace_the_live_session(h: Harness) -> None:
    live, live_transport = h.logged_in(tick_time=100)
    slow, slow_transport = h.connect()
    h.store.hold = True
    h.feed(slow, wire.Login(1, 7))
    slow.session.abort("center stopping")  # closed by the center, its transport not yet gone
    h.store.release()
    assert slow_transport.value() == b"" and slow_transport.disconnecting
    assert not live_transport.disconnecting and h.center.sessions == {1: live.session}
    h.lose(slow)
    h.lose(live)


def test_bad_frames_are_counted_and_never_raise(h: Harness) -> None:
    protocol, transport = h.logged_in()
    bad = bytearray(wire.encode_frame(wire.SendTick()))
    bad[-1] ^= 1
    for byte in bytes(bad) + b"\xaa\x55\x99\x00\x01\x9a" + wire.encode_frame(wire.SendTick()):
        protocol.dataReceived(bytes([byte]))
    assert h.replies(transport) == [wire.SendTickAck()]
    assert h.center.stats["dropped_BadChecksum"] == 1
    assert h.center.stats["dropped_UnknownType"] == 1
    h.lose(protocol)


def test_garbage_limit_closes(tmp_path: Path) -> None:
    h = Harness(tmp_path, login_garbage_limit=100)
    protocol, transport = h.connect()
    protocol.dataReceived(b"\x00" * 101)
    assert transport.disconnecting
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_garbage_limit_of_a_logged_in_dtu_is_the_larger_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, login_garbage_limit=100, garbage_limit=1000)
    protocol, transport = h.logged_in()
    protocol.dataReceived(b"\x00" * 1000)
    assert not transport.disconnecting
    protocol.dataReceived(b"\x00")
    assert transport.disconnecting and h.center.stats["closed_for_garbage"] == 1
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_custom_head_dialect(tmp_path: Path) -> None:
    dialect = wire.Dialect(head=b"\x7e\x7e")
    h = Harness(tmp_path, dialect=dialect, enroll_unknown=True)
    protocol, transport = h.connect()
    protocol.dataReceived(wire.encode_frame(wire.Login(4, 4), dialect))
    assert transport.value().startswith(b"\x7e\x7e\x81")
    h.lose(protocol)


def test_a_dtu_that_keeps_failing_is_refused_without_a_database_job(h: Harness) -> None:
    h.store.add_dtu(5, password=1)
    for _ in range(3):
        protocol, transport = h.connect()
        h.feed(protocol, wire.Login(5, 2))
        assert transport.value() == REFUSED_FRAME
        h.lose(protocol)
    h.store.hold = True
    protocol, transport = h.connect()
    h.feed(protocol, wire.Login(5, 1))  # even the right PASS waits out the block
    assert transport.value() == REFUSED_FRAME
    assert h.store.held == [] and h.center.stats["logins_throttled"] == 1
    h.lose(protocol)
    # Another PSN from the same address (one carrier NAT, many DTUs) is not affected.
    h.store.hold = False
    other, _other_transport = h.logged_in(psn=6, password=3)
    h.lose(other)
    h.clock.advance(10)
    protocol, transport = h.connect()
    h.feed(protocol, wire.Login(5, 1))
    assert h.replies(transport)[0].accepted
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


EIGHT = tuple(wire.Register(1, addr) for addr in range(8))


def stale_list_session(h: Harness) -> tuple[DTUProtocol, StringTransport]:
    """DTU 1 logged in with a stored list of 2 registers (a SaveSetup it did not keep) and uploading 8 values."""
    h.store.add_dtu(1, password=7, tick_time=255)
    h.center.records.replace_register_list(1, 10, ((1, 0), (1, 1)))
    protocol, transport = h.logged_in()
    assert len(protocol.session.registers) == 2
    return protocol, transport


def test_a_stale_register_list_is_replaced_by_what_the_dtu_reports(h: Harness) -> None:
    protocol, transport = stale_list_session(h)
    h.feed(protocol, wire.SendTest(20, 5, tuple(range(8))), wire.SendTest(20, 5, tuple(range(8))))
    assert h.replies(transport) == [wire.SendTestAck(4), wire.SendTestAck(4)]
    h.feed(protocol, wire.SendTest(20, 5, tuple(range(8))))
    # The third in a row: the DTU is asked for its own list, and the upload refused again.
    assert h.replies(transport) == [wire.ReadSetup(), wire.SendTestAck(4)]
    assert h.center.stats["uploads_mismatched"] == 3 and h.center.stats["register_lists_asked"] == 1
    assert h.center.mismatched_psns() == (1, [1])
    h.feed(protocol, wire.ReadSetupAck(10, EIGHT))
    # What it answered is stored and names the next uploads, which are now stored.
    assert protocol.session.registers == EIGHT
    assert h.store.read(lambda s: queries.register_list(s, 1)).result == tuple((1, addr) for addr in range(8))
    h.feed(protocol, wire.SendTest(20, 5, tuple(range(8))))
    assert h.replies(transport) == [wire.SendTestAck(5)]
    assert h.store.samples(1) == list(range(8))
    assert h.center.mismatched_psns() == (0, [])
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_a_dtu_is_asked_for_its_register_list_at_most_once_per_interval(tmp_path: Path) -> None:
    h = Harness(tmp_path, mismatch_interval=100.0)
    protocol, transport = stale_list_session(h)
    uploads = [wire.SendTest(20, 5, tuple(range(8)))] * 3
    h.feed(protocol, *uploads)
    assert wire.ReadSetup() in h.replies(transport)
    # A DTU that answers the list it does not upload with stays mismatched, and is not asked again at once.
    h.feed(protocol, wire.ReadSetupAck(10, (wire.Register(1, 0), wire.Register(1, 1))))
    for _ in range(3):
        h.feed(protocol, *uploads)
    assert wire.ReadSetup() not in h.replies(transport)
    assert h.center.stats["register_lists_asked"] == 1
    # Nor across a redial.
    h.lose(protocol)
    protocol, transport = h.logged_in()
    h.feed(protocol, *uploads)
    assert wire.ReadSetup() not in h.replies(transport)
    h.clock.advance(100)
    h.feed(protocol, *uploads)
    assert wire.ReadSetup() in h.replies(transport)
    assert h.center.stats["register_lists_asked"] == 2 and h.center.stats["uploads_mismatched"] == 18
    h.lose(protocol)  # the question on the wire fails with the connection, quietly
    assert h.clock.getDelayedCalls() == []


# -- junk: counted, summarised, cut off ---------------------------------------------------

#: A SendTest head whose Length (1024) is corrupt.
CORRUPT_HEAD = b"\xaa\x55\x05\x04\x00"


def warnings_of(namespace: str) -> Iterator[list[str]]:
    """The log lines of ``namespace`` at warning level and above, as text, while the test runs."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == namespace and event["log_level"] >= LogLevel.warn:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def session_warnings() -> Iterator[list[str]]:
    yield from warnings_of("dtucenter.dtu.session")


def test_a_tick_behind_a_corrupt_length_is_answered_at_once(h: Harness) -> None:
    protocol, transport = h.logged_in()
    protocol.dataReceived(CORRUPT_HEAD)
    h.feed(protocol, wire.SendTick())
    assert h.replies(transport) == [wire.SendTickAck()]
    assert h.center.stats["dropped_AbandonedFrame"] == 1
    h.lose(protocol)


def test_junk_costs_a_summary_line_per_interval_not_a_line_per_frame(
    tmp_path: Path, session_warnings: list[str]
) -> None:
    h = Harness(tmp_path, junk_limit=10**9)
    protocol, transport = h.logged_in()
    junk = b"\xaa\x55" * 16384 + b"\xaa\x55\x05\x03\xff" * 100 + bytes(range(256)) * 8
    tick = wire.encode_frame(wire.SendTick())
    for _ in range(40):  # 40 s of junk, each read followed by a good frame
        protocol.dataReceived(junk + tick)
        h.clock.advance(1)
    assert h.replies(transport) == [wire.SendTickAck()] * 40
    assert len(session_warnings) == 1 and "bad frames" in session_warnings[0]
    h.clock.advance(30)
    protocol.dataReceived(junk + tick)
    assert len(session_warnings) == 2 and "in the last 70 s" in session_warnings[1]
    protocol.dataReceived(junk + tick)
    h.lose(protocol)  # what was not told yet is told once, at the end
    assert len(session_warnings) == 3
    assert h.center.stats["bytes_skipped"] == 42 * len(junk)
    assert protocol.session.problems["skipped_bytes"] == 42 * len(junk)
    assert h.center.stats["dropped_BadChecksum"] > 0 and h.center.stats["dropped_OversizedFrame"] > 0


def test_a_dtu_sending_mostly_junk_is_closed_once(tmp_path: Path, session_warnings: list[str]) -> None:
    h = Harness(tmp_path, junk_limit=100_000, junk_window=60)
    protocol, transport = h.logged_in()
    tick = wire.encode_frame(wire.SendTick())
    for _ in range(30):
        protocol.dataReceived(b"\x00" * 4000 + tick)
        h.clock.advance(1)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert h.center.stats["closed_for_junk"] == 1
    protocol.dataReceived(b"\x00" * 4000)  # bytes already on their way: nothing more said
    h.lose(protocol)
    closing = [line for line in session_warnings if "Closing" in line]
    assert len(closing) == 1 and "DTU 1" in closing[0]
    assert h.clock.getDelayedCalls() == []


def test_some_junk_among_more_frames_is_tolerated(tmp_path: Path) -> None:
    h = Harness(tmp_path, junk_limit=1_000)
    protocol, transport = h.logged_in()
    ticks = wire.encode_frame(wire.SendTick()) * 100
    for _ in range(100):
        protocol.dataReceived(b"\x00" * 500 + ticks)  # 500 bytes of junk, 600 of frames
        h.clock.advance(1)
    assert not transport.disconnecting
    assert len(h.replies(transport)) == 100 * 100
    h.lose(protocol)


def test_a_read_of_junk_is_parsed_only_up_to_the_garbage_limit(tmp_path: Path) -> None:
    h = Harness(tmp_path, login_garbage_limit=1000)
    protocol, transport = h.connect()
    protocol.dataReceived(b"\xaa\x55" * 512 * 1024)
    assert transport.disconnecting
    assert h.center.stats["closed_for_garbage"] == 1
    assert h.center.stats["bytes_skipped"] <= 1001
    h.lose(protocol)
    assert h.clock.getDelayedCalls() == []


def test_many_junk_connections_before_login_cost_one_line_per_interval(
    h: Harness, session_warnings: list[str]
) -> None:
    """Today's incident: anonymous connections streaming AA 55 wrote a line per frame and one per connection."""
    for _ in range(100):
        protocol, transport = h.connect()
        protocol.dataReceived(b"\xaa\x55" * 40000)  # over the limit
        assert transport.disconnecting
        h.lose(protocol)
        h.clock.advance(1)
    assert h.center.stats["closed_for_garbage"] == 100
    assert len(session_warnings) == 2  # at the first, and 60 s later
    assert "Closed 1 connections" in session_warnings[0] and "Closed 60 connections" in session_warnings[1]
    h.clock.advance(30)
    assert h.clock.getDelayedCalls() == []


@pytest.fixture
def center_warnings() -> Iterator[list[str]]:
    yield from warnings_of("dtucenter.dtu.center")


def test_refused_logins_cost_a_line_per_interval_not_a_line_each(h: Harness, center_warnings: list[str]) -> None:
    """Forged UDP logins with a new PSN each, or a fleet with a wrong PASS, are not logged one by one."""
    for n in range(1, 120, 2):
        h.store.add_dtu(1000 + n, password=1)
    for n in range(120):
        protocol, transport = h.connect()
        h.feed(protocol, wire.Login(1000 + n, 2 if n % 2 else 3))
        assert not h.replies(transport)[0].accepted
        h.lose(protocol)
        h.clock.advance(1)
    assert h.center.stats["logins_refused"] == 120
    assert len(center_warnings) == 2  # the first refusal, and the first one 60 s later
    assert center_warnings[0].startswith("DTU 1000 refused from ") and center_warnings[0].endswith(": unknown PSN")
    assert center_warnings[1].startswith("DTU 1060 refused from ")
    assert "(59 other logins refused in the last 60s, not logged one by one: unknown PSN 30, wrong password 30)" in (
        center_warnings[1]
    )
    h.clock.advance(600)
    assert h.clock.getDelayedCalls() == []


def test_an_unknown_psn_is_held_unanswered_then_answered_once_adopted_or_refused_once_dropped(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, hold_unknown=True)
    book = PendingBook(h.clock, PendingLimits())
    h.center = DTUCenter(DtuStore(h.store), h.clock, h.center.settings, book=book)  # type: ignore[arg-type]
    h.factory = DTUFactory(h.center, h.clock)
    protocol, transport = h.connect()
    h.feed(protocol, wire.Login(42, 1234, "HS121", 1, "CCID"))
    (device,) = book.devices()
    assert (device.kind, device.registration) == ("dtu", b"42")
    assert transport.value() == b"" and not transport.disconnecting
    h.clock.advance(3600)  # the login deadline waits on the decision, as for a slow store
    assert transport.value() == b"" and not transport.disconnecting

    # Adopted: a record appears (PASS 0), and the held login is answered on this connection.
    h.store.add_dtu(42, password=0)
    h.center.release_held(42)
    book.forget(device.id)
    (ack,) = h.replies(transport)
    assert ack.accepted and h.center.sessions[42] is protocol.session  # type: ignore[attr-defined]
    h.feed(protocol, wire.SendTest(net_state=1, test_code=5, values=(9,)))
    assert h.replies(transport)[0].test_code == 5
    h.lose(protocol)

    # Dropped: refused and closed.
    other, other_transport = h.connect()
    h.feed(other, wire.Login(43, 1, "HS121", 1, "CCID"))
    (pending,) = book.devices()
    book.forget(pending.id)
    assert other_transport.value() == REFUSED_FRAME and other_transport.disconnecting
    h.lose(other)
    h.store.engine.dispose()
