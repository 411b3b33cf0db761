"""Modbus RTU and MBAP (Modbus TCP) framing on top of pymodbus, sans-IO.

pymodbus supplies the PDU classes, frame sizes, CRC and MBAP encoding. Its
framers' ``decode`` assume a client that drops the whole buffer on any doubt,
which would also drop a heartbeat or the next frame glued behind a response,
so the head-of-buffer decisions are made here: every probe looks only at the
start of the buffer and says whether it is the awaited response, could still
become it, is some other whole frame, or is not a frame at all.
"""

from __future__ import annotations

import re
import struct
from typing import Protocol

import attrs
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

MAX_RTU_FRAME = 256
MBAP_HEADER = 7
MAX_MBAP_LENGTH = 254  # unit id + PDU, the PDU being at most 253 bytes


@attrs.frozen
class Expectation:
    """What the response to the request in flight must look like."""

    unit: int
    function_code: int
    transaction_id: int


@attrs.frozen
class Complete:
    """The head of the buffer is the awaited response."""

    length: int
    pdu: ModbusPDU


@attrs.frozen
class OtherFrame:
    """The head of the buffer is a whole frame that is not the awaited one."""

    length: int


class Incomplete:
    """The head of the buffer may still become the awaited response; wait for more bytes."""


class PartialOtherFrame:
    """The head of the buffer may be the start of a frame that is not the awaited one."""


class NotAFrame:
    """The head of the buffer cannot start a frame worth waiting for."""


INCOMPLETE = Incomplete()
PARTIAL_OTHER_FRAME = PartialOtherFrame()
NOT_A_FRAME = NotAFrame()

Probe = Complete | OtherFrame | Incomplete | PartialOtherFrame | NotAFrame


class Framing(Protocol):
    """Turns requests into bytes and recognises responses at a buffer's head."""

    name: str
    max_frame: int

    def encode(self, request: ModbusPDU, transaction_id: int) -> bytes: ...

    def probe(self, buffer: bytes, expected: Expectation | None) -> Probe: ...

    def next_start(self, buffer: bytearray, start: int, stop: int, expected: Expectation | None) -> int:
        """The first position in ``start:stop`` where :meth:`probe` may see more than junk,
        else ``stop``: every byte before it is junk, whatever follows. Looks at no more
        than the bytes up to ``stop`` and a header's worth after, so a caller that
        narrows ``stop`` pays only for what it skips."""


def _response_codes(function_code: int) -> tuple[int, int]:
    return function_code, function_code | 0x80


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/MODBUS of ``data``, as the two bytes behind an RTU frame read it little-endian.

    pymodbus's ``FramerRTU.compute_CRC`` computes the same, at about twice the cost (a class
    attribute and an ``int()`` per byte, and a swap): it runs on every response, so it counts.
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


_DECODE_ERRORS = (ModbusException, ValueError, IndexError, struct.error)


def _decode_pdu(pdu_class: type[ModbusPDU], data: bytes) -> ModbusPDU | None:
    """The PDU of class ``pdu_class`` (``DecodePDU.lookupPduClass``'s answer) in ``data``, the function
    code first; None if it does not decode.

    ``DecodePDU.decode`` does this too, but looks the class up again and formats the PDU as
    text for a debug line whether or not anyone logs it: a third of the decoding cost.
    """
    try:
        if pdu_class is ExceptionResponse:
            pdu: ModbusPDU = ExceptionResponse(data[0] & 0x7F)
        else:
            pdu = pdu_class()
        pdu.decode(data[1:])
    except _DECODE_ERRORS:
        return None
    return pdu


class RtuFraming:
    """RTU frames: unit id, PDU, CRC-16; nothing marks where a frame starts."""

    name = "rtu"
    max_frame = MAX_RTU_FRAME

    def __init__(self) -> None:
        self._decoder = DecodePDU(is_server=False)
        self._framer = FramerRTU(self._decoder)

    def encode(self, request: ModbusPDU, transaction_id: int) -> bytes:
        # FramerRTU.buildFrame's frame (its PDU's encode checks the fields), with the cheaper CRC.
        body = bytes((request.dev_id, request.function_code)) + request.encode()
        return body + crc16(body).to_bytes(2, "little")

    def next_start(self, buffer: bytearray, start: int, stop: int, expected: Expectation | None) -> int:
        if expected is None:
            return stop
        found = buffer.find(bytes([expected.unit]), start, stop)
        return found if found >= 0 else stop

    def probe(self, buffer: bytes, expected: Expectation | None) -> Probe:
        # Without a request in flight no byte can start a wanted frame, and RTU
        # has no header to skip a foreign frame by, so everything is junk.
        if expected is None or buffer[0] != expected.unit:
            return NOT_A_FRAME
        if len(buffer) < 2:
            return INCOMPLETE
        if buffer[1] not in _response_codes(expected.function_code):
            return NOT_A_FRAME
        pdu_class = self._decoder.lookupPduClass(buffer)
        if pdu_class is None:
            return NOT_A_FRAME
        try:
            size = pdu_class.calculateRtuFrameSize(buffer)
        except ModbusException:
            return NOT_A_FRAME
        if not size or len(buffer) < size:
            return INCOMPLETE
        body = buffer[: size - 2]
        if crc16(body) != int.from_bytes(buffer[size - 2 : size], "little"):
            return NOT_A_FRAME
        pdu = _decode_pdu(pdu_class, body[1:])
        if pdu is None:
            return NOT_A_FRAME
        pdu.dev_id = buffer[0]
        return Complete(size, pdu)


#: Transaction id, protocol id 0, length 2..254: where an MBAP header may start.
_MBAP_HEADER_START = re.compile(rb"..\x00\x00\x00[\x02-\xfe]", re.DOTALL)


class MbapFraming:
    """Modbus TCP frames: a 7-byte MBAP header (transaction, protocol 0, length, unit) and the PDU."""

    name = "tcp"
    max_frame = MBAP_HEADER - 1 + MAX_MBAP_LENGTH

    def __init__(self) -> None:
        self._decoder = DecodePDU(is_server=False)
        self._framer = FramerSocket(self._decoder)

    def encode(self, request: ModbusPDU, transaction_id: int) -> bytes:
        request.transaction_id = transaction_id
        return self._framer.buildFrame(request)

    def next_start(self, buffer: bytearray, start: int, stop: int, expected: Expectation | None) -> int:
        # A header needs protocol id zero and a length of 2..254; the last five bytes
        # may still become one.
        found = _MBAP_HEADER_START.search(buffer, start, min(len(buffer), stop + 5))
        if found is not None and found.start() < stop:
            return found.start()
        return min(stop, max(start, len(buffer) - 5))

    def probe(self, buffer: bytes, expected: Expectation | None) -> Probe:
        # The protocol id must be zero; anything else rules out a header.
        if any(buffer[2:4]):
            return NOT_A_FRAME
        if len(buffer) >= 6:
            length = int.from_bytes(buffer[4:6], "big")
            if not 2 <= length <= MAX_MBAP_LENGTH:
                return NOT_A_FRAME
            if len(buffer) >= 6 + length:
                return self._whole_frame(buffer, 6 + length, expected)
        return INCOMPLETE if self._may_be_awaited(buffer, expected) else PARTIAL_OTHER_FRAME

    @staticmethod
    def _may_be_awaited(buffer: bytes, expected: Expectation | None) -> bool:
        # The transaction id alone pairs a response with its request; units
        # behind gateways do not always echo the unit id faithfully.
        if expected is None:
            return False
        if not expected.transaction_id.to_bytes(2, "big").startswith(buffer[:2]):
            return False
        return len(buffer) < 8 or buffer[7] in _response_codes(expected.function_code)

    def _whole_frame(self, buffer: bytes, size: int, expected: Expectation | None) -> Probe:
        if not self._may_be_awaited(buffer, expected):
            return OtherFrame(size)
        _, unit, transaction_id, pdu_bytes = self._framer.decode(buffer[:size])
        try:
            pdu_class = self._decoder.lookupPduClass(buffer[6:size]) if pdu_bytes else None
        except _DECODE_ERRORS:
            pdu_class = None
        pdu = _decode_pdu(pdu_class, pdu_bytes) if pdu_class is not None else None
        if pdu is None:
            return OtherFrame(size)
        pdu.dev_id = unit
        pdu.transaction_id = transaction_id
        return Complete(size, pdu)


def framing_for(protocol: str) -> Framing:
    """The framing for a link's ``protocol`` setting (``rtu`` or ``tcp``)."""
    if protocol == "rtu":
        return RtuFraming()
    if protocol == "tcp":
        return MbapFraming()
    raise ValueError(f"unknown Modbus wire protocol {protocol!r}")
