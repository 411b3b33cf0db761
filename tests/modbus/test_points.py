"""Point decoding and encoding for every type and word order, and read planning."""

from __future__ import annotations

import math
import struct

import pytest
from pymodbus.pdu.bit_message import (
    ReadCoilsResponse,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

from dtucenter.modbus.errors import ResponseMismatch
from dtucenter.modbus.points import (
    BlockLimits,
    Point,
    PointType,
    PointValueError,
    ReadBlock,
    Table,
    WordOrder,
    check_write_response,
    decode_registers,
    encode_registers,
    plan_reads,
    raw_value,
    write_request,
)


def point(type_: str = "uint16", table: str = "holding", address: int = 0, **kw) -> Point:
    return Point(name=kw.pop("name", f"p{address}"), table=Table(table), address=address, type=PointType(type_), **kw)


SAMPLES = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3456789012,
    "float32": 1.5,
    "int64": -1234567890123456789,
    "uint64": 12345678901234567890,
    "float64": -2.718281828459045,
}
CODES = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "float32": "f", "int64": "q", "uint64": "Q", "float64": "d",
}


def big_endian_registers(type_: str, value) -> list[int]:
    packed = struct.pack(">" + CODES[type_], value)
    return [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]


@pytest.mark.parametrize("type_", list(SAMPLES))
@pytest.mark.parametrize("order", ["big", "little"])
def test_every_type_decodes_in_both_word_orders(type_: str, order: str) -> None:
    registers = big_endian_registers(type_, SAMPLES[type_])
    if order == "little":
        registers.reverse()
    p = point(type_, word_order=WordOrder(order))
    assert decode_registers(p, registers) == SAMPLES[type_]
    assert encode_registers(p, SAMPLES[type_]) == registers


def test_word_order_is_about_registers_not_bytes() -> None:
    p = point("uint32", word_order=WordOrder.LITTLE)
    assert decode_registers(p, [0x5678, 0x1234]) == 0x12345678


def test_scale_applies_and_shows_the_decimals_the_scale_has() -> None:
    assert decode_registers(point("uint16", scale=0.1), [2301]) == 230.1
    assert decode_registers(point("int16", scale=0.01), [0xFFFF]) == -0.01
    assert decode_registers(point("uint16", scale=0.25), [3]) == 0.75
    assert decode_registers(point("uint16", scale=10.0), [3]) == 30
    assert decode_registers(point("uint16"), [7]) == 7


def test_bool_in_a_register_is_nonzero() -> None:
    assert decode_registers(point("bool"), [0]) is False
    assert decode_registers(point("bool"), [0x8000]) is True


def test_decode_wants_exactly_the_point_registers() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode_registers(point("uint32"), [1])


# -- writes -------------------------------------------------------------------------


def test_raw_values_are_unscaled_rounded_and_range_checked() -> None:
    assert raw_value(point("uint16", scale=0.1), 230.1) == 2301
    assert raw_value(point("int16"), -5) == -5
    assert raw_value(point("float32", scale=2.0), 3.0) == 1.5
    assert raw_value(point("bool"), 1) is True
    with pytest.raises(PointValueError, match="out of range"):
        raw_value(point("uint16"), -1)
    with pytest.raises(PointValueError, match="out of range"):
        raw_value(point("int16", scale=0.1), 3276.8)
    with pytest.raises(PointValueError, match="takes a number"):
        raw_value(point("uint16"), "12")
    with pytest.raises(PointValueError, match="takes a number"):
        raw_value(point("uint16"), True)
    with pytest.raises(PointValueError, match="bool point"):
        raw_value(point("bool"), 2)
    with pytest.raises(PointValueError, match="cannot hold"):
        raw_value(point("uint32"), math.inf)


def test_write_requests_use_the_fitting_function() -> None:
    single_register = write_request(point("uint16", address=4, scale=0.1), 230.1, unit=3)
    assert isinstance(single_register, WriteSingleRegisterRequest)
    assert (single_register.dev_id, single_register.address, single_register.registers) == (3, 4, [2301])

    multi = write_request(point("float32", address=8, word_order=WordOrder.LITTLE), 1.5, unit=3)
    assert isinstance(multi, WriteMultipleRegistersRequest)
    assert (multi.address, multi.count, multi.registers) == (8, 2, [0x0000, 0x3FC0])

    forced = write_request(point("uint16", write_multiple=True), 1, unit=1)
    assert isinstance(forced, WriteMultipleRegistersRequest)

    coil = write_request(point("bool", table="coil", address=2), True, unit=1)
    assert isinstance(coil, WriteSingleCoilRequest)
    assert coil.bits == [True]

    coils = write_request(point("bool", table="coil", write_multiple=True), False, unit=1)
    assert isinstance(coils, WriteMultipleCoilsRequest)
    assert coils.bits == [False]


@pytest.mark.parametrize("table", ["input", "discrete"])
def test_read_only_tables_refuse_writes(table: str) -> None:
    with pytest.raises(PointValueError, match="read-only"):
        write_request(point("bool" if table == "discrete" else "uint16", table=table), 1, unit=1)


def test_write_echo_must_match() -> None:
    request = write_request(point("uint16", address=4), 1, unit=1)
    check_write_response(request, WriteSingleRegisterResponse(address=4, registers=[1]))
    with pytest.raises(ResponseMismatch):
        check_write_response(request, WriteSingleRegisterResponse(address=5, registers=[1]))
    coil = write_request(point("bool", table="coil", address=4), True, unit=1)
    check_write_response(coil, WriteSingleCoilResponse(address=4, bits=[True]))


# -- planning -----------------------------------------------------------------------


def spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int]]:
    return [(b.table.value, b.address, b.count) for b in blocks]


def test_neighbours_are_read_together_and_tables_apart() -> None:
    points = [
        point("uint16", address=0),
        point("float32", address=1),
        point("uint16", address=3),
        point("uint16", table="input", address=0),
        point("bool", table="coil", address=5),
        point("bool", table="coil", address=9),
        point("bool", table="discrete", address=5),
    ]
    assert spans(plan_reads(points)) == [
        ("holding", 0, 4), ("input", 0, 1), ("coil", 5, 5), ("discrete", 5, 1),
    ]


def test_gaps_up_to_the_limit_are_read_through() -> None:
    points = [point(address=0), point(address=9), point(address=30)]
    assert spans(plan_reads(points, BlockLimits(max_gap=8))) == [("holding", 0, 10), ("holding", 30, 1)]
    assert spans(plan_reads(points, BlockLimits(max_gap=0))) == [
        ("holding", 0, 1), ("holding", 9, 1), ("holding", 30, 1),
    ]
    adjacent = [point(address=0), point(address=1)]
    assert spans(plan_reads(adjacent, BlockLimits(max_gap=0))) == [("holding", 0, 2)]


def test_blocks_respect_125_registers_and_never_split_a_point() -> None:
    registers = [point("uint16", address=a) for a in range(130)]
    assert spans(plan_reads(registers)) == [("holding", 0, 125), ("holding", 125, 5)]
    wide = [point("uint64", address=a) for a in range(0, 128, 4)]
    blocks = plan_reads(wide)
    assert spans(blocks) == [("holding", 0, 124), ("holding", 124, 4)]
    assert all(b.count <= 125 for b in blocks)


def test_blocks_respect_2000_bits() -> None:
    bits = [point("bool", table="coil", address=a) for a in range(0, 2100, 50)]
    assert spans(plan_reads(bits)) == [("coil", 0, 1951), ("coil", 2000, 51)]


def test_smaller_device_limits_apply() -> None:
    registers = [point("uint16", address=a) for a in range(10)]
    assert spans(plan_reads(registers, BlockLimits(max_registers=4))) == [
        ("holding", 0, 4), ("holding", 4, 4), ("holding", 8, 2),
    ]


def test_overlapping_points_share_registers() -> None:
    points = [point("uint32", address=0, name="both"), point("uint16", address=1, name="low")]
    (block,) = plan_reads(points)
    assert (block.address, block.count) == (0, 2)
    values = block.decode(ReadHoldingRegistersResponse(registers=[0x0001, 0x0002]))
    assert values == {"both": 0x00010002, "low": 2}


def test_block_decodes_registers_and_bits_and_checks_counts() -> None:
    (block,) = plan_reads([point("uint16", address=10, name="a", scale=0.5), point("int16", address=12, name="b")])
    assert block.request(unit=4).dev_id == 4
    assert block.decode(ReadHoldingRegistersResponse(registers=[4, 0, 0xFFFE])) == {"a": 2.0, "b": -2}
    with pytest.raises(ResponseMismatch, match="asked for 3 registers"):
        block.decode(ReadHoldingRegistersResponse(registers=[4, 0]))

    (coils,) = plan_reads([
        point("bool", table="coil", address=3, name="c"), point("bool", table="coil", address=5, name="d"),
    ])
    response = ReadCoilsResponse(bits=[True, False, False, False, False, False, False, False])
    assert coils.decode(response) == {"c": True, "d": False}
    with pytest.raises(ResponseMismatch):
        coils.decode(ReadCoilsResponse(bits=[]))


@pytest.mark.parametrize("type_", [t.value for t in PointType])
@pytest.mark.parametrize("order", ["big", "little"])
@pytest.mark.parametrize("scale", [1.0, 0.1, 0.001, 2.5, 10.0])
def test_a_block_decodes_each_point_as_decode_registers_does(type_: str, order: str, scale: float) -> None:
    """ReadBlock plans its readers once; what they read must be what decode_registers makes of the same registers."""
    width = PointType(type_).registers
    scale = 1.0 if type_ == "bool" else scale
    order = "big" if width == 1 else order
    points = [point("uint16", address=0, name="before"), point(type_, address=2, name="it", scale=scale,
                                                              word_order=WordOrder(order))]
    (block,) = plan_reads(points)
    patterns = ([0] * width, [0xFFFF] * width, [0x8000] + [0] * (width - 1), [0x1234, 0xABCD, 0x0F0F, 0xF0F0][:width])
    for registers in patterns:
        response = ReadHoldingRegistersResponse(registers=[7, 0, *registers])
        decoded = block.decode(response)
        expected = decode_registers(points[1], registers)
        assert type(decoded["it"]) is type(expected)
        assert decoded["it"] == expected or (math.isnan(decoded["it"]) and math.isnan(expected))
        assert decoded["before"] == 7

