"""A software DTU for a real serial port: what the seed's "virtual serial-to-TCP program" does.

It dials the center, sends the registration packet, sends heartbeats, and
relays bytes both ways between the serial line (a meter or an RS-485
adapter) and the connection. Bytes that arrive from the serial side while
the center is unreachable are dropped and counted: a transparent DTU has
no store of its own, and the center re-polls anyway.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dtucenter.sim.modbus import PacketDevice
from dtucenter.sim.stats import SimStats


class _SerialSide(protocol.Protocol):
    def __init__(self, bridge: SerialBridge) -> None:
        self.bridge = bridge

    def dataReceived(self, data: bytes) -> None:
        self.bridge.from_serial(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.bridge.serial_lost(reason)


class SerialBridge(PacketDevice):
    """The device a TCPConnector drives; ``serial_protocol`` is handed to twisted's SerialPort."""

    def __init__(
        self,
        registration: bytes,
        clock: IReactorTime,
        stats: SimStats,
        heartbeat: bytes | None = None,
        heartbeat_interval: float = 30.0,
    ) -> None:
        super().__init__(registration, clock, stats, heartbeat, heartbeat_interval)
        self.serial_protocol = _SerialSide(self)
        self.serial_error: str | None = None

    # the center's side
    def data_received(self, data: bytes) -> None:
        transport = self.serial_protocol.transport
        if transport is None:
            self.stats.count("bytes_dropped_no_serial", len(data))
            return
        transport.write(data)
        self.stats.count("bytes_to_serial", len(data))

    # the serial side
    def from_serial(self, data: bytes) -> None:
        if self.link is None:
            self.stats.count("bytes_dropped_offline", len(data))
            return
        self.link.write(data)
        self.stats.count("bytes_to_center", len(data))

    def serial_lost(self, reason: Failure) -> None:
        self.serial_error = reason.getErrorMessage()
        self.stats.error("serial_closed")
