"""Raw exchanges: the sans-IO capture, and the master queueing them with its requests."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.errors import LinkDisconnected, LinkOffline
from dtucenter.modbus.framing import MbapFraming
from dtucenter.modbus.points import Point, PointType, Table
from dtucenter.modbus.poller import Poller
from dtucenter.modbus.raw import RawAnswer, RawCapture, frame_end
from tests.modbus.modbus_helpers import byte_by_byte, fired, holding_response, mbap, read_holding, result_of, rtu
from tests.modbus.test_master import SILENCE, Harness
from tests.modbus.test_poller import MemorySink

RAW_TIMEOUT = 2.0


# -- the capture ------------------------------------------------------------------------------------


def test_an_rtu_answer_ends_at_its_first_good_crc_even_fed_byte_by_byte() -> None:
    frame = rtu(holding_response(1, [7, 8]))
    capture = RawCapture("modbus-rtu", 4096)
    rest = b"".join(capture.feed(b) for b in byte_by_byte(frame + b"HB"))
    assert capture.complete and not capture.truncated
    assert capture.received == frame and rest == b"HB"


def test_an_rtu_answer_behind_a_heartbeat_ends_the_capture_too() -> None:
    frame = rtu(holding_response(1, [7, 8]))
    capture = RawCapture("modbus-rtu", 4096)
    for byte in byte_by_byte(b"HB\x00" + frame):
        capture.feed(byte)
    assert capture.complete and capture.received == b"HB\x00" + frame


def test_a_broken_crc_is_not_the_end_of_an_rtu_answer() -> None:
    frame = bytearray(rtu(holding_response(1, [7, 8])))
    frame[-1] ^= 0xFF
    capture = RawCapture("modbus-rtu", 4096)
    capture.feed(bytes(frame))
    assert not capture.done and capture.received == bytes(frame)


def test_a_modbus_tcp_answer_ends_where_its_mbap_length_says() -> None:
    frame = mbap(holding_response(1, [1, 2, 3]), 9)
    assert frame_end("modbus-tcp", frame[:-1]) is None
    assert frame_end("modbus-tcp", frame + b"xx") == len(frame)


def test_bytes_are_collected_until_the_bound_and_the_rest_is_handed_back() -> None:
    capture = RawCapture("bytes", 5)
    assert capture.feed(b"OK\r\n") == b"" and not capture.done
    assert capture.feed(b"+CSQ: 20") == b"CSQ: 20"
    assert capture.truncated and capture.received == b"OK\r\n+"


# -- the master ---------------------------------------------------------------------------------------


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_a_raw_exchange_waits_for_the_request_in_flight_and_the_next_poll_waits_for_it(h: Harness) -> None:
    """A raw exchange racing the polls: each gets its own answer, nothing interleaves."""
    poll = h.master.request(read_holding(1, 0, 1))
    assert h.sent() == rtu(read_holding(1, 0, 1))
    raw = h.master.exchange(b"AT+CSQ\r\n", timeout=RAW_TIMEOUT, expect="bytes", max_bytes=4096)
    next_poll = h.master.request(read_holding(1, 1, 1))
    assert h.sent() == b"", "the raw bytes wait for the request in flight"

    h.receive(rtu(holding_response(1, [1])))
    assert result_of(poll).registers == [1]
    assert h.sent() == b"AT+CSQ\r\n"
    # Every byte is the exchange's now: a heartbeat, and even what looks like the next poll's answer.
    h.receive(b"HB+CSQ: 20,0\r\n" + rtu(holding_response(1, [2])))
    assert h.sent() == b"" and not fired(raw) and not fired(next_poll)
    assert h.master.counters.heartbeats == 0 and h.master.counters.discarded_bytes == 0

    h.clock.advance(RAW_TIMEOUT)
    answer = result_of(raw)
    assert answer == RawAnswer(b"HB+CSQ: 20,0\r\n" + rtu(holding_response(1, [2])), False, False, RAW_TIMEOUT)
    assert h.sent() == b"", "the line stays quiet first, as after a timeout"
    h.clock.advance(SILENCE)
    assert h.sent() == rtu(read_holding(1, 1, 1))
    h.receive(rtu(holding_response(1, [3])))
    assert result_of(next_poll).registers == [3]
    assert h.master.counters.raw_exchanges == 1
    h.assert_idle()


def test_a_raw_modbus_answer_ends_the_exchange_at_once_and_what_follows_is_the_readers(h: Harness) -> None:
    request = rtu(read_holding(5, 0, 2))
    raw = h.master.exchange(request, timeout=RAW_TIMEOUT, expect="modbus-rtu", max_bytes=4096)
    assert h.sent() == request
    h.receive(rtu(holding_response(5, [10, 20])) + b"HB")
    answer = result_of(raw)
    assert answer.received == rtu(holding_response(5, [10, 20])) and answer.complete and answer.elapsed == 0
    assert h.master.counters.heartbeats == 1, "the heartbeat behind the answer went to the reader"
    h.clock.advance(SILENCE)
    h.assert_idle()


def test_a_raw_exchange_on_modbus_tcp_ends_at_its_frame() -> None:
    h = Harness(framing=MbapFraming(), silence=0)
    frame = mbap(holding_response(1, [4]), 77)
    raw = h.master.exchange(mbap(read_holding(1, 0, 1), 77), timeout=RAW_TIMEOUT, expect="modbus-tcp",
                            max_bytes=4096)
    h.sent()
    h.receive(frame)
    answer = result_of(raw)
    assert answer.received == frame and answer.complete
    h.assert_idle()


def test_a_raw_answer_is_bounded(h: Harness) -> None:
    raw = h.master.exchange(b"AT+HELP\r\n", timeout=RAW_TIMEOUT, expect="bytes", max_bytes=16)
    h.receive(b"x" * 100, one_at_a_time=False)
    answer = result_of(raw)
    assert answer.received == b"x" * 16 and answer.truncated and not answer.complete
    h.clock.advance(SILENCE)
    h.assert_idle()


def test_a_raw_exchange_on_a_closed_connection_fails_offline(h: Harness) -> None:
    h.master.connectionLost(None)
    failure = result_of(h.master.exchange(b"\x01", timeout=1, expect="bytes", max_bytes=10))
    assert isinstance(failure, Failure) and failure.check(LinkOffline)


def test_a_disconnect_during_a_raw_exchange_fails_it_and_the_queue(h: Harness) -> None:
    raw = h.master.exchange(b"\x01", timeout=RAW_TIMEOUT, expect="bytes", max_bytes=10)
    poll = h.master.request(read_holding(1, 0, 1))
    h.receive(b"partial")
    h.master.connectionLost(None)
    for d in (raw, poll):
        failure = result_of(d)
        assert isinstance(failure, Failure) and failure.check(LinkDisconnected)
    assert h.clock.getDelayedCalls() == []


def test_a_cancelled_raw_exchange_frees_the_line_after_the_quiet_period(h: Harness) -> None:
    raw = h.master.exchange(b"\x01", timeout=RAW_TIMEOUT, expect="bytes", max_bytes=10)
    poll = h.master.request(read_holding(1, 0, 1))
    h.sent()
    raw.cancel()
    failure = result_of(raw)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    h.clock.advance(SILENCE)
    assert h.sent() == rtu(read_holding(1, 0, 1))
    h.receive(rtu(holding_response(1, [9])))
    assert result_of(poll).registers == [9]
    h.assert_idle()


def test_a_queued_raw_exchange_can_be_cancelled_before_it_is_sent(h: Harness) -> None:
    poll = h.master.request(read_holding(1, 0, 1))
    raw = h.master.exchange(b"\x01", timeout=RAW_TIMEOUT, expect="bytes", max_bytes=10)
    raw.cancel()
    failure = result_of(raw)
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    h.receive(rtu(holding_response(1, [9])), one_at_a_time=False)
    assert result_of(poll).registers == [9]
    assert h.sent() == rtu(read_holding(1, 0, 1)), "the cancelled exchange never went out"
    h.assert_idle()


def test_a_raw_exchange_racing_a_scheduled_poll_goes_between_its_blocks_and_both_get_their_answers(
    h: Harness,
) -> None:
    """The poller's blocks and the raw exchange share the master's queue: the exchange goes out
    when the block in flight is answered, the next block after it, and no answer is mixed up."""
    near = Point("near", Table.HOLDING, 0, PointType.UINT16)
    far = Point("far", Table.HOLDING, 200, PointType.UINT16)
    sink = MemorySink()
    settings = MeterSettings(name="m", link="bus", unit=1, interval=60.0, points=(near, far))
    poller = Poller([settings], {"bus": h.master}, sink, h.clock)
    poller.startService()
    h.clock.advance(0)
    assert h.sent() == rtu(read_holding(1, 0, 1))
    raw = h.master.exchange(rtu(read_holding(1, 0, 1)), timeout=RAW_TIMEOUT, expect="modbus-rtu", max_bytes=4096)

    h.receive(rtu(holding_response(1, [11])))
    assert h.sent() == rtu(read_holding(1, 0, 1)), "the raw exchange, not the poll's second block"
    h.receive(rtu(holding_response(1, [99])))
    assert result_of(raw).received == rtu(holding_response(1, [99]))
    h.clock.advance(SILENCE)
    assert h.sent() == rtu(read_holding(1, 200, 1))
    h.receive(rtu(holding_response(1, [22])))
    assert sink.values == [("m", 0.0, {"near": 11, "far": 22})]
    poller.stopService()
    assert h.clock.getDelayedCalls() == []
