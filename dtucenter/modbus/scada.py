"""The Modbus TCP server for SCADA, sans-IO: requests in, answers out.

SCADA masters read a meter under its ``scada_unit`` as if they were reading the meter
itself: a read of a point's table and address answers the latest polled value encoded
the way the meter encodes it (the inverse of :func:`~dtucenter.modbus.points.decode_registers`:
the scale undone, the type packed, the words in the point's order); writes are forwarded
to the meter (:meth:`ModbusBridge.write <dtucenter.modbus.service.ModbusBridge.write>`)
and answered with its result. Which exception answers what is in :class:`Exception_`
and docs/integrations.md.

Three layers, none of them doing I/O: :class:`RequestReader` cuts MBAP frames out of a
byte stream and decodes their PDUs strictly (pymodbus' request decoder accepts truncated
requests, and logs); :class:`Gateway` answers one request from the meters' latest
values or by forwarding a write; :class:`ClientRequests` keeps one connection's answers
in the order of its requests, with a bounded number in flight. ``scada_server.py`` is
the thin Twisted side.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.junk import ProblemSummary
from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.errors import (
    EXCEPTION_NAMES,
    LinkDisconnected,
    LinkOffline,
    ModbusError,
    ModbusExceptionResponse,
    ModbusTimeout,
)
from dtucenter.modbus.framing import MAX_MBAP_LENGTH, MBAP_HEADER
from dtucenter.modbus.points import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    Point,
    PointType,
    PointValueError,
    Table,
    Value,
    decode_registers,
    encode_registers,
    raw_value,
)
from dtucenter.modbus.poller import UnknownMeter, UnknownPoint

log = Logger()

#: Most registers and coils one write request may carry (the Modbus spec's limits).
MAX_WRITE_REGISTERS = 123
MAX_WRITE_BITS = 1968
#: Requests of one connection answered or in flight at once before it is read no further.
DEFAULT_MAX_PENDING = 16


class Exception_(enum.IntEnum):
    """The exception codes the server answers with."""

    #: A function code the server does not serve (only 1-6, 15 and 16 are).
    ILLEGAL_FUNCTION = 0x01
    #: An address of the request is not covered by a point of the meter (or a write covers
    #: part of a point only).
    ILLEGAL_DATA_ADDRESS = 0x02
    #: A request malformed for its function (count, byte count, coil value), or a value
    #: the point cannot hold.
    ILLEGAL_DATA_VALUE = 0x03
    #: The meter answered a write with something else than its echo; a bug.
    SERVER_DEVICE_FAILURE = 0x04
    #: No meter answers under this unit id: the gateway has no path to it.
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    #: The meter's value is missing, too old or its latest read failed; a forwarded write
    #: timed out or its link is offline. SCADA software takes this as "device not
    #: responding" and marks the tag's quality bad, which is what it is; 0x04 would
    #: claim the server itself broke.
    GATEWAY_TARGET_FAILED = 0x0B


# -- the wire ---------------------------------------------------------------------------------


@attrs.frozen
class Frame:
    """One MBAP frame from a client: the transaction id and unit to answer with, and the PDU."""

    transaction_id: int
    unit: int
    pdu: bytes


@attrs.frozen
class BadHeader:
    """The stream holds something that is not an MBAP header: it cannot be followed any further."""

    reason: str
    data: bytes


class RequestReader:
    """Cuts MBAP frames out of a byte stream; never holds more than one frame's bytes beyond
    what it was given, never raises."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> None:
        if not self.broken:
            self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> Frame | BadHeader | None:
        """The next whole frame, a :class:`BadHeader` (after which the reader takes nothing more),
        or None until more bytes arrive."""
        if self.broken or len(self._buffer) < MBAP_HEADER:
            return None
        buffer = self._buffer
        transaction_id, protocol, length, unit = struct.unpack_from(">HHHB", buffer)
        if protocol != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
            self.broken = True
            data = bytes(buffer[:16])
            self._buffer = bytearray()
            reason = f"protocol id {protocol}" if protocol != 0 else f"length {length}"
            return BadHeader(f"not a Modbus TCP header ({reason})", data)
        size = MBAP_HEADER - 1 + length
        if len(buffer) < size:
            return None
        pdu = bytes(buffer[MBAP_HEADER:size])
        del buffer[:size]
        return Frame(transaction_id, unit, pdu)


@attrs.frozen
class Read:
    table: Table
    address: int
    count: int


@attrs.frozen
class Write:
    """FC 5, 6, 15 or 16: ``values`` are registers, or bits (0/1) for coils."""

    table: Table
    address: int
    values: tuple[int, ...]


Request = Read | Write

_READS = {1: Table.COIL, 2: Table.DISCRETE, 3: Table.HOLDING, 4: Table.INPUT}


def decode_request(pdu: bytes) -> Request | Exception_:
    """A request PDU, or the exception that answers it."""
    function = pdu[0] if pdu else 0
    if function not in (*_READS, 5, 6, 15, 16):
        return Exception_.ILLEGAL_FUNCTION
    if len(pdu) < 5:
        return Exception_.ILLEGAL_DATA_VALUE
    address, word = struct.unpack_from(">HH", pdu, 1)
    request: Request
    if function in _READS:
        table = _READS[function]
        limit = MAX_READ_BITS if table.holds_bits else MAX_READ_REGISTERS
        well_formed, span, request = len(pdu) == 5 and 1 <= word <= limit, word, Read(table, address, word)
    elif function == 5:
        request = Write(Table.COIL, address, (int(word != 0),))
        well_formed, span = len(pdu) == 5 and word in (0xFF00, 0), 1
    elif function == 6:
        well_formed, span, request = len(pdu) == 5, 1, Write(Table.HOLDING, address, (word,))
    else:
        count, byte_count, data = word, pdu[5] if len(pdu) > 5 else -1, pdu[6:]
        if function == 15:
            well_formed = 1 <= count <= MAX_WRITE_BITS and byte_count == (count + 7) // 8 == len(data)
            values = tuple((data[i // 8] >> (i % 8)) & 1 for i in range(count)) if well_formed else ()
            request = Write(Table.COIL, address, values)
        else:
            well_formed = 1 <= count <= MAX_WRITE_REGISTERS and byte_count == 2 * count == len(data)
            request = Write(Table.HOLDING, address, struct.unpack(f">{count}H", data) if well_formed else ())
        span = count
    if not well_formed:
        return Exception_.ILLEGAL_DATA_VALUE
    if address + span > 65536:
        return Exception_.ILLEGAL_DATA_ADDRESS
    return request


def read_response(function: int, table: Table, values: Sequence[int]) -> bytes:
    """The PDU answering a read: packed bits, or registers."""
    if table.holds_bits:
        packed = bytearray((len(values) + 7) // 8)
        for index, bit in enumerate(values):
            if bit:
                packed[index // 8] |= 1 << (index % 8)
        return bytes([function, len(packed)]) + packed
    return bytes([function, 2 * len(values)]) + struct.pack(f">{len(values)}H", *values)


def write_response(pdu: bytes) -> bytes:
    """FC 5 and 6 echo the request; FC 15 and 16 echo its address and count."""
    return pdu if pdu[0] in (5, 6) else pdu[:5]


def exception_response(function: int, code: Exception_ | int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, int(code)])


def mbap(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu


# -- answering ----------------------------------------------------------------------------------


class Meters(Protocol):
    """What the server needs from the bridge: implemented by :class:`~dtucenter.modbus.service.ModbusBridge`."""

    def scada_meter(self, unit: int) -> MeterSettings | None: ...

    def latest_values(self, meter: str) -> Mapping[str, tuple[Value, float]]: ...

    def write(self, meter: str, point: str, value: object) -> defer.Deferred[None]: ...


class Refused(Exception):
    """A request answered with an exception code; ``why`` goes into the connection's summary in the log."""

    def __init__(self, code: Exception_ | int, why: str) -> None:
        super().__init__(why)
        self.code = code


@attrs.frozen
class _Span:
    point: Point
    end: int


class AddressMap:
    """Which point covers which address of a meter's tables: built once per meter definition, so
    that a request costs a look-up per address, not a walk over the meter's points."""

    def __init__(self, points: Sequence[Point]) -> None:
        #: (table, address) -> the first point (in the meter's order) covering it, and the first starting there.
        self._covering: dict[tuple[Table, int], _Span] = {}
        self._starting: dict[tuple[Table, int], _Span] = {}
        for point in points:
            span = _Span(point, point.end)
            self._starting.setdefault((point.table, point.address), span)
            for address in range(point.address, span.end):
                self._covering.setdefault((point.table, address), span)

    def cover(self, table: Table, address: int, count: int, *, whole: bool) -> Iterator[_Span]:
        """The points that cover ``address .. address+count-1`` of ``table``, in address order.

        Every address must be covered; with ``whole`` (writes) each point must start inside
        the range and end inside it. Where points overlap, the first point (in the meter's
        order) that covers an address is the one read.
        """
        end = address + count
        at = address
        found = self._starting if whole else self._covering
        while at < end:
            span = found.get((table, at))
            if span is None or (whole and span.end > end):
                what = "no point" if span is None else f"only part of {span.point.name}"
                raise Refused(Exception_.ILLEGAL_DATA_ADDRESS, f"{table.value} {at}: {what}")
            yield span
            at = span.end


class Gateway:
    """Answers one request of one unit: reads from the latest polled values, writes by the meter."""

    def __init__(self, meters: Meters, clock: IReactorTime) -> None:
        self._meters = meters
        self._clock = clock
        #: Meter name -> the definition its map was built from, and the map.
        self._maps: dict[str, tuple[MeterSettings, AddressMap]] = {}

    def _map(self, meter: MeterSettings) -> AddressMap:
        known = self._maps.get(meter.name)
        if known is None or known[0] is not meter:  # new, or redefined since (a new settings object)
            if len(self._maps) > 4 * 247:  # meters renamed or removed over time: start afresh
                self._maps.clear()
            known = self._maps[meter.name] = (meter, AddressMap(meter.points))
        return known[1]

    def answer(self, unit: int, pdu: bytes, problems: ProblemSummary) -> bytes | defer.Deferred[bytes]:
        """The response PDU to a request PDU, at once or (for a write) once the meter answered.

        Each exception answered is counted in ``problems``, the asking connection's, with why.
        """
        function = pdu[0] if pdu else 0
        try:
            request = decode_request(pdu)
            if isinstance(request, Exception_):
                raise Refused(request, "malformed or unserved request")
            meter = self._meters.scada_meter(unit)
            if meter is None:
                raise Refused(Exception_.GATEWAY_PATH_UNAVAILABLE, f"no meter has scada_unit {unit}")
            if isinstance(request, Read):
                return read_response(function, request.table, self._read(meter, request))
            d = defer.ensureDeferred(self._write(meter, request))
            return d.addCallbacks(
                lambda _: write_response(pdu), self._write_failed, errbackArgs=(unit, function, problems)
            )
        except Refused as refused:
            return _refusal(problems, unit, function, refused.code, str(refused))
        except Exception:
            log.failure("SCADA unit {unit}, function {function}: answering crashed", unit=unit, function=function)
            return _refusal(problems, unit, function, Exception_.SERVER_DEVICE_FAILURE, "internal error (see the log)")

    def _read(self, meter: MeterSettings, request: Read) -> list[int]:
        now = self._clock.seconds()
        try:
            latest = self._meters.latest_values(meter.name)
        except UnknownMeter:  # removed between the lookup and now
            raise Refused(Exception_.GATEWAY_PATH_UNAVAILABLE, f"meter {meter.name} is gone") from None
        values: list[int] = []
        for span in self._map(meter).cover(request.table, request.address, request.count, whole=False):
            point = span.point
            entry = latest.get(point.name)
            if entry is None:
                why = f"{meter.name}.{point.name}: no value, or its latest read failed"
                raise Refused(Exception_.GATEWAY_TARGET_FAILED, why)
            value, read_at = entry
            if now - read_at > meter.served_age:
                age = f"read {now - read_at:.1f} s ago, served up to {meter.served_age:g} s"
                raise Refused(Exception_.GATEWAY_TARGET_FAILED, f"{meter.name}.{point.name}: {age}")
            words = _encoded(point, value)
            first = max(request.address, point.address)
            last = min(request.address + request.count, span.end)
            values += words[first - point.address : last - point.address]
        return values

    async def _write(self, meter: MeterSettings, request: Write) -> None:
        """One write per point covered, in address order; the first that fails answers for all
        (the points before it are written)."""
        spans = list(self._map(meter).cover(request.table, request.address, len(request.values), whole=True))
        first = request.address
        values = [
            self._value(span.point, request.values[span.point.address - first : span.end - first]) for span in spans
        ]
        for point, value in zip([span.point for span in spans], values, strict=True):
            try:
                await self._meters.write(meter.name, point.name, value)
            except (UnknownMeter, UnknownPoint) as e:  # redefined while the write was under way
                raise Refused(Exception_.GATEWAY_PATH_UNAVAILABLE, str(e)) from None
            except PointValueError as e:
                raise Refused(Exception_.ILLEGAL_DATA_VALUE, str(e)) from None

    @staticmethod
    def _value(point: Point, words: Sequence[int]) -> Value:
        """The point's value (in its scaled unit) that the meter decodes from ``words``."""
        if point.table.holds_bits:
            return bool(words[0])
        if point.type is PointType.BOOL and words[0] not in (0, 1):
            raise Refused(Exception_.ILLEGAL_DATA_VALUE, f"{point.name} is a bool point: 0 or 1, not {words[0]}")
        return decode_registers(point, words)

    @staticmethod
    def _write_failed(failure: Failure, unit: int, function: int, problems: ProblemSummary) -> bytes:
        error = failure.value
        if isinstance(error, Refused):
            code: Exception_ | int = error.code
        elif isinstance(error, ModbusExceptionResponse):
            code = error.exception_code  # the meter's own refusal, passed on
        elif isinstance(error, ModbusTimeout | LinkOffline | LinkDisconnected):
            code = Exception_.GATEWAY_TARGET_FAILED
        elif isinstance(error, ModbusError):
            code = Exception_.SERVER_DEVICE_FAILURE
        else:
            log.failure("SCADA write crashed", failure)
            code = Exception_.SERVER_DEVICE_FAILURE
        return _refusal(problems, unit, function, code, str(error))


def _refusal(problems: ProblemSummary, unit: int, function: int, code: Exception_ | int, why: str) -> bytes:
    """The exception answer, counted with why for the connection's summary in the log."""
    name = EXCEPTION_NAMES.get(int(code), f"exception {int(code)}")
    problems.add(name, example=f"unit {unit}, function {function}: {why}")
    return exception_response(function, code)


def _encoded(point: Point, value: Value) -> list[int]:
    """What the meter holds for ``value``: the point's registers, or its bit."""
    if point.table.holds_bits:
        return [int(bool(value))]
    try:
        return encode_registers(point, raw_value(point, value))
    except PointValueError as e:  # a value the meter's own registers decoded to always fits
        raise Refused(Exception_.SERVER_DEVICE_FAILURE, str(e)) from None


# -- one connection -----------------------------------------------------------------------------


class ClientRequests:
    """One client's requests, answered in the order they came (simple masters match answers by
    order, not by transaction id), at most ``max_pending`` at once.

    ``send`` gets each answer frame, and :attr:`problems` counts the exceptions among them;
    :attr:`full` says the caller should stop reading the client until ``on_room`` is called.
    While :attr:`paused` (the client does not read its answers) no further request is taken;
    :meth:`resume` takes them again.
    """

    def __init__(
        self, gateway: Gateway, send: Callable[[bytes], None], *, on_room: Callable[[], None],
        problems: ProblemSummary, max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._gateway = gateway
        #: The exceptions answered, by name, for the connection's summary in the log.
        self.problems = problems
        self._send = send
        self._on_room = on_room
        self._max_pending = max_pending
        self._reader = RequestReader()
        #: Answers in request order: the frame, or None while its write is under way.
        self._queue: deque[list[bytes | None]] = deque()
        self._closed = False
        self.paused = False
        self.answered = 0

    @property
    def full(self) -> bool:
        return len(self._queue) >= self._max_pending

    def data_received(self, data: bytes) -> BadHeader | None:
        """Answers every whole request there is room for; a :class:`BadHeader` means close the connection."""
        self._reader.feed(data)
        return self._take()

    def _take(self) -> BadHeader | None:
        while not self.full and not self.paused and not self._closed:
            frame = self._reader.next_frame()
            if frame is None:
                return None
            if isinstance(frame, BadHeader):
                return frame
            slot: list[bytes | None] = [None]
            self._queue.append(slot)
            answer = self._gateway.answer(frame.unit, frame.pdu, self.problems)
            if isinstance(answer, bytes):
                slot[0] = mbap(frame.transaction_id, frame.unit, answer)
            else:
                answer.addCallback(self._answered, slot, frame)
            self._flush()
        return None

    def _answered(self, pdu: bytes, slot: list[bytes | None], frame: Frame) -> None:
        slot[0] = mbap(frame.transaction_id, frame.unit, pdu)
        was_full = self.full
        self._flush()
        if was_full and not self.full and not self._closed:
            self._on_room()

    def _flush(self) -> None:
        while self._queue and self._queue[0][0] is not None and not self._closed:
            frame = self._queue.popleft()[0]
            assert frame is not None
            self.answered += 1
            self._send(frame)

    def resume(self) -> BadHeader | None:
        """Answer what was read but left waiting while the queue was full or the client paused."""
        return self._take()

    def close(self) -> None:
        """The connection is gone: answers still under way are dropped when they come."""
        self._closed = True
        self._queue.clear()
