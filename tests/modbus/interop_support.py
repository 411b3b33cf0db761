"""Real peers for the interop tests: pymodbus's server, socat pty pairs, a fake DTU, a waiting sink."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import threading
from collections.abc import Callable, Mapping

from pymodbus.framer import FramerType
from pymodbus.pdu import DecodePDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall

from tests.support import SILENCE_LIMIT, end_process_group, start_process

#: Seconds a step of an interop test may take before the test fails rather than hangs.
STEP_TIMEOUT = 10.0


# -- pymodbus as the meter ------------------------------------------------------------------


def sample_meter(unit: int) -> SimDevice:
    """A meter with known contents in all four tables."""
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[True, False, True] + [False] * 13, datatype=DataType.BITS)],
            [SimData(0, values=[False, True] + [False] * 14, datatype=DataType.BITS)],
            [
                SimData(
                    0,
                    values=[2301, 0x0000, 0x3FC0, 0xFFFE, 0, 0, 0, 0, 0, 0, 0x0001, 0x0002] + [0] * 20,
                    datatype=DataType.REGISTERS,
                )
            ],
            [SimData(0, values=[500 + unit, 0x4049, 0x0FDB], datatype=DataType.REGISTERS)],
        ),
    )


class PymodbusServer:
    """pymodbus's own server in a thread with its own asyncio loop, over a real socket or serial port."""

    def __init__(
        self, devices: list[SimDevice], *, framer: FramerType = FramerType.SOCKET, serial_port: str | None = None
    ) -> None:
        self._devices = devices
        self._framer = framer
        self._serial_port = serial_port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pymodbus-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._error: BaseException | None = None
        self.port = 0

    def start(self) -> PymodbusServer:
        self._thread.start()
        if not self._ready.wait(STEP_TIMEOUT):
            raise RuntimeError("pymodbus server did not start")
        if self._error is not None:
            raise RuntimeError("pymodbus server failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(STEP_TIMEOUT)
        self._thread.join(STEP_TIMEOUT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._serial_port is not None:
            self._server = ModbusSerialServer(
                self._devices, framer=FramerType.RTU, port=self._serial_port, baudrate=9600
            )
        else:
            self._server = ModbusTcpServer(self._devices, framer=self._framer, address=("127.0.0.1", 0))
        await self._server.serve_forever(background=True)
        if self._serial_port is None:
            self.port = self._server.transport.sockets[0].getsockname()[1]
        self._ready.set()
        await self._server.serving


class PtyPair:
    """Two connected pseudo-terminals made by socat, like the two ends of a serial cable.

    ``links`` names two paths to make symlinks to the ends at; ``ends`` are the paths to open either way.
    """

    def __init__(self, links: tuple[str, str] | None = None) -> None:
        options = ["pty,raw,echo=0" + (f",link={link}" if link else "") for link in links or (None, None)]
        try:
            self._process = start_process(
                ["socat", "-d", "-d", *options], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise RuntimeError("socat is needed for the serial tests (apt-get install socat)") from None
        try:
            report = self._read_report()
        except BaseException:
            self.close()
            raise
        self.ends = list(links) if links else [
            line.rsplit(b"PTY is ", 1)[1].strip().decode() for line in report.splitlines() if b"PTY is " in line
        ]

    def _read_report(self) -> bytes:
        """socat's stderr up to the line that says it is ready to relay, when both ptys (and links) exist."""
        # Read the raw fd: a buffered readline could swallow the lines while select() waits for more.
        report = b""
        while b"starting data transfer loop" not in report or not report.endswith(b"\n"):
            ready, _, _ = select.select([self._process.stderr], [], [], SILENCE_LIMIT)
            chunk = os.read(self._process.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                raise RuntimeError(f"socat did not report its ptys: {report!r}")
            report += chunk
        return report

    def close(self) -> None:
        end_process_group(self._process)
        self._process.stderr.close()


# -- a meter's config matching sample_meter -----------------------------------------------------

POINTS = """
[[meter.point]]
name = "voltage"
table = "holding"
address = 0
type = "uint16"
scale = 0.1
unit = "V"

[[meter.point]]
name = "energy"
table = "holding"
address = 1
type = "float32"
word_order = "little"

[[meter.point]]
name = "offset"
table = "holding"
address = 3
type = "int16"

[[meter.point]]
name = "total"
table = "holding"
address = 10
type = "uint32"

[[meter.point]]
name = "serial"
table = "input"
address = 0

[[meter.point]]
name = "pi"
table = "input"
address = 1
type = "float32"

[[meter.point]]
name = "relay"
table = "coil"
address = 2

[[meter.point]]
name = "door"
table = "discrete"
address = 1
"""

EXPECTED_UNIT_1 = {
    "voltage": 230.1,
    "energy": 1.5,
    "offset": -2,
    "total": 65538,
    "serial": 501,
    "relay": True,
    "door": True,
}


def meter_toml(name: str, link: str, unit: int, interval: float = 0.2) -> str:
    return f'[[meter]]\nname = "{name}"\nlink = "{link}"\nunit = {unit}\ninterval = {interval}\n' + POINTS


def matches_unit_1(values: dict | None) -> bool:
    """Whether a poll of the sample meter (unit 1) decoded every point right."""
    if values is None or "pi" not in values:
        return False
    return {k: v for k, v in values.items() if k != "pi"} == EXPECTED_UNIT_1 and abs(values["pi"] - 3.14159) < 1e-5


# -- the sink -----------------------------------------------------------------------------------


class WaitingSink:
    """An in-memory sink whose tests can wait for a condition on what arrived."""

    def __init__(self) -> None:
        self.values: list[tuple[str, float, dict]] = []
        self.failures: list[tuple[str, float, str]] = []
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred, object]] = []

    def record_values(self, meter: str, time: float, values: Mapping) -> None:
        self.values.append((meter, time, dict(values)))
        self._check()

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        self.failures.append((meter, time, reason))
        self._check()

    def latest(self, meter: str) -> dict | None:
        found = [values for name, _, values in self.values if name == meter]
        return found[-1] if found else None

    def reasons(self, meter: str) -> list[str]:
        return [reason for name, _, reason in self.failures if name == meter]

    def wait_for(self, what: str, condition: Callable[[], bool]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if condition():
            d.callback(None)
            return d
        guard = reactor.callLater(STEP_TIMEOUT, self._give_up, what, d)
        self._waiters.append((condition, d, guard))
        return d

    def _check(self) -> None:
        for entry in list(self._waiters):
            condition, d, guard = entry
            if condition():
                self._waiters.remove(entry)
                guard.cancel()
                d.callback(None)

    def _give_up(self, what: str, d: defer.Deferred) -> None:
        self._waiters = [w for w in self._waiters if w[1] is not d]
        d.errback(AssertionError(
            f"gave up waiting for {what}; values {self.values[-3:]}, failures {self.failures[-3:]}"
        ))


# -- a DTU --------------------------------------------------------------------------------------


def frame_size(buffer: bytes, framing: str, is_request: bool) -> int:
    """How long the frame at the head of ``buffer`` is, or 0 if that is not known yet."""
    if framing == "tcp":
        return 6 + int.from_bytes(buffer[4:6], "big") if len(buffer) >= 6 else 0
    if len(buffer) < 2:
        return 0
    pdu_class = DecodePDU(is_server=is_request).lookupPduClass(buffer)
    return pdu_class.calculateRtuFrameSize(buffer) if pdu_class else len(buffer)


def split_frames(buffer: bytes, framing: str, is_request: bool) -> tuple[list[bytes], bytes]:
    frames = []
    while (size := frame_size(buffer, framing, is_request)) and len(buffer) >= size:
        frames.append(buffer[:size])
        buffer = buffer[size:]
    return frames, buffer


class _CenterSide(Protocol):
    def __init__(self, dtu: FakeDtu) -> None:
        self.dtu = dtu
        self.buffer = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        frames, self.buffer = split_frames(self.buffer + data, self.dtu.framing, is_request=True)
        for frame in frames:
            self.dtu.from_center(frame)

    def connectionLost(self, reason=None) -> None:
        self.dtu.heartbeats_stop()
        self.lost.callback(None)


class _BusSide(Protocol):
    def __init__(self, dtu: FakeDtu) -> None:
        self.dtu = dtu
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        frames, self.buffer = split_frames(self.buffer + data, self.dtu.framing, is_request=False)
        for frame in frames:
            self.dtu.from_bus(frame)


class FakeDtu:
    """A DTU that dials the center and relays frames to its bus (a pymodbus server).

    Like a real one it sends a registration packet (split over two writes and
    glued to a heartbeat), heartbeats on a timer between frames, junk now and
    then, answers split across writes with heartbeats glued on; units in
    ``silent_units`` never answer, and ``drop_on_request`` makes it hang up
    when the next request arrives.

    ``registration_mode`` is USR's send type: ``connect`` sends the registration
    once on connect, ``data`` only in front of every packet (so nothing until its
    first heartbeat or answer), ``both`` both; ``prefix=True`` means ``both``. In
    ``data`` mode ``prefix_heartbeats=False`` sends heartbeats bare, as firmware
    that prefixes serial data only does. ``junk=False`` stops the junk (which
    before a data-mode DTU's first prefix would get it refused on the shared listener).
    ``registration_alone=True`` sends the registration in one packet with nothing glued on and
    starts heartbeats a second later, as a real DTU does: what an unknown DTU sends in its first
    moments is all registration (the shared listener's ``registration_window``).
    ``bind`` is the local address to dial from (e.g. 127.0.0.2, another source host).
    """

    def __init__(
        self, *, registration: bytes | None = b"DTU-0001", heartbeat: bytes = b"HB", prefix: bool = False,
        registration_mode: str | None = None, prefix_heartbeats: bool = True, junk: bool = True,
        framing: str = "rtu", silent_units: frozenset[int] = frozenset(), registration_alone: bool = False,
        bind: str | None = None,
    ) -> None:
        self.registration_alone = registration_alone
        self.bind = bind
        self.registration = registration
        self.heartbeat = heartbeat
        self.registration_mode = registration_mode or ("both" if prefix else "connect")
        self.prefix = self.registration_mode != "connect"
        self.prefix_heartbeats = prefix_heartbeats
        self.junk = junk
        self.framing = framing
        self.silent_units = silent_units
        self.drop_on_request = False
        self.requests_seen = 0
        self.center: _CenterSide | None = None
        self.bus: _BusSide | None = None
        self._beat = LoopingCall(self._send_heartbeat)
        self._mid_frame = False
        self._ticks = 0

    async def start(self, center_port: int, bus_port: int) -> FakeDtu:
        self.bus = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", bus_port), _BusSide(self))
        bind = None if self.bind is None else (self.bind, 0)
        self.center = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", center_port, bindAddress=bind), _CenterSide(self)
        )
        if self.registration_alone:
            assert self.registration is not None
            self.center.transport.write(self.registration)
            self._beat_later = reactor.callLater(1.0, self._beat.start, 0.05, now=False)
            return self
        if self.registration is not None and self.registration_mode != "data":
            half = len(self.registration) // 2
            self.center.transport.write(self.registration[:half])
            reactor.callLater(0.01, self.center.transport.write, self.registration[half:] + self.heartbeat)
        self._beat.start(0.05, now=False)
        return self

    async def stop(self) -> None:
        self.heartbeats_stop()
        if self.bus is not None:
            self.bus.transport.loseConnection()
        if self.center is not None and self.center.transport.connected:
            self.center.transport.loseConnection()
            await self.center.lost

    def heartbeats_stop(self) -> None:
        later = getattr(self, "_beat_later", None)
        if later is not None and later.active():
            later.cancel()
        if self._beat.running:
            self._beat.stop()

    def from_center(self, frame: bytes) -> None:
        self.requests_seen += 1
        if self.drop_on_request:
            self.center.transport.loseConnection()
            return
        unit = frame[6] if self.framing == "tcp" else frame[0]
        if unit not in self.silent_units:
            self.bus.transport.write(frame)

    def from_bus(self, frame: bytes) -> None:
        if self.center is None or not self.center.transport.connected:
            return
        head, tail = frame[:3], frame[3:]
        self._mid_frame = True
        # A heartbeat packet glued in front; the answer's own packet starts with the prefix.
        self._write_center(self._heartbeat_packet() + self._prefix() + head)
        reactor.callLater(0.005, self._finish_frame, tail + self._heartbeat_packet())

    def _finish_frame(self, data: bytes) -> None:
        self._mid_frame = False
        self._write_center(data)

    def _write_center(self, data: bytes) -> None:
        if self.center is not None and self.center.transport.connected:
            self.center.transport.write(data)

    def _prefix(self) -> bytes:
        return self.registration if self.prefix and self.registration else b""

    def _heartbeat_packet(self) -> bytes:
        return (self._prefix() if self.prefix_heartbeats else b"") + self.heartbeat

    def _send_heartbeat(self) -> None:
        if self._mid_frame:
            return  # a DTU sends its packets between serial frames, never inside one
        self._ticks += 1
        junk = b"\x00\xff" if self.junk and self._ticks % 4 == 0 else b""
        self._write_center(junk + self._heartbeat_packet())


# -- reading a meter independently ----------------------------------------------------------------


def read_back(port: int, framer: FramerType, table: str, address: int, count: int = 1, unit: int = 1) -> defer.Deferred:
    """Read a pymodbus server with pymodbus's own client, in a thread: what a write really left there."""
    from pymodbus.client import ModbusTcpClient
    from twisted.internet.threads import deferToThread

    def read() -> list:
        client = ModbusTcpClient("127.0.0.1", port=port, framer=framer, timeout=STEP_TIMEOUT, retries=0)
        try:
            if not client.connect():
                raise ConnectionError(f"pymodbus client cannot reach 127.0.0.1:{port}")
            if table == "coil":
                return list(client.read_coils(address, count=count, device_id=unit).bits[:count])
            return list(client.read_holding_registers(address, count=count, device_id=unit).registers)
        finally:
            client.close()

    return deferToThread(read)
