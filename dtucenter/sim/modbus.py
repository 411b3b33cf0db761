"""Transparent DTUs with simulated Modbus meters behind them.

A transparent DTU dials the center, sends its registration packet, sends a
heartbeat packet every so often, and otherwise passes bytes between the
center and the meters on its RS-485 bus. Here the bus is a dict of
simulated meters; requests arrive as RTU frames (with CRC) or MBAP frames
(the DTU's Modbus TCP conversion mode). pymodbus does the framing, CRC and
PDUs; nothing of its asyncio client or server is used.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable
from typing import Final, TypeAlias

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsResponse,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsResponse,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
    WriteMultipleRegistersResponse,
    WriteSingleRegisterResponse,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from dtucenter.sim.links import Link
from dtucenter.sim.stats import SimStats

#: Registers and bits a simulated meter has (addresses 0..METER_SIZE-1).
METER_SIZE = 10_000
#: Bytes of unparseable input after which the buffer is thrown away.
MAX_BUFFER = 4096


def parse_packet_text(text: str) -> bytes:
    """Registration/heartbeat packets as config files write them: ``TEXT`` or ``hex:0A0B..``."""
    if text.startswith("hex:"):
        try:
            packet = bytes.fromhex(text[4:].replace(" ", ""))
        except ValueError:
            raise ValueError(f"not hex digits after 'hex:' in {text!r}") from None
    else:
        packet = text.encode("utf-8")
    if not packet:
        raise ValueError("a registration or heartbeat packet must not be empty")
    return packet


def numbered_registration(template: str, n: int) -> str:
    """The registration of DTU number ``n``: ``{n}`` in the text is replaced (format specs allowed,
    as in ``DTU-{n:04d}``); text without a placeholder gets the number appended."""
    if "{n" in template:
        try:
            return template.format(n=n)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad placeholder in registration {template!r}: {e}") from None
    return f"{template}{n}"


class Meter:
    """One Modbus slave: registers that follow slow waves over time, writable set-points."""

    def __init__(self, unit: int, clock: IReactorTime, rng: random.Random) -> None:
        self.unit = unit
        self.clock = clock
        self._base = rng.randrange(1000, 20000)
        self._phase = rng.random() * 2 * math.pi
        self._written: dict[int, int] = {}
        self._coils: dict[int, bool] = {}

    def register(self, address: int) -> int:
        written = self._written.get(address)
        if written is not None:
            return written
        t = self.clock.seconds()
        wave = math.sin(t / 30.0 + self._phase + address) * 500
        return int(self._base + address * 7 + wave + (int(t) % 10)) & 0xFFFF

    def bit(self, address: int) -> bool:
        return self._coils.get(address, (address + int(self.clock.seconds() / 10)) % 2 == 0)

    def answer(self, request: ModbusPDU) -> ModbusPDU:
        fc = request.function_code
        count = request.count or len(request.registers) or len(request.bits)
        if request.address + max(count, 1) > METER_SIZE:
            return ExceptionResponse(fc, ExcCodes.ILLEGAL_ADDRESS)
        addresses = range(request.address, request.address + count)
        if fc == 3:
            return ReadHoldingRegistersResponse(registers=[self.register(a) for a in addresses])
        if fc == 4:
            return ReadInputRegistersResponse(registers=[self.register(a) for a in addresses])
        if fc in (1, 2):
            response = ReadCoilsResponse if fc == 1 else ReadDiscreteInputsResponse
            return response(bits=[self.bit(a) for a in addresses])
        if fc == 6:
            self._written[request.address] = request.registers[0]
            return WriteSingleRegisterResponse(address=request.address, registers=list(request.registers))
        if fc == 16:
            for address, value in zip(addresses, request.registers, strict=False):
                self._written[address] = value
            return WriteMultipleRegistersResponse(address=request.address, count=count)
        if fc == 5:
            self._coils[request.address] = bool(request.bits[0])
            return WriteSingleCoilResponse(address=request.address, bits=[bool(request.bits[0])])
        if fc == 15:
            for address, value in zip(addresses, request.bits, strict=False):
                self._coils[address] = bool(value)
            return WriteMultipleCoilsResponse(address=request.address, count=count)
        return ExceptionResponse(fc, ExcCodes.ILLEGAL_FUNCTION)


#: (unit, transaction id, request PDU or None for an unknown function code, function code)
ParsedRequest: TypeAlias = tuple[int, int, ModbusPDU | None, int]


class _Skip(enum.Enum):
    """Bytes were consumed without a request to show for them."""

    SKIP = enum.auto()


_SKIP: Final = _Skip.SKIP
#: What one parsing step finds: a request, skipped bytes, or None when more input is needed.
_Step: TypeAlias = ParsedRequest | _Skip | None


class RequestParser:
    """Modbus requests out of a byte stream, sans-IO: RTU (CRC-checked) or MBAP.

    Returns (unit, transaction id, request PDU); an unknown function code
    yields a PDU-less entry so the meter can answer ILLEGAL_FUNCTION.
    """

    def __init__(self, protocol: str, stats: SimStats) -> None:
        if protocol not in ("rtu", "tcp"):
            raise ValueError(f"protocol must be rtu or tcp, got {protocol!r}")
        self.protocol = protocol
        self.stats = stats
        self.decoder = DecodePDU(is_server=True)
        self.framer = FramerRTU(self.decoder) if protocol == "rtu" else FramerSocket(self.decoder)
        self._buffer = b""

    def feed(self, data: bytes) -> list[ParsedRequest]:
        self._buffer += data
        found: list[ParsedRequest] = []
        step = self._next_rtu if self.protocol == "rtu" else self._next_mbap
        while self._buffer:
            item = step()
            if item is None:
                break
            if item is not _SKIP:
                found.append(item)
        if len(self._buffer) > MAX_BUFFER:
            self.stats.error("modbus_garbage")
            self._buffer = b""
        return found

    def _next_rtu(self) -> _Step:
        buf = self._buffer
        if len(buf) < FramerRTU.MIN_SIZE:
            return None
        pdu_class = self.decoder.lookupPduClass(buf)
        if pdu_class is None:
            return self._skip(1)
        size = pdu_class.calculateRtuFrameSize(buf)
        if not size:
            return None
        if len(buf) < size:
            return None
        if not FramerRTU.check_CRC(buf[: size - 2], int.from_bytes(buf[size - 2 : size], "big")):
            # Not a frame start after all (noise, or a heartbeat fragment): hunt from the next byte.
            return self._skip(1)
        self._buffer = buf[size:]
        return self._decoded(buf[0], 0, buf[1 : size - 2])

    def _next_mbap(self) -> _Step:
        buf = self._buffer
        if len(buf) >= 8 and buf[2:4] != b"\x00\x00":
            return self._skip(1)
        used, unit, tid, pdu_bytes = self.framer.decode(buf)
        if not used:
            return None
        self._buffer = buf[used:]
        return self._decoded(unit, tid, pdu_bytes)

    def _decoded(self, unit: int, tid: int, pdu_bytes: bytes) -> ParsedRequest | _Skip:
        if not pdu_bytes:
            return _SKIP
        pdu = self.decoder.decode(pdu_bytes)
        return unit, tid, pdu, pdu_bytes[0]

    def _skip(self, count: int) -> _Skip:
        self._buffer = self._buffer[count:]
        self.stats.count("modbus_bytes_skipped", count)
        return _SKIP




class Heartbeat:
    """The heartbeat packet a transparent DTU sends every ``interval`` seconds while connected."""

    def __init__(self, packet: bytes | None, interval: float, clock: IReactorTime, stats: SimStats) -> None:
        self.packet = packet
        self.interval = interval
        self.clock = clock
        self.stats = stats
        self._link: Link | None = None
        self._call: IDelayedCall | None = None

    def start(self, link: Link) -> None:
        self._link = link
        if self.packet is not None and self.interval > 0:
            self._call = self.clock.callLater(self.interval, self._beat)

    def stop(self) -> None:
        self._link = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _beat(self) -> None:
        self._call = None
        link = self._link
        if link is not None and self.packet is not None:
            link.write(self.packet)
            self.stats.count("heartbeats")
            self.start(link)


#: USR's registration send types: on connect only, in front of every packet only, or both.
REGISTRATION_MODES = ("connect", "data", "both")


class PacketDevice:
    """A transparent DTU's connection duties: the registration packet, then heartbeats.

    ``registration_mode`` is when the registration is sent, as a USR DTU's "send type":
    ``connect`` once when connected, ``data`` in front of every packet only (so the DTU
    says nothing until its first heartbeat or answer), ``both`` both. In ``data`` and
    ``both`` the heartbeat carries the prefix too, unless ``bare_heartbeats``.
    """

    def __init__(
        self, registration: bytes, clock: IReactorTime, stats: SimStats,
        heartbeat: bytes | None, heartbeat_interval: float,
        registration_mode: str = "connect", bare_heartbeats: bool = False,
    ) -> None:
        if registration_mode not in REGISTRATION_MODES:
            raise ValueError(f"registration mode must be one of {', '.join(REGISTRATION_MODES)}")
        self.registration = registration
        self.registration_mode = registration_mode
        self.clock = clock
        self.stats = stats
        self._prefix = registration if registration_mode != "connect" else b""
        if heartbeat is not None and not bare_heartbeats:
            heartbeat = self._prefix + heartbeat
        self.heartbeat = Heartbeat(heartbeat, heartbeat_interval, clock, stats)
        self.link: Link | None = None

    def connection_made(self, link: Link) -> None:
        self.link = link
        self.stats.connected += 1
        self.stats.logged_in += 1
        if self.registration_mode != "data":
            link.write(self.registration)
            self.stats.count("registrations")
        self.heartbeat.start(link)

    def send_data(self, data: bytes) -> None:
        """Send what the serial side produced as one packet, prefixed as the mode says."""
        if self.link is not None:
            self.link.write(self._prefix + data)

    def connection_lost(self) -> None:
        if self.link is None:
            return
        self.link = None
        self.stats.connected -= 1
        self.stats.logged_in -= 1
        self.stop()

    def stop(self) -> None:
        self.heartbeat.stop()


class TransparentDTU(PacketDevice):
    """A pass-through DTU: registration (per ``registration_mode``), heartbeats, meters answering requests."""

    def __init__(
        self,
        registration: bytes,
        protocol: str,
        meters: Iterable[Meter],
        clock: IReactorTime,
        stats: SimStats,
        heartbeat: bytes | None = None,
        heartbeat_interval: float = 30.0,
        registration_mode: str = "connect",
        bare_heartbeats: bool = False,
    ) -> None:
        super().__init__(registration, clock, stats, heartbeat, heartbeat_interval, registration_mode, bare_heartbeats)
        self.protocol = protocol
        self.meters = {meter.unit: meter for meter in meters}
        self._parser = RequestParser(protocol, stats)
        self._framer = self._parser.framer

    def connection_made(self, link: Link) -> None:
        # A new connection starts a new byte stream: nothing half-received survives it.
        self._parser = RequestParser(self.protocol, self.stats)
        super().connection_made(link)

    def data_received(self, data: bytes) -> None:
        for unit, tid, request, function_code in self._parser.feed(data):
            self._answer(unit, tid, request, function_code)

    def _answer(self, unit: int, tid: int, request: ModbusPDU | None, function_code: int) -> None:
        meter = self.meters.get(unit)
        if meter is None:
            # Nobody on the bus answers to that address: the master times out, as with a real bus.
            self.stats.count("unknown_unit")
            return
        if request is None:
            response: ModbusPDU = ExceptionResponse(function_code, ExcCodes.ILLEGAL_FUNCTION)
        else:
            response = meter.answer(request)
        if response.isError():
            self.stats.count("exceptions")
        response.dev_id = unit
        response.transaction_id = tid
        self.stats.count("polls")
        self.send_data(self._framer.buildFrame(response))


def meters_for(units: Iterable[int], clock: IReactorTime, rng: random.Random) -> list[Meter]:
    return [Meter(unit, clock, rng) for unit in units]


def parse_units(text: str) -> list[int]:
    """``"1,2,3"`` or ``"1-4,7"`` -> unit ids 1..247."""
    units: list[int] = []
    for item in text.split(","):
        part = item.strip()
        if not part:
            continue
        low_text, _, high_text = part.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if high_text else low
        except ValueError:
            raise ValueError(f"not a unit id or range: {part!r}") from None
        if not 1 <= low <= high <= 247:
            raise ValueError(f"unit ids must be 1..247, got {part!r}")
        units.extend(range(low, high + 1))
    if not units:
        raise ValueError("give at least one unit id")
    return sorted(set(units))


# Kept near the parser so the tests build requests the way a center would.
def build_request(framer_protocol: str, request: ModbusPDU) -> bytes:
    framer = FramerRTU(DecodePDU(is_server=False)) if framer_protocol == "rtu" else FramerSocket(
        DecodePDU(is_server=False)
    )
    return framer.buildFrame(request)


def decode_response(framer_protocol: str, data: bytes) -> ModbusPDU | None:
    decoder = DecodePDU(is_server=False)
    framer = FramerRTU(decoder) if framer_protocol == "rtu" else FramerSocket(decoder)
    _, pdu = framer.handleFrame(data, 0, 0)
    return pdu
