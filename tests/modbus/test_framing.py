"""The RTU codec's own CRC and frame building against pymodbus's, byte for byte."""

from __future__ import annotations

import random

import pytest
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from dtucenter.modbus.framing import NOT_A_FRAME, Complete, Expectation, RtuFraming, crc16
from dtucenter.modbus.points import Point, PointType, Table, plan_reads, write_request


def pymodbus_frame(pdu: ModbusPDU) -> bytes:
    return FramerRTU(DecodePDU(is_server=False)).buildFrame(pdu)


def test_crc16_is_pymodbus_crc_in_wire_order() -> None:
    rng = random.Random(7)
    FramerRTU.crc16_table = FramerRTU.generate_crc16_table()
    for size in range(64):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big")


@pytest.mark.parametrize("table", [t.value for t in Table])
def test_read_requests_are_framed_as_pymodbus_frames_them(table: str) -> None:
    for address, count, unit in ((0, 1, 1), (40000, 125, 247), (65000, 10, 0)):
        kind = PointType.BOOL if Table(table).holds_bits else PointType.UINT16
        points = [Point(f"p{i}", Table(table), address + i, kind) for i in range(count)]
        for block in plan_reads(points):
            request = block.request(unit)
            assert RtuFraming().encode(request, 1) == pymodbus_frame(request)


def test_write_requests_are_framed_as_pymodbus_frames_them() -> None:
    for point, value in ((Point("r", Table.HOLDING, 9, PointType.UINT16), 500),
                         (Point("f", Table.HOLDING, 9, PointType.FLOAT32), 1.5),
                         (Point("c", Table.COIL, 3, PointType.BOOL), True),
                         (Point("m", Table.COIL, 3, PointType.BOOL, write_multiple=True), False)):
        request = write_request(point, value, unit=5)
        assert RtuFraming().encode(request, 1) == pymodbus_frame(request)


def test_a_response_is_decoded_once_its_crc_checks() -> None:
    response = ReadHoldingRegistersResponse(registers=[1, 2, 3], dev_id=4)
    frame = pymodbus_frame(response)
    expected = Expectation(unit=4, function_code=3, transaction_id=0)
    probe = RtuFraming().probe(frame, expected)
    assert isinstance(probe, Complete) and probe.length == len(frame)
    assert (probe.pdu.registers, probe.pdu.dev_id) == ([1, 2, 3], 4)
    damaged = frame[:-1] + bytes([frame[-1] ^ 1])
    assert RtuFraming().probe(damaged, expected) is NOT_A_FRAME


def test_an_exception_response_is_decoded() -> None:
    frame = pymodbus_frame(ExceptionResponse(3, 2, device_id=4))
    probe = RtuFraming().probe(frame, Expectation(unit=4, function_code=3, transaction_id=0))
    assert isinstance(probe, Complete) and isinstance(probe.pdu, ExceptionResponse)
    assert (probe.pdu.function_code, probe.pdu.exception_code) == (0x83, 2)
