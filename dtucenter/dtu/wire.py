"""The DTU binary protocol, sans-IO: bytes in, typed messages out, and back.

Frame layout (all integers big-endian)::

    Head (2) | Type (1) | Length (2) | Data (Length - 1) | CheckSum (1)

Length counts the bytes from Data through CheckSum; CheckSum is the sum of
the bytes from Type through the last Data byte, modulo 256.

This module imports nothing from Twisted so the simulator, benchmarks and
any other tool can share it.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
import struct
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol, Self, TypeAlias

import attrs

from dtucenter.addresses import ipv4_octets

DEFAULT_HEAD = b"\xaa\x55"
DEFAULT_MAX_LENGTH = 1024
#: A stream that yields this many bytes without a single valid frame is
#: not a DTU; the session closes it.
DEFAULT_GARBAGE_LIMIT = 64 * 1024
#: The same before a login, where the first frame must be a Login.
DEFAULT_LOGIN_GARBAGE_LIMIT = 4 * 1024

LOGIN_ACCEPTED = 0xEA
LOGIN_REFUSED = 0x00

_TYPE_AND_LENGTH = struct.Struct(">BH")


class WireError(ValueError):
    """Data that cannot be a message of the type it claims to be."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    return sum(data) & 0xFF


@attrs.frozen
class Register:
    """One entry of a DTU's register list: slave address and register address."""

    dev: int
    addr: int


@attrs.frozen
class RegisterValue:
    dev: int
    addr: int
    value: int


class Message(Protocol):
    TYPE: ClassVar[int]

    def encode_data(self) -> bytes: ...


_REGISTER = struct.Struct(">BH")
_REGISTER_VALUE = struct.Struct(">BHh")


def _u8(value: int, name: str) -> None:
    if not 0 <= value <= 0xFF:
        raise WireError(f"{name} must be 0..255, got {value}")


def _encode_registers(registers: Sequence[Register]) -> bytes:
    try:
        return b"".join(_REGISTER.pack(r.dev, r.addr) for r in registers)
    except struct.error as e:
        raise WireError(f"register out of range (dev 0..255, addr 0..65535): {e}") from None


def _decode_registers(data: bytes) -> tuple[Register, ...]:
    if len(data) % _REGISTER.size:
        raise WireError(f"register list of {len(data)} bytes is not a multiple of 3")
    return tuple(Register(d, a) for d, a in _REGISTER.iter_unpack(data))


def _encode_register_values(items: Sequence[RegisterValue]) -> bytes:
    try:
        return b"".join(_REGISTER_VALUE.pack(i.dev, i.addr, i.value) for i in items)
    except struct.error as e:
        raise WireError(
            f"register value out of range (dev 0..255, addr 0..65535, value -32768..32767): {e}"
        ) from None


def _decode_register_values(data: bytes) -> tuple[RegisterValue, ...]:
    if len(data) % _REGISTER_VALUE.size:
        raise WireError(f"register/value list of {len(data)} bytes is not a multiple of 5")
    return tuple(RegisterValue(d, a, v) for d, a, v in _REGISTER_VALUE.iter_unpack(data))


def _encode_values(values: Sequence[int]) -> bytes:
    try:
        return struct.pack(f">{len(values)}h", *values)
    except struct.error as e:
        raise WireError(f"value out of range -32768..32767: {e}") from None


def _decode_values(data: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise WireError(f"value list of {len(data)} bytes is not a multiple of 2")
    return struct.unpack(f">{len(data) // 2}h", data)


# -- messages ---------------------------------------------------------------


@attrs.frozen
class Login:
    TYPE: ClassVar[int] = 0x01
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct(">II8sH20s")

    psn: int
    password: int
    pname: str = ""
    cur_ver: int = 0
    ccid: str = ""

    def encode_data(self) -> bytes:
        try:
            return self._LAYOUT.pack(
                self.psn,
                self.password,
                self.pname.encode("ascii"),
                self.cur_ver,
                self.ccid.encode("ascii"),
            )
        except (struct.error, UnicodeEncodeError) as e:
            raise WireError(f"Login field out of range: {e}") from None

    @classmethod
    def decode_data(cls, data: bytes) -> Login:
        if len(data) != cls._LAYOUT.size:
            raise WireError(f"Login carries {cls._LAYOUT.size} bytes, got {len(data)}")
        psn, password, pname, cur_ver, ccid = cls._LAYOUT.unpack(data)
        return cls(psn, password, _text(pname), cur_ver, _text(ccid))


def _text(raw: bytes) -> str:
    # Devices pad with NUL (the seed) or spaces; either way the padding is not part of the name.
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace").strip()


@attrs.frozen
class LoginAck:
    TYPE: ClassVar[int] = 0x81
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct(">BBBBBHH4s")

    right: int
    fota_flag: int = 0
    tick_time: int = 60
    send_test_mode: int = 255
    send_test_time: int = 0
    new_ver: int = 0
    new_port: int = 0
    new_ip: str = "0.0.0.0"

    @property
    def accepted(self) -> bool:
        return self.right == LOGIN_ACCEPTED

    def encode_data(self) -> bytes:
        try:
            return self._LAYOUT.pack(
                self.right,
                self.fota_flag,
                self.tick_time,
                self.send_test_mode,
                self.send_test_time,
                self.new_ver,
                self.new_port,
                ip_to_bytes(self.new_ip),
            )
        except struct.error as e:
            raise WireError(f"LoginAck field out of range: {e}") from None

    @classmethod
    def decode_data(cls, data: bytes) -> LoginAck:
        if len(data) != cls._LAYOUT.size:
            raise WireError(f"LoginAck carries {cls._LAYOUT.size} bytes, got {len(data)}")
        right, fota_flag, tick_time, send_test_mode, send_test_time, new_ver, new_port, ip = cls._LAYOUT.unpack(data)
        return cls(
            right, fota_flag, tick_time, send_test_mode, send_test_time, new_ver, new_port,
            new_ip=".".join(str(b) for b in ip),
        )


def ip_to_bytes(ip: str) -> bytes:
    try:
        return ipv4_octets(ip)
    except ValueError as e:
        raise WireError(str(e)) from None


# Data layouts several messages share. Each message class names its code and
# fields and spells out its two methods with these helpers, so that the types
# of its fields are checked where they are used.


class _NoData:
    __slots__ = ()

    def encode_data(self) -> bytes:
        return b""

    @classmethod
    def decode_data(cls, data: bytes) -> Self:
        if data:
            raise WireError(f"{cls.__name__} carries no data, got {len(data)} bytes")
        return cls()


def _encode_setup(send_test_time: int, registers: Sequence[Register]) -> bytes:
    """SendTestTime u8, then the register list."""
    _u8(send_test_time, "SendTestTime")
    return bytes([send_test_time]) + _encode_registers(registers)


def _decode_setup(data: bytes, missing: str) -> tuple[int, tuple[Register, ...]]:
    if not data:
        raise WireError(missing)
    return data[0], _decode_registers(data[1:])


class _ResultData:
    """Acks whose Data is Result u8 and, only when Result is 1, the rest of their fields."""

    __slots__ = ()
    result: int

    @property
    def ok(self) -> bool:
        return self.result == 1

    def _encode_result(self, rest: Callable[[], bytes]) -> bytes:
        _u8(self.result, "Result")
        return bytes([self.result]) + (rest() if self.result == 1 else b"")

    @classmethod
    def _split_result(cls, data: bytes) -> bytes | None:
        """The Data after Result when Result is 1, else None (Result is ``data[0]``)."""
        if not data:
            raise WireError(f"{cls.__name__} needs at least Result")
        return data[1:] if data[0] == 1 else None


@attrs.frozen
class SendTick(_NoData):
    TYPE: ClassVar[int] = 0x02


@attrs.frozen
class SendTickAck(_NoData):
    TYPE: ClassVar[int] = 0x82


@attrs.frozen
class SaveSetup:
    TYPE: ClassVar[int] = 0x03

    send_test_time: int
    registers: tuple[Register, ...] = ()

    def encode_data(self) -> bytes:
        return _encode_setup(self.send_test_time, self.registers)

    @classmethod
    def decode_data(cls, data: bytes) -> SaveSetup:
        return cls(*_decode_setup(data, "SaveSetup needs at least SendTestTime"))


@attrs.frozen
class SaveSetupAck(_ResultData):
    TYPE: ClassVar[int] = 0x83

    result: int
    send_test_time: int = 0
    registers: tuple[Register, ...] = ()

    def encode_data(self) -> bytes:
        return self._encode_result(lambda: _encode_setup(self.send_test_time, self.registers))

    @classmethod
    def decode_data(cls, data: bytes) -> SaveSetupAck:
        rest = cls._split_result(data)
        if rest is None:
            return cls(data[0])
        return cls(1, *_decode_setup(rest, "SaveSetupAck with Result 1 needs SendTestTime"))


@attrs.frozen
class ReadSetup(_NoData):
    TYPE: ClassVar[int] = 0x04


@attrs.frozen
class ReadSetupAck:
    TYPE: ClassVar[int] = 0x84

    send_test_time: int
    registers: tuple[Register, ...] = ()

    def encode_data(self) -> bytes:
        return _encode_setup(self.send_test_time, self.registers)

    @classmethod
    def decode_data(cls, data: bytes) -> ReadSetupAck:
        return cls(*_decode_setup(data, "ReadSetupAck needs at least SendTestTime"))


@attrs.frozen
class SendTest:
    TYPE: ClassVar[int] = 0x05

    net_state: int
    test_code: int
    values: tuple[int, ...] = ()

    def encode_data(self) -> bytes:
        _u8(self.net_state, "NetState")
        _u8(self.test_code, "TestCode")
        return bytes([self.net_state, self.test_code]) + _encode_values(self.values)

    @classmethod
    def decode_data(cls, data: bytes) -> SendTest:
        if len(data) < 2:
            raise WireError("SendTest needs at least NetState and TestCode")
        return cls(data[0], data[1], _decode_values(data[2:]))


@attrs.frozen
class SendTestAck:
    TYPE: ClassVar[int] = 0x85

    test_code: int

    def encode_data(self) -> bytes:
        _u8(self.test_code, "TestCode")
        return bytes([self.test_code])

    @classmethod
    def decode_data(cls, data: bytes) -> SendTestAck:
        if len(data) != 1:
            raise WireError(f"SendTestAck carries 1 byte, got {len(data)}")
        return cls(data[0])


@attrs.frozen
class ReadTest:
    TYPE: ClassVar[int] = 0x06

    registers: tuple[Register, ...]

    def encode_data(self) -> bytes:
        return _encode_registers(self.registers)

    @classmethod
    def decode_data(cls, data: bytes) -> ReadTest:
        return cls(_decode_registers(data))


@attrs.frozen
class ReadTestAck(_ResultData):
    TYPE: ClassVar[int] = 0x86

    result: int
    values: tuple[int, ...] = ()

    def encode_data(self) -> bytes:
        return self._encode_result(lambda: _encode_values(self.values))

    @classmethod
    def decode_data(cls, data: bytes) -> ReadTestAck:
        rest = cls._split_result(data)
        return cls(data[0]) if rest is None else cls(1, _decode_values(rest))


@attrs.frozen
class SetControl:
    TYPE: ClassVar[int] = 0x07

    registers: tuple[RegisterValue, ...]

    def encode_data(self) -> bytes:
        return _encode_register_values(self.registers)

    @classmethod
    def decode_data(cls, data: bytes) -> SetControl:
        return cls(_decode_register_values(data))


@attrs.frozen
class SetControlAck(_ResultData):
    TYPE: ClassVar[int] = 0x87

    result: int
    registers: tuple[RegisterValue, ...] = ()

    def encode_data(self) -> bytes:
        return self._encode_result(lambda: _encode_register_values(self.registers))

    @classmethod
    def decode_data(cls, data: bytes) -> SetControlAck:
        rest = cls._split_result(data)
        return cls(data[0]) if rest is None else cls(1, _decode_register_values(rest))


AnyMessage: TypeAlias = (
    Login | LoginAck | SendTick | SendTickAck | SaveSetup | SaveSetupAck | ReadSetup | ReadSetupAck
    | SendTest | SendTestAck | ReadTest | ReadTestAck | SetControl | SetControlAck
)
#: A message class: what the parser looks up by type code and decodes with.
MessageClass: TypeAlias = type[AnyMessage]

#: The one table of type codes. Uplink messages come from the DTU.
MESSAGE_CLASSES: tuple[MessageClass, ...] = (
    Login, LoginAck, SendTick, SendTickAck, SaveSetup, SaveSetupAck, ReadSetup,
    ReadSetupAck, SendTest, SendTestAck, ReadTest, ReadTestAck, SetControl, SetControlAck,
)
MESSAGE_TYPES: Mapping[int, MessageClass] = {cls.TYPE: cls for cls in MESSAGE_CLASSES}
UPLINK_TYPES = frozenset(
    cls.TYPE for cls in (Login, SendTick, SaveSetupAck, ReadSetupAck, SendTest, ReadTestAck, SetControlAck)
)


# -- framing ----------------------------------------------------------------


@attrs.frozen
class Dialect:
    """What a deployment may change about the framing."""

    head: bytes = attrs.field(default=DEFAULT_HEAD)
    max_length: int = attrs.field(default=DEFAULT_MAX_LENGTH)

    @head.validator
    def _check_head(self, _attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not 1 <= len(value) <= 8:
            raise ValueError(f"frame head must be 1..8 bytes, got {len(value)}")

    @max_length.validator
    def _check_max_length(self, _attribute: attrs.Attribute[int], value: int) -> None:
        # 2 bytes of Length, and room for the largest fixed-size message (Login).
        if not 64 <= value <= 0xFFFF:
            raise ValueError(f"max frame length must be 64..65535, got {value}")


DEFAULT_DIALECT = Dialect()


def encode_frame(message: Message, dialect: Dialect = DEFAULT_DIALECT) -> bytes:
    data = message.encode_data()
    length = len(data) + 1
    if length > dialect.max_length:
        raise WireError(
            f"{type(message).__name__} needs Length {length}, over the limit of {dialect.max_length}"
        )
    body = _TYPE_AND_LENGTH.pack(message.TYPE, length) + data
    return dialect.head + body + bytes([checksum(body)])


def send_test_ack_frames(dialect: Dialect = DEFAULT_DIALECT) -> tuple[bytes, ...]:
    """The encoded SendTestAck of every TestCode, by TestCode: the frame sent most often."""
    return tuple(encode_frame(SendTestAck(code), dialect) for code in range(256))


def max_items(per_item: int, fixed: int = 0, dialect: Dialect = DEFAULT_DIALECT) -> int:
    """How many items of ``per_item`` bytes fit one frame after ``fixed`` bytes of Data."""
    return (dialect.max_length - 1 - fixed) // per_item


# Parser events besides decoded messages. They carry what an operator needs
# in a log line: what was wrong and how many bytes were thrown away.


@attrs.frozen
class BadChecksum:
    type_code: int
    expected: int
    received: int


@attrs.frozen
class OversizedFrame:
    type_code: int
    length: int
    limit: int


@attrs.frozen
class UnknownType:
    type_code: int
    length: int


@attrs.frozen
class MalformedMessage:
    type_code: int
    reason: str


@attrs.frozen
class Skipped:
    """Bytes thrown away while looking for the next frame head.

    ``heads`` counts the frame heads among them that could not start a frame
    (a Length over the limit, an unknown type) beyond the first of each run,
    which is reported on its own: a stream of heads costs a count, not an event each.
    """

    count: int
    heads: int = 0


@attrs.frozen
class AbandonedFrame:
    """A head whose claimed frame was still incomplete when a valid frame behind it was
    complete: its Length was corrupt, and the parser resynchronised on the later frame."""

    type_code: int
    length: int


PROBLEM_TYPES = (BadChecksum, OversizedFrame, UnknownType, MalformedMessage, Skipped, AbandonedFrame)
ParseProblem: TypeAlias = BadChecksum | OversizedFrame | UnknownType | MalformedMessage | Skipped | AbandonedFrame
ParseEvent: TypeAlias = AnyMessage | ParseProblem

#: The parsed bytes are cut off the buffer once they are this many and at least
#: half of it: one copy per that many bytes, not one per frame or per read.
_COMPACT_AT = 4096


def _byte_range(low: int, high: int) -> bytes:
    return b"[" + re.escape(bytes([low])) + b"-" + re.escape(bytes([high])) + b"]"


def _plausible_head(head: bytes, types: Mapping[int, MessageClass], max_length: int) -> re.Pattern[bytes]:
    """A head followed by a known type and a Length of 1..max_length: where a frame may start.

    Built once per dialect: a parser is made per connection, and a junk source makes thousands.
    """
    return _plausible_head_for(head, tuple(sorted(types)), max_length)


@functools.lru_cache(maxsize=16)
def _plausible_head_for(head: bytes, types: tuple[int, ...], max_length: int) -> re.Pattern[bytes]:
    if not types:
        return re.compile(b"(?!)")
    type_class = b"[" + b"".join(re.escape(bytes([code])) for code in types) + b"]"
    high, low = divmod(max_length, 256)
    zero = re.escape(b"\x00")
    if high == 0:
        lengths = [zero + _byte_range(1, low)]
    else:
        lengths = [zero + _byte_range(1, 255), re.escape(bytes([high])) + _byte_range(0, low)]
        if high > 1:
            lengths.append(_byte_range(1, high - 1) + b".")
    return re.compile(re.escape(head) + type_class + b"(?:" + b"|".join(lengths) + b")", re.DOTALL)


class FrameParser:
    """Incremental parser: ``feed`` bytes, get the messages and problems found.

    It never raises on input. On a bad checksum, an oversized Length or an
    unknown type it drops the head it was looking at and resynchronises on
    the next one, so one corrupt frame costs only itself. A head whose
    Length is corrupt but plausible would hold back the frames behind it
    until that many bytes arrived; so while the frame at the head is
    incomplete, the heads behind it are tried too, and the first of them
    whose frame is complete and valid wins (:class:`AbandonedFrame`). The
    price: a frame that is still arriving and carries a whole valid frame
    inside its Data loses to that inner frame (that takes a head, a known
    type, a fitting Length and a matching checksum inside Data).

    The cost is linear in the bytes fed, whatever they are: one regular
    expression finds the next head that may start a frame (heads that cannot
    are counted, not looked at one by one), checksums come from running sums
    computed once per byte, the heads behind an incomplete frame are
    remembered by where their frames end rather than searched again at every
    read, and the buffer is an offset into a ``bytearray`` compacted once per
    ``_COMPACT_AT`` bytes. ``examined`` counts the heads looked at, for tests.

    ``garbage`` counts the bytes received since the last valid frame; the
    owner decides when that is too much.
    """

    def __init__(self, dialect: Dialect = DEFAULT_DIALECT, types: Mapping[int, MessageClass] = MESSAGE_TYPES) -> None:
        self._head = dialect.head
        self._header_size = len(dialect.head) + _TYPE_AND_LENGTH.size
        self._max_length = dialect.max_length
        self._types = types
        self._plausible = _plausible_head(dialect.head, types, dialect.max_length)
        self._buffer = bytearray()
        #: Where the unparsed bytes start in ``_buffer``.
        self._pos = 0
        #: ``_sums[i]`` is the sum of ``_buffer[:i]``, as far as it was needed.
        self._sums = array("Q", [0])
        #: Heads behind an incomplete frame: those before ``_look_from`` were tried, and
        #: those whose frames were still incomplete wait in ``_waiting`` as (end, start).
        self._look_from = 0
        self._waiting: list[tuple[int, int]] = []
        self.garbage = 0
        self.examined = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> list[ParseEvent]:
        self._buffer += data
        self.garbage += len(data)
        events: list[ParseEvent] = []
        self._drain(events.append)
        self._compact()
        return events

    def _drain(self, emit: Callable[[ParseEvent], None]) -> None:
        buf = self._buffer
        header_size = self._header_size
        head = self._head
        head_len = len(head)
        types = self._types
        max_length = self._max_length
        search = self._plausible.search
        pos = self._pos
        skipped = skipped_heads = 0
        #: After a bad checksum this read may be a stream of overlapping false frames:
        #: checksums then come from the running sums, each byte added once.
        careful = False
        try:
            while True:
                if pos == len(buf):
                    return  # the usual case: the data ended with a whole frame
                # The usual case first: the next head starts a frame. Else the regular
                # expression finds the next one that may, past any number that cannot.
                start = buf.find(head, pos)
                if start >= 0 and start + header_size <= len(buf):
                    type_code, length = _TYPE_AND_LENGTH.unpack_from(buf, start + head_len)
                    if not (0 < length <= max_length and type_code in types):
                        match = search(buf, start)
                        start = match.start() if match is not None else self._tail(start)
                else:
                    start = self._tail(pos)
                if start > pos:
                    skipped += start - pos
                    skipped_heads += self._implausible_heads(pos, start, emit)
                    pos = start
                if pos + header_size > len(buf):
                    return
                self.examined += 1
                type_code, length = _TYPE_AND_LENGTH.unpack_from(buf, pos + head_len)
                end = pos + header_size + length
                if len(buf) < end:
                    later = self._complete_frame_behind(pos)
                    if later < 0:
                        return
                    emit(AbandonedFrame(type_code, length))
                    skipped += later - pos
                    pos = later
                    continue
                if careful:
                    expected = self._sum(pos + head_len, end - 1) & 0xFF
                else:
                    expected = sum(memoryview(buf)[pos + head_len : end - 1]) & 0xFF
                if expected != buf[end - 1]:
                    emit(BadChecksum(type_code, expected, buf[end - 1]))
                    careful = True
                    skipped += 1
                    pos += 1
                    continue
                data = bytes(buf[pos + header_size : end - 1])
                pos = end
                if skipped:
                    emit(Skipped(skipped, skipped_heads))
                    skipped = skipped_heads = 0
                try:
                    message = types[type_code].decode_data(data)
                except WireError as e:
                    emit(MalformedMessage(type_code, str(e)))
                    continue
                self.garbage = len(buf) - pos
                emit(message)
        finally:
            if skipped:
                emit(Skipped(skipped, skipped_heads))
            self._pos = pos

    def _tail(self, pos: int) -> int:
        """Where the bytes that may still start a frame begin, when no whole header after ``pos`` can.

        A head whose header is not all here yet, or the beginning of a split head.
        """
        buf = self._buffer
        last_header = max(pos, len(buf) - self._header_size + 1)
        start = buf.find(self._head, last_header)
        if start >= 0:
            return start
        return len(buf) - _partial_head_suffix(buf, last_header, self._head)

    def _implausible_heads(self, pos: int, stop: int, emit: Callable[[ParseEvent], None]) -> int:
        """Report the first head in ``buf[pos:stop]`` (none can start a frame); count the others."""
        buf = self._buffer
        head = self._head
        first = buf.find(head, pos, stop + len(head) - 1)
        if first < 0:
            return 0
        type_code, length = _TYPE_AND_LENGTH.unpack_from(buf, first + len(head))
        if length < 1 or length > self._max_length:
            emit(OversizedFrame(type_code, length, self._max_length))
        else:
            emit(UnknownType(type_code, length))
        return buf.count(head, first + 1, stop + len(head) - 1)

    def _complete_frame_behind(self, pos: int) -> int:
        """Where the first complete, valid frame behind the incomplete one at ``pos`` starts, or -1.

        Heads tried before are not searched again: those whose frames were
        incomplete wait by where they end and are checked once that many
        bytes are here; the search for new heads goes on where it stopped.
        """
        buf = self._buffer
        available = len(buf)
        waiting = self._waiting
        complete: list[tuple[int, int]] = []
        while waiting and waiting[0][0] <= available:
            end, start = heapq.heappop(waiting)
            if start > pos and self._valid_at(start, end):
                complete.append((end, start))
        if complete:
            # The first wins; the others wait on, for the incomplete frames that may come between.
            found = min(complete, key=lambda entry: entry[1])
            for entry in complete:
                if entry is not found:
                    heapq.heappush(waiting, entry)
            return found[1]
        search = self._plausible.search
        look = max(self._look_from, pos + 1)
        while True:
            match = search(buf, look)
            if match is None:
                # A head found later starts where its whole header was not here yet.
                self._look_from = max(look, available - self._header_size + 1)
                return -1
            start = match.start()
            self.examined += 1
            look = start + 1
            _type_code, length = _TYPE_AND_LENGTH.unpack_from(buf, start + len(self._head))
            end = start + self._header_size + length
            if end > available:
                heapq.heappush(waiting, (end, start))
            elif self._valid_at(start, end):
                self._look_from = look
                return start

    def _valid_at(self, start: int, end: int) -> bool:
        """Whether the complete frame from ``start`` to ``end`` has a matching checksum."""
        return self._sum(start + len(self._head), end - 1) & 0xFF == self._buffer[end - 1]

    def _sum(self, start: int, stop: int) -> int:
        """The sum of ``_buffer[start:stop]``, from running sums each byte is added to once."""
        sums = self._sums
        known = len(sums) - 1
        if stop > known:
            running = itertools.accumulate(memoryview(self._buffer)[known:stop], initial=sums[known])
            next(running)
            sums.extend(running)
        return sums[stop] - sums[start]

    def _compact(self) -> None:
        pos = self._pos
        size = len(self._buffer)
        if not pos or (pos < size and (pos < _COMPACT_AT or 2 * pos < size)):
            return
        del self._buffer[:pos]
        self._pos = 0
        self._sums = self._sums[pos:] if len(self._sums) > pos else array("Q", [0])
        self._look_from = max(self._look_from - pos, 0)
        self._waiting = [(end - pos, start - pos) for end, start in self._waiting if start >= pos]
        heapq.heapify(self._waiting)


def _partial_head_suffix(buf: bytearray, pos: int, head: bytes) -> int:
    """Length of the longest tail of ``buf[pos:]`` that is a proper prefix of ``head``."""
    for keep in range(min(len(head) - 1, len(buf) - pos), 0, -1):
        if buf.endswith(head[:keep]):
            return keep
    return 0


def parse_head(text: str) -> bytes:
    """``"AA55"`` (or ``"aa 55"``, ``"0xAA55"``) -> ``b"\\xaa\\x55"``, for configuration."""
    cleaned = text.strip().removeprefix("0x").removeprefix("0X").replace(" ", "")
    try:
        head = bytes.fromhex(cleaned)
    except ValueError:
        raise WireError(f"frame head must be hex digits like 'AA55', got {text!r}") from None
    if not head:
        raise WireError("frame head must not be empty")
    return head
