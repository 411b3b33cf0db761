"""The sans-IO DTU stream filter: registration, heartbeats and responses at frame boundaries."""

from __future__ import annotations

from typing import Any

import pytest

from dtucenter.modbus.filter import (
    WAIT_FOR_MORE,
    BoundaryNoise,
    Discarded,
    LoginMatched,
    LoginPending,
    LoginRejected,
    NoisePacket,
    RegistrationReader,
    Response,
    ResponseReader,
    Strip,
    Stripped,
    decode_packet_option,
)
from dtucenter.modbus.framing import Expectation, MbapFraming, RtuFraming
from tests.modbus.modbus_helpers import (
    byte_by_byte,
    exception_response,
    holding_response,
    mbap,
    rtu,
)

HEARTBEAT = b"HB"
READ_HOLDING = 3


def feed_all(reader: ResponseReader, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


def kinds(events: list) -> list[str]:
    names = []
    for event in events:
        if isinstance(event, Response):
            names.append("response")
        elif isinstance(event, Stripped):
            names.append(event.noise.kind)
        elif isinstance(event, Discarded):
            names.append(event.reason)
    return names


def merged_junk(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Discarded))


def rtu_reader(heartbeat: bytes | None = HEARTBEAT, registration: bytes | None = None) -> ResponseReader:
    noise = BoundaryNoise.for_link(registration, registration is not None, heartbeat)
    return ResponseReader(RtuFraming(), noise)


def expect(reader: ResponseReader, unit: int = 1, function_code: int = READ_HOLDING, tid: int = 1) -> None:
    reader.expected = Expectation(unit, function_code, tid)


# -- packet options -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "packet"),
    [
        ("DTU-0001", b"DTU-0001"),
        ("hex:0A0B", b"\x0a\x0b"),
        ("hex:0a 0b ff", b"\x0a\x0b\xff"),
        ("héllo", "héllo".encode()),
    ],
)
def test_packet_options_decode_text_and_hex(text: str, packet: bytes) -> None:
    assert decode_packet_option(text) == packet


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hex:0G", "not valid hex"), ("hex:ABC", "not valid hex"), ("", "empty"), ("hex:", "empty"),
        ("x" * 129, "at most 128"),
    ],
)
def test_bad_packet_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_packet_option(text)


# -- registration ---------------------------------------------------------------


def test_registration_arriving_alone_matches() -> None:
    reader = RegistrationReader([b"DTU-0001", b"DTU-0002"])
    assert reader.feed(b"DTU-0002") == LoginMatched(b"DTU-0002", b"")


def test_registration_split_over_reads_waits_until_complete() -> None:
    reader = RegistrationReader([b"DTU-0001", b"DTU-0002"])
    results = [reader.feed(byte) for byte in byte_by_byte(b"DTU-0001")]
    assert results[:-1] == [LoginPending()] * 7
    assert results[-1] == LoginMatched(b"DTU-0001", b"")


def test_registration_glued_to_following_bytes_hands_them_on() -> None:
    reader = RegistrationReader([b"\x01\x02\x03"])
    assert reader.feed(b"\x01\x02") == LoginPending()
    assert reader.feed(b"\x03HB\x01\x03") == LoginMatched(b"\x01\x02\x03", b"HB\x01\x03")


def test_unknown_registration_is_rejected_as_soon_as_it_diverges() -> None:
    reader = RegistrationReader([b"DTU-0001"])
    assert reader.feed(b"DTU-") == LoginPending()
    assert reader.feed(b"9") == LoginRejected(b"DTU-9")


def test_registration_reader_decides_only_once() -> None:
    reader = RegistrationReader([b"A"])
    reader.feed(b"A")
    with pytest.raises(RuntimeError):
        reader.feed(b"A")


# -- noise at the head ------------------------------------------------------------


def test_boundary_noise_strips_whole_packets_and_waits_on_prefixes() -> None:
    noise = BoundaryNoise.for_link(b"DTU-1", True, b"HB")
    assert noise.at_head(b"HB\x01") == Strip(NoisePacket("heartbeat", b"HB"))
    assert noise.at_head(b"DTU-1\x01") == Strip(NoisePacket("registration", b"DTU-1"))
    assert noise.at_head(b"DT") is WAIT_FOR_MORE
    assert noise.at_head(b"H") is WAIT_FOR_MORE
    assert noise.at_head(b"\x01\x03") is None


def test_registration_is_noise_only_in_prefix_mode() -> None:
    assert BoundaryNoise.for_link(b"DTU-1", False, None).at_head(b"DTU-1") is None


# -- responses and heartbeats on an RTU stream --------------------------------------------


def test_heartbeat_while_idle_is_stripped_even_when_split() -> None:
    reader = rtu_reader()
    assert feed_all(reader, [b"H", b"B"]) == [Stripped(NoisePacket("heartbeat", HEARTBEAT))]
    assert reader.buffered == 0


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_heartbeats_glued_around_a_response_are_stripped(split: bool) -> None:
    reader = rtu_reader()
    expect(reader)
    response = rtu(holding_response(1, [0x1234, 0x5678]))
    stream = HEARTBEAT + response + HEARTBEAT
    events = feed_all(reader, byte_by_byte(stream) if split else [stream])
    assert kinds(events) == ["heartbeat", "response", "heartbeat"]
    assert events[1].pdu.registers == [0x1234, 0x5678]
    assert reader.expected is None
    assert reader.buffered == 0


def test_heartbeat_bytes_inside_a_response_are_left_alone() -> None:
    reader = rtu_reader()
    expect(reader)
    # Registers 0x4842 spell "HB": it must stay data.
    response = rtu(holding_response(1, [0x4842, 0x4842]))
    events = feed_all(reader, byte_by_byte(response))
    assert kinds(events) == ["response"]
    assert events[0].pdu.registers == [0x4842, 0x4842]


def test_heartbeat_colliding_with_the_response_start_does_not_corrupt_it() -> None:
    # A heartbeat that reads like "unit 1, function 3" is the worst case.
    heartbeat = b"\x01\x03"
    response = rtu(holding_response(1, [7]))
    reader = rtu_reader(heartbeat=heartbeat)
    expect(reader)
    events = feed_all(reader, byte_by_byte(heartbeat + response))
    assert kinds(events) == ["heartbeat", "response"]
    assert events[1].pdu.registers == [7]

    reader = rtu_reader(heartbeat=heartbeat)
    expect(reader)
    events = feed_all(reader, byte_by_byte(response))
    assert kinds(events) == ["response"]
    assert events[0].pdu.registers == [7]


def test_registration_prefix_is_stripped_before_every_packet() -> None:
    reader = rtu_reader(heartbeat=HEARTBEAT, registration=b"DTU-0001")
    expect(reader)
    first = b"DTU-0001" + rtu(holding_response(1, [1]))
    events = feed_all(reader, byte_by_byte(first))
    assert kinds(events) == ["registration", "response"]
    expect(reader, tid=2)
    second = b"DTU-0001HB" + rtu(holding_response(1, [2]))
    events = feed_all(reader, [second])
    assert kinds(events) == ["registration", "heartbeat", "response"]
    assert events[-1].pdu.registers == [2]


def test_junk_before_a_response_is_discarded_and_reported_once() -> None:
    reader = rtu_reader()
    expect(reader)
    response = rtu(holding_response(1, [9]))
    events = feed_all(reader, [b"\xff\x00\x17" + response])
    assert kinds(events) == ["junk", "response"]
    assert merged_junk(events) == b"\xff\x00\x17"


def test_response_with_bad_crc_is_not_taken() -> None:
    reader = rtu_reader()
    expect(reader)
    response = bytearray(rtu(holding_response(1, [9])))
    response[-1] ^= 0xFF
    events = feed_all(reader, [bytes(response)])
    assert Response not in {type(e) for e in events}
    assert reader.expected is not None


def test_response_from_another_unit_or_function_is_not_taken() -> None:
    reader = rtu_reader()
    expect(reader, unit=2)
    events = feed_all(reader, [rtu(holding_response(1, [9]))])
    assert kinds(events) == ["junk"]
    expect(reader, unit=1, function_code=4)
    events = feed_all(reader, [rtu(holding_response(1, [9]))])
    assert kinds(events) == ["junk"]


def test_exception_response_is_a_response() -> None:
    reader = rtu_reader()
    expect(reader)
    events = feed_all(reader, byte_by_byte(rtu(exception_response(1, 3, 2))))
    assert kinds(events) == ["response"]
    assert events[0].pdu.exception_code == 2


def test_a_stray_response_while_idle_is_junk() -> None:
    reader = rtu_reader()
    stray = rtu(holding_response(1, [9]))
    events = feed_all(reader, [stray + HEARTBEAT])
    assert kinds(events) == ["junk", "heartbeat"]
    assert merged_junk(events) == stray


def test_bytes_after_the_response_are_judged_as_idle() -> None:
    reader = rtu_reader()
    expect(reader)
    response = rtu(holding_response(1, [9]))
    # A second copy right behind cannot answer a request not yet sent.
    events = feed_all(reader, [response + response])
    assert kinds(events) == ["response", "junk"]


def test_flush_drops_a_partial_frame() -> None:
    reader = rtu_reader()
    expect(reader)
    response = rtu(holding_response(1, [9]))
    assert feed_all(reader, [response[:4]]) == []
    assert reader.flush() == response[:4]
    assert reader.buffered == 0


def test_waiting_is_bounded_by_the_longest_frame() -> None:
    reader = rtu_reader(heartbeat=None)
    expect(reader)
    # "unit 1, function 3, 255 bytes follow" and then never a valid CRC.
    events = feed_all(reader, [b"\x01\x03\xff" + b"\x00" * 300])
    assert reader.buffered < 260
    assert kinds(events) == ["junk"]


# -- Modbus TCP (MBAP) ----------------------------------------------------------


def mbap_reader(heartbeat: bytes | None = HEARTBEAT) -> ResponseReader:
    return ResponseReader(MbapFraming(), BoundaryNoise.for_link(None, False, heartbeat))


def test_mbap_response_is_matched_by_transaction_id() -> None:
    reader = mbap_reader()
    expect(reader, tid=7)
    late = mbap(holding_response(1, [1]), 6)
    current = mbap(holding_response(1, [2]), 7)
    events = feed_all(reader, byte_by_byte(late + HEARTBEAT + current))
    assert kinds(events) == ["foreign frame", "heartbeat", "response"]
    assert events[-1].pdu.registers == [2]
    assert events[-1].pdu.transaction_id == 7


def test_mbap_heartbeat_glued_before_and_after_response() -> None:
    reader = mbap_reader()
    expect(reader, tid=1)
    events = feed_all(reader, [HEARTBEAT + mbap(holding_response(1, [5]), 1) + HEARTBEAT])
    assert kinds(events) == ["heartbeat", "response", "heartbeat"]


def test_mbap_garbage_is_hunted_through() -> None:
    reader = mbap_reader(heartbeat=None)
    expect(reader, tid=1)
    events = feed_all(reader, [b"\x12\x34\x56\x78\x9a\xbc\xde" + mbap(holding_response(1, [5]), 1)])
    assert kinds(events) == ["junk", "response"]


# -- junk costs linear work ---------------------------------------------------------


class CountingFraming:
    """A framing that counts the bytes its probe is shown: the reader's work on junk."""

    def __init__(self, framing: RtuFraming | MbapFraming) -> None:
        self._framing = framing
        self.name = framing.name
        self.max_frame = framing.max_frame
        self.shown = 0

    def encode(self, request: Any, transaction_id: int) -> bytes:
        return self._framing.encode(request, transaction_id)

    def probe(self, buffer: bytes, expected: Expectation | None) -> Any:
        self.shown += len(buffer)
        return self._framing.probe(buffer, expected)

    def next_start(self, buffer: bytearray, start: int, stop: int, expected: Expectation | None) -> int:
        return self._framing.next_start(buffer, start, stop, expected)


@pytest.mark.parametrize("framing", [RtuFraming, MbapFraming])
@pytest.mark.parametrize(
    "unit", [b"\xaa\x55", bytes(range(256)), b"\x01\x03\x01\x03", b"\x00", b"HI"],
    ids=["aa55", "all-bytes", "false-rtu-heads", "zeros", "heartbeat-starts"],
)
def test_junk_costs_linear_work_and_keeps_a_sample(framing: type[RtuFraming | MbapFraming], unit: bytes) -> None:
    counting = CountingFraming(framing())
    reader = ResponseReader(counting, BoundaryNoise.for_link(None, False, HEARTBEAT))
    expect(reader)
    junk = unit * (256 * 1024 // len(unit))
    events = feed_all(reader, [junk[i : i + 65536] for i in range(0, len(junk), 65536)])
    # Each byte is shown to the probe a bounded number of times, not once per byte before it.
    assert counting.shown <= 16 * len(junk)
    discarded = [e for e in events if isinstance(e, Discarded)]
    assert sum(e.count for e in discarded) + reader.buffered == len(junk)
    assert all(len(e.data) <= 64 for e in discarded)
    assert reader.buffered <= counting.max_frame
    # The awaited answer right behind the junk still gets through.
    reader.flush()
    answer = rtu(holding_response(1, [7])) if framing is RtuFraming else mbap(holding_response(1, [7]), 1)
    assert kinds(feed_all(reader, [answer])) == ["response"]
