"""The sans-IO codec: every message round-trips; the parser survives any byte stream."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dtucenter.dtu import wire

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
i16 = st.integers(-32768, 32767)
ascii_text = lambda n: st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=n)  # noqa: E731
registers = st.lists(st.builds(wire.Register, u8, u16), max_size=50).map(tuple)
register_values = st.lists(st.builds(wire.RegisterValue, u8, u16, i16), max_size=50).map(tuple)
values = st.lists(i16, max_size=100).map(tuple)
ips = st.tuples(u8, u8, u8, u8).map(lambda t: ".".join(map(str, t)))

messages = st.one_of(
    st.builds(wire.Login, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), ascii_text(8), u16, ascii_text(20)),
    st.builds(wire.LoginAck, u8, u8, u8, u8, u8, u16, u16, ips),
    st.builds(wire.SendTick),
    st.builds(wire.SendTickAck),
    st.builds(wire.SaveSetup, u8, registers),
    st.builds(wire.SaveSetupAck, st.just(1), u8, registers),
    st.builds(wire.SaveSetupAck, st.integers(0, 255).filter(lambda r: r != 1)),
    st.builds(wire.ReadSetup),
    st.builds(wire.ReadSetupAck, u8, registers),
    st.builds(wire.SendTest, u8, u8, values),
    st.builds(wire.SendTestAck, u8),
    st.builds(wire.ReadTest, registers),
    st.builds(wire.ReadTestAck, st.just(1), values),
    st.builds(wire.ReadTestAck, st.just(0)),
    st.builds(wire.SetControl, register_values),
    st.builds(wire.SetControlAck, st.just(1), register_values),
    st.builds(wire.SetControlAck, st.just(0)),
)


def parse_all(data: bytes, parser: wire.FrameParser | None = None, step: int = 1) -> list[object]:
    parser = parser or wire.FrameParser()
    events: list[object] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i : i + step])
    return events


def messages_in(events: list[object]) -> list[object]:
    return [e for e in events if not isinstance(e, wire.PROBLEM_TYPES)]


@given(messages)
def test_every_message_round_trips_fed_byte_by_byte(message: object) -> None:
    frame = wire.encode_frame(message)  # type: ignore[arg-type]
    assert parse_all(frame) == [message]


@given(st.lists(messages, min_size=1, max_size=8), st.integers(1, 50))
def test_glued_frames_in_any_chunking(batch: list[object], step: int) -> None:
    stream = b"".join(wire.encode_frame(m) for m in batch)  # type: ignore[arg-type]
    assert parse_all(stream, step=step) == batch


@settings(max_examples=200)
@given(st.lists(st.one_of(messages, st.binary(max_size=40)), max_size=12), st.integers(1, 64))
def test_garbage_between_frames_costs_only_itself(parts: list[object], step: int) -> None:
    """Frames separated by random bytes: every frame that is not overlapped by garbage survives."""
    stream = b""
    expected = []
    for part in parts:
        if isinstance(part, bytes):
            # Garbage containing no head byte cannot start a false frame.
            stream += part.replace(b"\xaa", b"")
        else:
            stream += wire.encode_frame(part)  # type: ignore[arg-type]
            expected.append(part)
    events = parse_all(stream, step=step)
    assert messages_in(events) == expected


@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    parser = wire.FrameParser()
    parse_all(data, parser, step=7)
    # Only a possible frame's worth stays buffered.
    assert parser.buffered <= 2 + 3 + wire.DEFAULT_MAX_LENGTH


def test_known_bytes_of_a_login_frame() -> None:
    frame = wire.encode_frame(wire.Login(1, 2, "HS121", 3, "8986"))
    assert frame[:2] == b"\xaa\x55"
    assert frame[2] == 0x01
    assert int.from_bytes(frame[3:5], "big") == 38 + 1
    assert frame[5:9] == b"\x00\x00\x00\x01"
    assert frame[13:21] == b"HS121\x00\x00\x00"
    assert frame[-1] == sum(frame[2:-1]) & 0xFF


def test_bad_checksum_drops_frame_and_resyncs_on_next_head() -> None:
    good = wire.encode_frame(wire.SendTest(1, 2, (3,)))
    bad = bytearray(wire.encode_frame(wire.SendTest(9, 9, (9,))))
    bad[-1] ^= 0xFF
    events = parse_all(bytes(bad) + good)
    assert isinstance(events[0], wire.BadChecksum)
    assert messages_in(events) == [wire.SendTest(1, 2, (3,))]


def test_head_inside_a_corrupt_frame_is_tried() -> None:
    # A truncated frame followed by a good one: the parser must not swallow the good one's head.
    good = wire.encode_frame(wire.SendTick())
    truncated = wire.encode_frame(wire.SendTest(1, 2, (3, 4)))[:7]
    assert messages_in(parse_all(truncated + good + good)) == [wire.SendTick(), wire.SendTick()]


def test_oversized_length_is_rejected_without_waiting_for_it() -> None:
    parser = wire.FrameParser(wire.Dialect(max_length=64))
    events = parser.feed(b"\xaa\x55\x05\x04\x00" + wire.encode_frame(wire.SendTick()))
    assert isinstance(events[0], wire.OversizedFrame) and events[0].length == 1024
    assert messages_in(events) == [wire.SendTick()]


def test_unknown_type_and_malformed_data_are_reported() -> None:
    unknown = b"\xaa\x55\x7f\x00\x01" + bytes([0x7F + 0x00 + 0x01])
    malformed_body = b"\x01\x00\x02\x00"  # Login with 1 byte of data
    malformed = b"\xaa\x55" + malformed_body + bytes([sum(malformed_body) & 0xFF])
    events = parse_all(unknown + malformed + wire.encode_frame(wire.SendTick()))
    kinds = [type(e) for e in events if not isinstance(e, wire.Skipped)]
    assert kinds == [wire.UnknownType, wire.MalformedMessage, wire.SendTick]


def test_garbage_counter_resets_on_a_valid_frame() -> None:
    parser = wire.FrameParser()
    parser.feed(b"\x01" * 100)
    assert parser.garbage == 100
    parser.feed(wire.encode_frame(wire.SendTick()))
    assert parser.garbage == 0


#: A SendTest head whose Length (1024) is corrupt: its frame never completes in these tests.
CORRUPT_HEAD = b"\xaa\x55\x05\x04\x00"


@settings(max_examples=150)
@given(st.lists(messages, min_size=1, max_size=3), st.integers(1, 64))
def test_frames_behind_a_corrupt_length_are_not_held_back(batch: list[object], step: int) -> None:
    """A head claiming a long frame must not hold back the valid frames behind it until that many bytes came."""
    stream = b"".join(wire.encode_frame(m) for m in batch)  # type: ignore[arg-type]
    assume(len(stream) < 1024)  # so the corrupt frame never completes: only a resync finds the batch
    parser = wire.FrameParser()
    events = parse_all(CORRUPT_HEAD + stream, parser, step=step)
    assert messages_in(events) == batch
    assert [e for e in events if isinstance(e, wire.AbandonedFrame)] == [wire.AbandonedFrame(0x05, 1024)]
    assert parser.buffered == 0


@settings(max_examples=150)
@given(st.lists(st.one_of(messages, st.just(None)), min_size=1, max_size=6), st.integers(1, 64))
def test_frames_between_corrupt_lengths_all_come_through(parts: list[object], step: int) -> None:
    """Corrupt heads (None) anywhere among frames: every frame comes through, in any chunking."""
    stream = b"".join(CORRUPT_HEAD if p is None else wire.encode_frame(p) for p in parts)  # type: ignore[arg-type]
    assume(len(stream) < 1024)  # no corrupt frame completes
    batch = [p for p in parts if p is not None]
    parser = wire.FrameParser()
    events = parse_all(stream, parser, step=step)
    assert messages_in(events) == batch
    trailing = len(parts) - len(list(itertools.dropwhile(lambda p: p is None, reversed(parts))))
    assert parser.buffered == trailing * len(CORRUPT_HEAD)  # only the corrupt heads after the last frame wait


def test_a_quiet_dtu_tick_behind_a_corrupt_length_is_parsed_at_once() -> None:
    parser = wire.FrameParser()
    assert parser.feed(CORRUPT_HEAD) == []
    tick = wire.encode_frame(wire.SendTick())
    events: list[object] = []
    for byte in tick:
        events += parser.feed(bytes([byte]))
    assert messages_in(events) == [wire.SendTick()]


def test_a_whole_frame_carrying_a_frame_in_its_data_is_kept() -> None:
    # Register (0xAA, 0x5502), then (0x00, 0x0103): the bytes of a whole SendTick inside the Data.
    outer = wire.SaveSetup(1, (wire.Register(0xAA, 0x5502), wire.Register(0x00, 0x0103)))
    assert wire.encode_frame(wire.SendTick()) in wire.encode_frame(outer)
    assert parse_all(wire.encode_frame(outer), step=64) == [outer]


@pytest.mark.parametrize(
    "unit",
    [b"\xaa\x55", b"\xaa\x55\x05\x04\x01", b"\xaa\x55\x7f\x00\x01", bytes(range(256))],
    ids=["heads", "long-lengths", "unknown-types", "all-bytes"],
)
def test_junk_costs_a_count_not_an_event_per_head(unit: bytes) -> None:
    """Today's incident: 1.5 MiB of AA 55 cost an event, and a log line, per head."""
    junk = unit * (1024 * 1024 // len(unit))
    parser = wire.FrameParser()
    events: list[object] = []
    reads = 0
    for i in range(0, len(junk), 65536):
        events += parser.feed(junk[i : i + 65536])
        reads += 1
    assert len(events) <= 3 * reads
    skipped = [e for e in events if isinstance(e, wire.Skipped)]
    assert sum(e.count for e in skipped) + parser.buffered == len(junk)
    assert parser.examined == 0
    assert parser.buffered < 2 + 3
    # A frame right after the junk still gets through.
    assert messages_in(parser.feed(wire.encode_frame(wire.SendTick()))) == [wire.SendTick()]


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_false_frames_cost_linear_work(step: int) -> None:
    """Overlapping heads that may each start a long frame: each is looked at at most twice (at the
    front and from behind the front), and the head waiting at the front once per read."""
    false_frame = b"\xaa\x55\x05\x03\xff"  # SendTest, Length 1023
    count = 4000
    junk = false_frame * count
    parser = wire.FrameParser()
    parse_all(junk, parser, step=step)
    reads = -(-len(junk) // step)
    assert parser.examined <= 2 * count + reads
    assert parser.buffered <= 2 + 3 + wire.DEFAULT_MAX_LENGTH
    assert messages_in(parse_all(wire.encode_frame(wire.SendTick()), parser)) == [wire.SendTick()]


def test_configured_head() -> None:
    dialect = wire.Dialect(head=wire.parse_head("7E 7E 01"))
    frame = wire.encode_frame(wire.SendTick(), dialect)
    assert frame.startswith(b"\x7e\x7e\x01")
    assert parse_all(frame, wire.FrameParser(dialect)) == [wire.SendTick()]
    assert messages_in(parse_all(wire.encode_frame(wire.SendTick()), wire.FrameParser(dialect))) == []


@pytest.mark.parametrize("text", ["", "zz", "0x"])
def test_bad_head_text(text: str) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_head(text)


@pytest.mark.parametrize(
    "message",
    [
        wire.SendTest(1, 2, (40000,)),
        wire.SaveSetup(1, (wire.Register(256, 0),)),
        wire.SetControl((wire.RegisterValue(1, 70000, 0),)),
        wire.LoginAck(0xEA, new_ip="1.2.3"),
        wire.Login(2**32, 0),
        wire.SendTest(1, 2, tuple(range(600))),  # over the 1024-byte Length limit
    ],
)
def test_encoding_out_of_range_values_is_a_clear_error(message: object) -> None:
    with pytest.raises(wire.WireError):
        wire.encode_frame(message)  # type: ignore[arg-type]


def test_max_items_fits_a_frame() -> None:
    n = wire.max_items(3, fixed=1)
    wire.encode_frame(wire.SaveSetup(0, tuple(wire.Register(1, i) for i in range(n))))
    with pytest.raises(wire.WireError):
        wire.encode_frame(wire.SaveSetup(0, tuple(wire.Register(1, i) for i in range(n + 1))))
