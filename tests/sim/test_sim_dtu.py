"""The virtual DTU's state machine, over StringTransport and a task.Clock, bytes fed one at a time."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dtucenter.dtu import wire
from dtucenter.sim.dtu import DTUSettings, VirtualDTU
from dtucenter.sim.links import _StreamProtocol
from dtucenter.sim.stats import SimStats

ACCEPT = wire.LOGIN_ACCEPTED


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.stats = SimStats()
        self.redirects: list[tuple[str, int]] = []
        settings.setdefault("interval", 5.0)
        self.dtu = VirtualDTU(
            DTUSettings(psn=4242, password=77, **settings), self.clock, self.stats, random.Random(3),
            on_redirect=lambda host, port: self.redirects.append((host, port)),
        )
        self.dtu.server = ("127.0.0.1", 20000)
        self.connect()

    def connect(self) -> None:
        self.transport = StringTransport()
        self.protocol = _StreamProtocol(self.dtu)
        self.protocol.makeConnection(self.transport)

    def sent(self) -> list[Any]:
        events = wire.FrameParser().feed(self.transport.value())
        self.transport.clear()
        assert not [e for e in events if isinstance(e, wire.PROBLEM_TYPES)]
        return events

    def raw_sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def feed(self, message: Any) -> None:
        for byte in wire.encode_frame(message):
            self.protocol.dataReceived(bytes([byte]))

    def login(self, **ack: Any) -> None:
        [login] = self.sent()
        assert login == wire.Login(4242, 77, "SIMDTU", 1, "00000000000000004242")
        self.feed(wire.LoginAck(ACCEPT, **ack))

    def next_upload(self, limit: float = 300.0) -> wire.SendTest:
        """Advance the clock a tenth of a second at a time until an upload goes out."""
        waited = 0.0
        while waited < limit:
            for message in self.sent():
                if isinstance(message, wire.SendTest):
                    return message
            self.clock.advance(0.1)
            waited += 0.1
        raise AssertionError("no upload")

    def close(self) -> None:
        self.protocol.connectionLost()
        self.dtu.stop()
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def h() -> Any:
    harness = Harness()
    yield harness
    harness.close()


def test_login_then_online(h: Harness) -> None:
    h.login(tick_time=30)
    assert h.dtu.state == VirtualDTU.ONLINE
    assert (h.stats.connected, h.stats.logged_in) == (1, 1)


def test_refused_login_drops_the_connection(h: Harness) -> None:
    h.sent()
    h.feed(wire.LoginAck(wire.LOGIN_REFUSED))
    assert h.transport.disconnected
    assert h.stats.counts["error_login_refused"] == 1
    assert h.stats.connected == 0


def test_no_login_ack_in_time_drops_the_connection(h: Harness) -> None:
    h.clock.advance(29.9)
    assert not h.transport.disconnected
    h.clock.advance(0.1)
    assert h.transport.disconnected
    assert h.stats.counts["error_login_timeout"] == 1


def test_each_new_upload_takes_the_next_test_code(h: Harness) -> None:
    h.login()
    first = h.next_upload()
    assert len(first.values) == 8
    h.feed(wire.SendTestAck(first.test_code))
    second = h.next_upload()
    assert second.test_code == (first.test_code + 1) & 0xFF
    assert h.stats.counts["acked"] == 1
    h.feed(wire.SendTestAck(second.test_code))


def test_test_code_minus_one_resends_the_same_frame(h: Harness) -> None:
    h.login()
    upload = h.next_upload()
    code = upload.test_code
    h.feed(wire.SendTestAck((code - 1) & 0xFF))
    assert h.raw_sent() == wire.encode_frame(upload)
    assert h.stats.counts["resent"] == 1
    h.feed(wire.SendTestAck(code))
    assert h.next_upload().test_code == (code + 1) & 0xFF


def test_no_ack_resends_the_same_frame_after_the_timeout(h: Harness) -> None:
    h.login()
    upload = h.next_upload()
    h.clock.advance(9.9)
    assert h.sent() == []
    h.clock.advance(0.1)
    assert h.sent() == [upload]
    assert h.stats.counts["ack_timeouts"] == 1
    h.feed(wire.SendTestAck(upload.test_code))
    assert h.stats.counts["acked"] == 1


def test_a_silent_center_gets_dialled_again(h: Harness) -> None:
    h.login()
    h.next_upload()
    h.clock.advance(10)
    h.clock.advance(10)
    assert not h.transport.disconnected
    h.clock.advance(10)
    assert h.transport.disconnected
    assert h.stats.counts["error_link_silent"] == 1


def test_refused_again_and_again_the_upload_is_given_up(h: Harness) -> None:
    h.login()
    upload = h.next_upload()
    for _ in range(3):
        h.feed(wire.SendTestAck((upload.test_code - 1) & 0xFF))
        assert h.sent() == [upload]
    h.feed(wire.SendTestAck((upload.test_code - 1) & 0xFF))
    assert h.sent() == []
    assert h.stats.counts["error_upload_refused"] == 1
    assert h.next_upload().test_code == (upload.test_code + 1) & 0xFF


def test_an_upload_due_while_one_is_outstanding_follows_its_ack(h: Harness) -> None:
    h.login()
    first = h.next_upload()
    h.clock.advance(5)
    assert h.sent() == []
    h.feed(wire.SendTestAck(first.test_code))
    [late] = h.sent()
    assert late.test_code == (first.test_code + 1) & 0xFF
    assert h.stats.counts["late"] == 1
    h.feed(wire.SendTestAck(late.test_code))


def test_unacknowledged_upload_is_resent_after_reconnecting(h: Harness) -> None:
    h.login()
    upload = h.next_upload()
    h.protocol.connectionLost()
    assert h.stats.logged_in == 0
    h.connect()
    h.login()
    assert h.sent()[0] == upload
    h.feed(wire.SendTestAck(upload.test_code))


def test_heartbeat_after_tick_time_without_uplink() -> None:
    h = Harness(drift_probability=0.0)
    h.login(tick_time=20, send_test_mode=0)  # on change only, and nothing changes
    h.clock.advance(1)
    assert isinstance(h.sent()[0], wire.SendTest)  # the first reading after login
    h.feed(wire.SendTestAck(h.dtu.test_code))
    h.clock.advance(19)
    assert h.sent() == []
    h.clock.advance(1)
    assert h.sent() == [wire.SendTick()]
    h.feed(wire.SendTickAck())
    assert h.stats.counts["tick_acks"] == 1
    h.close()


def test_mode_255_uploads_on_the_clock_only() -> None:
    h = Harness(drift_probability=0.0)
    h.login(send_test_mode=255)
    first = h.next_upload()
    h.feed(wire.SendTestAck(first.test_code))
    h.dtu.table.set(1, 0, 1234)
    h.clock.advance(4.9)
    assert h.sent() == []
    h.clock.advance(0.1)
    [second] = h.sent()
    assert second.values[0] == 1234
    h.feed(wire.SendTestAck(second.test_code))
    h.close()


def test_mode_0_uploads_on_change_not_faster_than_the_interval() -> None:
    h = Harness(drift_probability=0.0, drift_interval=1.0)
    h.login(send_test_mode=0)
    h.clock.advance(1)
    [first] = h.sent()
    h.feed(wire.SendTestAck(first.test_code))
    h.clock.advance(30)
    assert h.sent() == []  # nothing changed: nothing to say
    h.dtu.table.set(1, 7, -5)
    h.clock.advance(1)
    [changed] = h.sent()
    assert changed.values[7] == -5
    h.feed(wire.SendTestAck(changed.test_code))
    h.dtu.table.set(1, 7, -6)
    h.clock.advance(1)
    assert h.sent() == []  # one second after the last upload: held back until the interval is over
    h.clock.advance(4)
    [held] = h.sent()
    assert held.values[7] == -6
    h.feed(wire.SendTestAck(held.test_code))
    h.close()


def test_mode_x_watches_only_the_first_x_values() -> None:
    h = Harness(drift_probability=0.0, drift_interval=1.0, interval=60.0)
    h.login(send_test_mode=2)
    first = h.next_upload(limit=61)
    h.feed(wire.SendTestAck(first.test_code))
    h.dtu.table.set(1, 5, 999)  # position 5: not watched
    h.clock.advance(2)
    assert h.sent() == []
    h.dtu.table.set(1, 1, 998)  # position 1: watched
    h.clock.advance(1)
    [changed] = h.sent()
    assert (changed.values[1], changed.values[5]) == (998, 999)
    h.feed(wire.SendTestAck(changed.test_code))
    h.close()


def test_mode_from_the_command_line_beats_login_ack() -> None:
    h = Harness(mode=255, drift_probability=0.0)
    h.login(send_test_mode=0)
    assert h.dtu.send_test_mode == 255
    h.close()


def test_send_test_time_from_login_ack_sets_the_interval(h: Harness) -> None:
    h.login(send_test_time=30)
    assert h.dtu.interval == 30.0


@pytest.mark.parametrize(
    "new_ip, new_port, expected",
    [("10.1.2.3", 3000, ("10.1.2.3", 3000)), ("0.0.0.0", 3000, ("127.0.0.1", 3000)),
     ("10.1.2.3", 0, ("10.1.2.3", 20000))],
)
def test_login_ack_redirect_reconnects_elsewhere(
    h: Harness, new_ip: str, new_port: int, expected: tuple[str, int]
) -> None:
    h.login(new_ip=new_ip, new_port=new_port)
    assert h.redirects == [expected]
    assert h.transport.disconnected
    assert h.dtu.state == VirtualDTU.OFFLINE
    assert h.stats.counts["redirects"] == 1


def test_redirect_to_where_it_already_is_is_ignored(h: Harness) -> None:
    h.login(new_ip="127.0.0.1", new_port=20000)
    assert h.redirects == []
    assert h.dtu.state == VirtualDTU.ONLINE


def test_save_setup_replaces_the_register_list_and_uploads_follow_it(h: Harness) -> None:
    h.login()
    registers = (wire.Register(2, 100), wire.Register(3, 7))
    h.feed(wire.SaveSetup(12, registers))
    assert h.sent() == [wire.SaveSetupAck(1, 12, registers)]
    assert h.dtu.interval == 12.0
    upload = h.next_upload()
    assert len(upload.values) == 2
    h.feed(wire.SendTestAck(upload.test_code))
    h.feed(wire.ReadSetup())
    assert h.sent() == [wire.ReadSetupAck(12, registers)]


def test_read_setup_reports_the_dtus_own_interval_when_the_center_set_none(h: Harness) -> None:
    h.login()
    h.feed(wire.ReadSetup())
    assert h.sent() == [wire.ReadSetupAck(5, tuple(wire.Register(1, a) for a in range(8)))]


def test_set_control_writes_registers_that_read_test_then_returns(h: Harness) -> None:
    h.login()
    items = (wire.RegisterValue(1, 3, -300), wire.RegisterValue(9, 40000, 12))
    h.feed(wire.SetControl(items))
    assert h.sent() == [wire.SetControlAck(1, items)]
    h.feed(wire.ReadTest((wire.Register(9, 40000), wire.Register(1, 3))))
    assert h.sent() == [wire.ReadTestAck(1, (12, -300))]
    assert h.stats.counts["commands"] == 2


def test_garbage_is_counted_not_fatal(h: Harness) -> None:
    h.login()
    for byte in b"\xaa\x55\x85\x00\x02\x01\xff":  # SendTestAck with a bad checksum
        h.protocol.dataReceived(bytes([byte]))
    assert h.stats.counts["error_bad_frame"] == 1
    assert h.dtu.state == VirtualDTU.ONLINE
