"""Raw exchanges with a link: bytes out, whatever comes back, for remote debugging.

Sans-IO: :class:`RawCapture` collects what a link answers to one raw
exchange and says when the answer is over: at the first whole Modbus frame
(``modbus-rtu``: a CRC-valid answer frame, anywhere in what came; ``modbus-tcp``: the length its MBAP
header announces), at ``max_bytes``, or (``bytes``) only when the exchange's
time is up. The master (:mod:`dtucenter.modbus.master`) queues the exchange
with its requests and, while it runs, hands every byte it receives here.
"""

from __future__ import annotations

from typing import Literal

import attrs
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

Expect = Literal["modbus-rtu", "modbus-tcp", "bytes"]
EXPECT_KINDS: tuple[Expect, ...] = ("modbus-rtu", "modbus-tcp", "bytes")

#: Largest raw request and answer: a Modbus frame is at most 260 bytes, AT command answers a few hundred.
MAX_RAW_BYTES = 4096
#: Longest a raw exchange may wait, in seconds: it holds the link's bus that long.
MAX_RAW_TIMEOUT = 30.0

_MAX_RTU_FRAME = 256
_DECODER = DecodePDU(is_server=False)
_MBAP_HEADER = 6  # transaction, protocol and length: the length counts what follows them


@attrs.frozen
class RawAnswer:
    """What came back: ``complete`` when a whole frame ended it (never for ``bytes``),
    ``truncated`` when it filled ``max_bytes`` (what came after was not kept),
    ``elapsed`` seconds from send to the end."""

    received: bytes
    complete: bool
    truncated: bool
    elapsed: float


def frame_end(expect: Expect, buffer: bytes, checked: int = 0) -> int | None:
    """Where the first whole frame in ``buffer`` ends, or None while there is none.

    An RTU answer may come behind a DTU's heartbeat, so its frame may start anywhere;
    ``checked``: the first that many bytes were looked at before and held no whole frame.
    """
    if expect == "modbus-tcp":
        if len(buffer) < _MBAP_HEADER:
            return None
        end = _MBAP_HEADER + int.from_bytes(buffer[4:6], "big")
        return end if len(buffer) >= end else None
    if expect == "modbus-rtu":
        # Only frames ending in the new bytes are new; none is longer than _MAX_RTU_FRAME.
        for start in range(max(0, checked - _MAX_RTU_FRAME), len(buffer) - 3):
            frame_stop = _rtu_frame_end(buffer, start)
            if frame_stop is not None and frame_stop > checked:
                return frame_stop
    return None


def _rtu_frame_end(buffer: bytes, start: int) -> int | None:
    """Where an RTU answer (unit, PDU, good CRC) starting at ``start`` ends, if it is whole."""
    frame = buffer[start : start + _MAX_RTU_FRAME]
    pdu_class = _DECODER.lookupPduClass(frame)
    if pdu_class is None:
        return None
    try:
        size = pdu_class.calculateRtuFrameSize(frame)
    except ModbusException:
        return None
    if not size or size < 4 or size > len(frame):
        return None
    good = FramerRTU.check_CRC(frame[: size - 2], int.from_bytes(frame[size - 2 : size], "big"))
    return start + size if good else None


class RawCapture:
    """The bytes of one raw exchange's answer, bounded."""

    def __init__(self, expect: Expect, max_bytes: int) -> None:
        self.expect = expect
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self.complete = False
        self.truncated = False

    @property
    def done(self) -> bool:
        return self.complete or self.truncated

    @property
    def received(self) -> bytes:
        return bytes(self._buffer)

    def feed(self, data: bytes) -> bytes:
        """Take ``data``; returns what the answer had no room for (after it is done)."""
        if self.done:
            return data
        start = len(self._buffer)
        room = self.max_bytes - start
        self._buffer += data[:room]
        end = frame_end(self.expect, bytes(self._buffer), start)
        if end is not None:
            self.complete = True
            del self._buffer[end:]
            return data[end - start :]
        self.truncated = len(self._buffer) >= self.max_bytes
        return data[room:]
