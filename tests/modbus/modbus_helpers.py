"""Frames as a meter would send them, and small test doubles shared by the Modbus tests."""

from __future__ import annotations

from pymodbus.framer import FramerRTU, FramerSocket
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
)
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dtucenter.modbus.config import SerialSettings
from dtucenter.modbus.master import ModbusMaster

_server_decoder = DecodePDU(is_server=True)
_rtu = FramerRTU(_server_decoder)
_mbap = FramerSocket(_server_decoder)


def rtu(pdu: ModbusPDU) -> bytes:
    """An RTU frame (unit, PDU, CRC) for ``pdu``."""
    return _rtu.buildFrame(pdu)


def mbap(pdu: ModbusPDU, transaction_id: int) -> bytes:
    pdu.transaction_id = transaction_id
    return _mbap.buildFrame(pdu)


def holding_response(unit: int, registers: list[int]) -> ModbusPDU:
    return ReadHoldingRegistersResponse(registers=registers, dev_id=unit)


def coils_response(unit: int, bits: list[bool]) -> ModbusPDU:
    return ReadCoilsResponse(bits=bits, dev_id=unit)


def exception_response(unit: int, function_code: int, code: int) -> ModbusPDU:
    return ExceptionResponse(function_code, code, device_id=unit)


def read_holding(unit: int, address: int, count: int) -> ModbusPDU:
    return ReadHoldingRegistersRequest(address=address, count=count, dev_id=unit)


def read_input(unit: int, address: int, count: int = 1) -> ModbusPDU:
    return ReadInputRegistersRequest(address=address, count=count, dev_id=unit)


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def result_of(d: defer.Deferred):
    """The result (or Failure) of a Deferred that must have fired already."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def fired(d: defer.Deferred) -> bool:
    results: list = []
    d.addBoth(lambda r: (results.append(r), r)[1])
    return bool(results)


class FakeSerialPort:
    """Stands in for twisted.internet.serialport.SerialPort: connects at once, closes for real."""

    def __init__(self, protocol: ModbusMaster) -> None:
        self.protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def loseConnection(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("closed")))


class SerialOpener:
    """An ``open_port`` that fails ``fail_next`` times (device missing) before opening fake ports."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.ports: list[FakeSerialPort] = []

    def __call__(self, protocol, settings: SerialSettings, reactor):
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(2, "No such file or directory", settings.device)
        self.ports.append(FakeSerialPort(protocol))
        return self.ports[-1]
