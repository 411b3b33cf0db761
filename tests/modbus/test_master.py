"""The master's request queue over StringTransport with a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dtucenter.modbus.errors import (
    LinkDisconnected,
    LinkOffline,
    ModbusExceptionResponse,
    ModbusTimeout,
)
from dtucenter.modbus.filter import BoundaryNoise
from dtucenter.modbus.framing import MbapFraming, RtuFraming
from dtucenter.modbus.master import ModbusMaster
from tests.modbus.modbus_helpers import (
    byte_by_byte,
    exception_response,
    fired,
    holding_response,
    mbap,
    read_holding,
    result_of,
    rtu,
)

TIMEOUT = 3.0
SILENCE = 0.2


class Harness:
    def __init__(
        self, framing=None, retries: int = 1, silence: float = SILENCE, heartbeat: bytes | None = b"HB",
        idle_timeout: float | None = None,
    ):
        self.clock = Clock()
        self.transport = StringTransport()
        self.master = ModbusMaster(
            "site-a",
            framing or RtuFraming(),
            self.clock,
            timeout=TIMEOUT,
            retries=retries,
            noise=BoundaryNoise.for_link(None, False, heartbeat),
            silence=silence,
            idle_timeout=idle_timeout,
        )
        self.master.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def receive(self, data: bytes, one_at_a_time: bool = True) -> None:
        for chunk in byte_by_byte(data) if one_at_a_time else [data]:
            self.master.dataReceived(chunk)

    def assert_idle(self) -> None:
        assert self.clock.getDelayedCalls() == []
        assert self.master.pending == 0


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_request_sends_an_rtu_frame_and_fires_with_the_response(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 2))
    assert h.sent() == rtu(read_holding(1, 0, 2))
    h.receive(rtu(holding_response(1, [0x1234, 0x5678])))
    assert result_of(d).registers == [0x1234, 0x5678]
    assert h.master.counters.requests == 1
    assert h.master.counters.responses == 1
    h.assert_idle()


def test_one_request_in_flight_the_rest_queue_in_order(h: Harness) -> None:
    first = h.master.request(read_holding(1, 0, 1))
    second = h.master.request(read_holding(2, 10, 1))
    third = h.master.request(read_holding(3, 20, 1))
    assert h.sent() == rtu(read_holding(1, 0, 1))
    assert h.master.pending == 3
    h.receive(rtu(holding_response(1, [1])))
    assert h.sent() == rtu(read_holding(2, 10, 1))
    assert not fired(second)
    h.receive(rtu(holding_response(2, [2])))
    assert h.sent() == rtu(read_holding(3, 20, 1))
    h.receive(rtu(holding_response(3, [3])))
    assert [result_of(d).registers for d in (first, second, third)] == [[1], [2], [3]]
    h.assert_idle()


def test_a_request_made_from_a_callback_goes_out_next(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 1))
    follow_up: list = []
    d.addCallback(lambda _: follow_up.append(h.master.request(read_holding(1, 1, 1))))
    h.receive(rtu(holding_response(1, [1])))
    assert h.sent() == rtu(read_holding(1, 0, 1)) + rtu(read_holding(1, 1, 1))
    h.receive(rtu(holding_response(1, [2])))
    assert result_of(follow_up[0]).registers == [2]
    h.assert_idle()


def test_heartbeats_and_stray_bytes_around_a_response_are_ignored(h: Harness) -> None:
    h.receive(b"HB\x00\xffHB")  # while idle
    d = h.master.request(read_holding(1, 0, 1))
    h.receive(b"H" + b"B\x13" + rtu(holding_response(1, [42])) + b"HB")
    assert result_of(d).registers == [42]
    assert h.master.counters.heartbeats == 4
    assert h.master.counters.discarded_bytes == 3
    h.assert_idle()


def test_timeout_retries_after_a_quiet_period_then_fails(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 1))
    frame = h.sent()
    h.clock.advance(TIMEOUT)
    assert h.sent() == b"", "the retry waits for the line to be quiet"
    h.clock.advance(SILENCE)
    assert h.sent() == frame
    h.clock.advance(TIMEOUT)
    failure = result_of(d)
    assert isinstance(failure, Failure)
    assert failure.check(ModbusTimeout)
    assert failure.value.attempts == 2
    assert str(failure.value) == "unit 1 did not answer function 3 (2 attempts)"
    assert h.master.counters.timeouts == 2
    h.clock.advance(SILENCE)
    h.assert_idle()


def test_answer_to_the_retry_is_taken(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 1))
    h.clock.advance(TIMEOUT)
    h.clock.advance(SILENCE)
    assert h.master.counters.requests == 2
    h.receive(rtu(holding_response(1, [5])))
    assert result_of(d).registers == [5]
    h.assert_idle()


def test_late_response_after_a_timeout_does_not_answer_the_next_request() -> None:
    h = Harness(retries=0)
    first = h.master.request(read_holding(1, 0, 1))
    second = h.master.request(read_holding(2, 0, 1))
    h.sent()
    h.receive(rtu(holding_response(1, [1]))[:3])  # half an answer, then silence
    h.clock.advance(TIMEOUT)
    assert result_of(first).check(ModbusTimeout)
    # The rest of the late answer drains during the quiet period.
    h.receive(rtu(holding_response(1, [1]))[3:])
    h.clock.advance(SILENCE)
    assert h.sent() == rtu(read_holding(2, 0, 1))
    h.receive(rtu(holding_response(1, [99])))  # unit 1 again, very late: not unit 2's answer
    assert not fired(second)
    h.receive(rtu(holding_response(2, [2])))
    assert result_of(second).registers == [2]
    h.assert_idle()


def test_exception_response_fails_with_function_and_exception_code(h: Harness) -> None:
    d = h.master.request(read_holding(7, 500, 4))
    h.receive(rtu(exception_response(7, 3, 2)))
    failure = result_of(d)
    assert failure.check(ModbusExceptionResponse)
    assert (failure.value.unit, failure.value.function_code, failure.value.exception_code) == (7, 3, 2)
    assert "illegal data address" in str(failure.value)
    assert h.master.counters.errors == 1
    h.assert_idle()


def test_disconnect_mid_request_fails_everything_pending_at_once(h: Harness) -> None:
    in_flight = h.master.request(read_holding(1, 0, 1))
    queued = h.master.request(read_holding(2, 0, 1))
    h.receive(rtu(holding_response(1, [1]))[:2])
    h.master.connectionLost(Failure(ConnectionError("gone")))
    assert result_of(in_flight).check(LinkDisconnected)
    assert result_of(queued).check(LinkDisconnected)
    assert result_of(h.master.request(read_holding(1, 0, 1))).check(LinkOffline)
    h.assert_idle()


def test_disconnect_during_the_quiet_period_leaves_no_timer(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 1))
    h.clock.advance(TIMEOUT)
    h.master.connectionLost(Failure(ConnectionError("gone")))
    assert result_of(d).check(LinkDisconnected)
    h.assert_idle()


def test_cancelling_a_queued_request_removes_it(h: Harness) -> None:
    first = h.master.request(read_holding(1, 0, 1))
    second = h.master.request(read_holding(2, 0, 1))
    third = h.master.request(read_holding(3, 0, 1))
    second.cancel()
    assert result_of(second).check(defer.CancelledError)
    h.sent()
    h.receive(rtu(holding_response(1, [1])))
    assert h.sent() == rtu(read_holding(3, 0, 1))
    h.receive(rtu(holding_response(3, [3])))
    assert result_of(first).registers == [1]
    assert result_of(third).registers == [3]
    h.assert_idle()


def test_cancelling_the_request_in_flight_moves_on_after_silence(h: Harness) -> None:
    first = h.master.request(read_holding(1, 0, 1))
    second = h.master.request(read_holding(2, 0, 1))
    h.sent()
    first.cancel()
    assert result_of(first).check(defer.CancelledError)
    h.clock.advance(SILENCE)
    assert h.sent() == rtu(read_holding(2, 0, 1))
    h.receive(rtu(holding_response(2, [2])))
    assert result_of(second).registers == [2]
    h.assert_idle()


def test_cancelling_during_the_retry_silence_does_not_resend(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 1))
    h.sent()
    h.clock.advance(TIMEOUT)
    d.cancel()
    assert result_of(d).check(defer.CancelledError)
    h.clock.advance(SILENCE)
    assert h.sent() == b""
    h.assert_idle()


def test_unencodable_request_fails_without_sending(h: Harness) -> None:
    d = h.master.request(read_holding(1, 0, 200))  # more than 125 registers
    assert result_of(d).check(ValueError)
    assert h.sent() == b""
    h.assert_idle()


def test_a_connection_silent_for_longer_than_the_idle_timeout_is_closed() -> None:
    h = Harness(idle_timeout=60.0)
    h.clock.advance(59)
    h.receive(b"HB")
    h.clock.advance(59)
    assert not h.transport.disconnecting, "every byte received restarts the idle timer"
    h.clock.advance(1)
    assert h.transport.disconnecting
    h.master.connectionLost(Failure(ConnectionError("aborted")))
    h.assert_idle()


def test_the_idle_timer_goes_with_the_connection() -> None:
    h = Harness(idle_timeout=60.0)
    h.master.connectionLost(Failure(ConnectionError("gone")))
    h.assert_idle()


# -- Modbus TCP ------------------------------------------------------------------------


def test_mbap_transactions_pair_answers_and_skip_late_ones() -> None:
    h = Harness(framing=MbapFraming(), retries=0, silence=0.0)
    first = h.master.request(read_holding(1, 0, 1))
    assert h.sent() == mbap(read_holding(1, 0, 1), 1)
    h.clock.advance(TIMEOUT)
    assert result_of(first).check(ModbusTimeout)
    second = h.master.request(read_holding(1, 0, 1))
    assert h.sent() == mbap(read_holding(1, 0, 1), 2)
    h.receive(mbap(holding_response(1, [1]), 1) + b"HB" + mbap(holding_response(1, [2]), 2))
    assert result_of(second).registers == [2]
    assert h.master.counters.discarded_bytes == len(mbap(holding_response(1, [1]), 1))
    h.assert_idle()


def test_mbap_transaction_ids_wrap_around() -> None:
    h = Harness(framing=MbapFraming(), silence=0.0)
    h.master._transaction_id = 0xFFFF
    d = h.master.request(read_holding(1, 0, 1))
    assert h.sent()[:2] == b"\x00\x01"
    h.receive(mbap(holding_response(1, [1]), 1), one_at_a_time=False)
    assert result_of(d).registers == [1]
    h.assert_idle()


def test_a_connection_sending_mostly_junk_is_closed_and_logged_once() -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    from dtucenter.modbus.master import LINK_JUNK_LIMIT

    warnings: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if event.get("log_namespace") == "dtucenter.modbus.master" and event["log_level"] >= LogLevel.warn:
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness()
        d = h.master.request(read_holding(1, 0, 1))
        h.sent()
        for _ in range(16):  # 1 MiB of junk in reads of 64 KiB
            h.receive(b"\xaa\x55" * 32768, one_at_a_time=False)
        assert h.transport.disconnecting
        assert h.master.counters.closed_for_junk == 1
        # Cut off within a slice of passing the limit: a flood costs its first 64 KiB, not all of it.
        assert h.master.counters.discarded_bytes <= LINK_JUNK_LIMIT + 4096
        assert len(warnings) == 1
        h.master.connectionLost(Failure(ConnectionError("closed")))
        assert result_of(d).check(LinkDisconnected)
        h.assert_idle()
    finally:
        globalLogPublisher.removeObserver(observe)


def test_a_serial_line_is_not_closed_for_junk() -> None:
    clock = Clock()
    transport = StringTransport()
    master = ModbusMaster("bus", RtuFraming(), clock, timeout=TIMEOUT, retries=0, junk_limit=None)
    master.makeConnection(transport)
    for _ in range(8):
        master.dataReceived(b"\xff" * 65536)
    assert not transport.disconnecting and master.counters.discarded_bytes == 8 * 65536
