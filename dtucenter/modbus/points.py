"""Meter points: where a value lives, how to decode and encode it, and how to read many at once."""

from __future__ import annotations

import decimal
import enum
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from dtucenter.modbus.errors import ResponseMismatch
from dtucenter.setting import (
    Place,
    boolean,
    build,
    check_unique,
    integer,
    member,
    nonzero,
    place_of,
    read_keys,
    read_tables,
    require,
    setting,
    text,
)

MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000

Value = bool | int | float


class Table(enum.Enum):
    HOLDING = "holding"
    INPUT = "input"
    COIL = "coil"
    DISCRETE = "discrete"

    @property
    def holds_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)

    @property
    def writable(self) -> bool:
        return self in (Table.HOLDING, Table.COIL)


_READ_REQUESTS: dict[Table, type[ModbusPDU]] = {
    Table.HOLDING: ReadHoldingRegistersRequest,
    Table.INPUT: ReadInputRegistersRequest,
    Table.COIL: ReadCoilsRequest,
    Table.DISCRETE: ReadDiscreteInputsRequest,
}


class PointType(enum.Enum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT64 = "float64"

    @property
    def struct_code(self) -> str:
        return _STRUCT_CODES[self]

    @property
    def registers(self) -> int:
        """How many 16-bit registers one value occupies."""
        return 1 if self is PointType.BOOL else struct.calcsize(">" + self.struct_code) // 2

    @property
    def is_float(self) -> bool:
        return self in (PointType.FLOAT32, PointType.FLOAT64)


_STRUCT_CODES = {
    PointType.BOOL: "H",
    PointType.INT16: "h",
    PointType.UINT16: "H",
    PointType.INT32: "i",
    PointType.UINT32: "I",
    PointType.FLOAT32: "f",
    PointType.INT64: "q",
    PointType.UINT64: "Q",
    PointType.FLOAT64: "d",
}


#: Point types in the order an error lists them: the register types first.
POINT_TYPE_NAMES = (*(t.value for t in PointType if t is not PointType.BOOL), PointType.BOOL.value)


class WordOrder(enum.Enum):
    BIG = "big"  # most significant register first, as the Modbus spec orders bytes
    LITTLE = "little"  # least significant register first (common "word swap")


class PointValueError(ValueError):
    """A value cannot be written to a point (wrong kind, out of range, read-only)."""


@attrs.frozen
class Point:
    name: str = attrs.field(metadata=setting(text, "The value's name, in the database and the API."))
    table: Table = attrs.field(metadata=setting(member(Table), "holding, input, coil or discrete."))
    address: int = attrs.field(metadata=setting(integer(0, 65535), "The first (or only) address."))
    type: PointType = attrs.field(
        metadata=setting(member(PointType, POINT_TYPE_NAMES), "How the registers are decoded.")
    )
    word_order: WordOrder = attrs.field(
        default=WordOrder.BIG, metadata=setting(member(WordOrder), "big or little: which register comes first.")
    )
    scale: float = attrs.field(default=1.0, metadata=setting(nonzero, "Factor applied to the decoded value."))
    unit: str | None = attrs.field(default=None, metadata=setting(text, "The value's unit, for people."))
    write_multiple: bool = attrs.field(
        default=False, metadata=setting(boolean, "Force FC 15/16 for devices without FC 5/6.")
    )

    @property
    def width(self) -> int:
        """Addresses this point occupies in its table."""
        return 1 if self.table.holds_bits else self.type.registers

    @property
    def end(self) -> int:
        return self.address + self.width


# -- reading ------------------------------------------------------------------


def read_points(value: object, place: Place) -> tuple[Point, ...]:
    """The points of a ``[[point]]`` array (a meter's in the config file, or a template's), checked.

    Possibly none: whether that is allowed is the holder's rule.

    ``place`` is the table holding the array; a mistake raises ``ConfigError`` naming it and the point.
    """
    points = tuple(read_point(point, index, place) for index, point in read_tables(value, place, "point"))
    check_unique([point.name for point in points], place, "point")
    return points


def read_point(table: Mapping[str, Any], index: int, holder: Place) -> Point:
    """One ``[[point]]`` table: its keys converted, and how they go together checked."""
    place = place_of(table, holder, "point", index)
    (values,) = read_keys(table, place, Point)
    require(Point, {*values, "type"}, place)  # the type has a default that depends on the table
    kind = values["table"]
    point_type = values.setdefault("type", PointType.BOOL if kind.holds_bits else PointType.UINT16)
    if kind.holds_bits and point_type is not PointType.BOOL:
        raise place.error("type", f"a {kind.value} point is a single bit: use bool, not {point_type.value}")
    if "word_order" in values and point_type.registers < 2:
        raise place.error("word_order", f"only applies to 32- and 64-bit types, not {point_type.value}")
    if "scale" in values and point_type is PointType.BOOL:
        raise place.error("scale", "does not apply to bool points")
    point = build(Point, values, place)
    if point.end > 65536:
        raise place.error("address", f"{point_type.value} at {point.address} runs past address 65535")
    return point


# -- decoding -----------------------------------------------------------------


def _registers_to_bytes(point: Point, registers: Sequence[int]) -> bytes:
    ordered = list(registers) if point.word_order is WordOrder.BIG else list(reversed(registers))
    return b"".join(register.to_bytes(2, "big") for register in ordered)


def decode_registers(point: Point, registers: Sequence[int]) -> Value:
    """The scaled value of a register point from exactly its registers."""
    if len(registers) != point.type.registers:
        raise ValueError(f"{point.name} needs {point.type.registers} registers, got {len(registers)}")
    if point.type is PointType.BOOL:
        return registers[0] != 0
    (raw,) = struct.unpack(">" + point.type.struct_code, _registers_to_bytes(point, registers))
    return _scaled(point, raw)


def _scaled(point: Point, raw: float) -> int | float:
    if point.scale == 1:
        return raw
    value = raw * point.scale
    if isinstance(raw, int):
        # 2301 * 0.1 is 230.10000000000002 in binary floating point; an
        # integer register scaled by 0.1 has exactly one decimal to show.
        return round(value, _decimals(point.scale))
    return value


def _decimals(scale: float) -> int:
    exponent = decimal.Decimal(repr(scale)).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


#: Reads one point's scaled value from a block's registers packed as big-endian bytes.
_RegisterReader = Callable[[bytes], Value]


def _register_reader(point: Point, first: int) -> _RegisterReader:
    """:func:`decode_registers` for ``point`` in a block starting at address ``first``, worked out once
    per block instead of on every poll (the type's size and struct code, the word order, the scale's
    decimals): the same values, at a fraction of the cost."""
    start = 2 * (point.address - first)
    if point.type is PointType.BOOL:
        end = start + 2
        return lambda data: data[start:end] != b"\0\0"
    size = 2 * point.type.registers
    unpack_from = struct.Struct(">" + point.type.struct_code).unpack_from
    read: _RegisterReader
    if point.word_order is WordOrder.LITTLE and size > 2:
        def read(data: bytes) -> Value:
            words = data[start : start + size]
            value: Value = unpack_from(b"".join(words[i : i + 2] for i in range(size - 2, -2, -2)))[0]
            return value

    else:
        def read(data: bytes) -> Value:
            value: Value = unpack_from(data, start)[0]
            return value

    scale = point.scale
    if scale == 1:
        return read
    if point.type.is_float:
        return lambda data: read(data) * scale
    decimals = _decimals(scale)
    return lambda data: round(read(data) * scale, decimals)


# -- encoding for writes ------------------------------------------------------


def raw_value(point: Point, value: object) -> bool | int | float:
    """The unscaled value to put on the wire, range-checked for the point's type."""
    if isinstance(value, str) or value is None:
        raise PointValueError(f"{point.name} takes a number, not {value!r}")
    if point.type is PointType.BOOL:
        if value in (True, False, 0, 1):
            return bool(value)
        raise PointValueError(f"{point.name} is a bool point: write true/false or 1/0, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PointValueError(f"{point.name} takes a number, not {value!r}")
    if not math.isfinite(value) and not point.type.is_float:
        raise PointValueError(f"{point.name} cannot hold {value!r}")
    raw = value / point.scale if point.scale != 1 else value
    if point.type.is_float:
        return float(raw)
    rounded = round(raw)
    bits = point.type.registers * 16
    signed = point.type.name.startswith("INT")
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= rounded <= high:
        raise PointValueError(
            f"{value!r} is out of range for {point.name}"
            f" ({point.type.value} holds {low * point.scale:g}..{high * point.scale:g} at scale {point.scale:g})"
        )
    return rounded


def encode_registers(point: Point, raw: bool | float) -> list[int]:
    """The registers holding ``raw`` (already unscaled) in the point's word order."""
    if point.type is PointType.BOOL:
        return [1 if raw else 0]
    try:
        packed = struct.pack(">" + point.type.struct_code, raw)
    except (struct.error, OverflowError) as exc:
        raise PointValueError(f"{raw!r} does not fit {point.name} ({point.type.value}): {exc}") from None
    registers = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]
    return registers if point.word_order is WordOrder.BIG else list(reversed(registers))


def write_request(point: Point, value: object, unit: int) -> ModbusPDU:
    """The request writing ``value`` (scaled units) to ``point``: FC 5, 6, 15 or 16."""
    if not point.table.writable:
        raise PointValueError(f"{point.name} is in the read-only {point.table.value} table")
    raw = raw_value(point, value)
    if point.table is Table.COIL:
        if point.write_multiple:
            return WriteMultipleCoilsRequest(address=point.address, bits=[bool(raw)], dev_id=unit)
        return WriteSingleCoilRequest(address=point.address, bits=[bool(raw)], dev_id=unit)
    registers = encode_registers(point, raw)
    if len(registers) == 1 and not point.write_multiple:
        return WriteSingleRegisterRequest(address=point.address, registers=registers, dev_id=unit)
    return WriteMultipleRegistersRequest(
        address=point.address, registers=registers, count=len(registers), dev_id=unit
    )


def check_write_response(request: ModbusPDU, response: ModbusPDU) -> None:
    """Writes are echoed; an echo that differs means the unit did something else."""
    if (response.function_code, response.address) != (request.function_code, request.address):
        raise ResponseMismatch(
            f"write to address {request.address} was answered for address {response.address}"
        )


# -- block planning -----------------------------------------------------------


@attrs.frozen
class ReadBlock:
    """One read request covering several points of one table."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]
    _readers: tuple[tuple[str, _RegisterReader], ...] = attrs.field(init=False, eq=False, repr=False)

    @_readers.default
    def _plan_readers(self) -> tuple[tuple[str, _RegisterReader], ...]:
        if self.table.holds_bits:
            return ()
        return tuple((p.name, _register_reader(p, self.address)) for p in self.points)

    def request(self, unit: int) -> ModbusPDU:
        return _READ_REQUESTS[self.table](address=self.address, count=self.count, dev_id=unit)

    def decode(self, response: ModbusPDU) -> dict[str, Value]:
        """Point name -> scaled value from the response to :meth:`request`."""
        if self.table.holds_bits:
            bits = list(response.bits)
            if len(bits) < self.count:
                raise ResponseMismatch(f"asked for {self.count} bits at {self.address}, got {len(bits)}")
            return {p.name: bool(bits[p.address - self.address]) for p in self.points}
        registers = response.registers
        if len(registers) != self.count:
            raise ResponseMismatch(
                f"asked for {self.count} registers at {self.address}, got {len(registers)}"
            )
        data = struct.pack(f">{self.count}H", *registers)
        return {name: read(data) for name, read in self._readers}

    def describe(self) -> str:
        return f"{self.table.value} {self.address}+{self.count}"


@attrs.frozen
class BlockLimits:
    max_registers: int = attrs.field(
        default=MAX_READ_REGISTERS,
        metadata=setting(integer(1, MAX_READ_REGISTERS), "Most registers one read request asks for."),
    )
    max_bits: int = attrs.field(
        default=MAX_READ_BITS, metadata=setting(integer(1, MAX_READ_BITS), "Most bits one read request asks for.")
    )
    max_gap: int = attrs.field(
        default=8,
        metadata=setting(integer(0, MAX_READ_REGISTERS), "Unused registers a block may span to save a request."),
    )

    def size_limit(self, table: Table) -> int:
        return self.max_bits if table.holds_bits else self.max_registers

    def gap_limit(self, table: Table) -> int:
        # An unused bit costs a sixteenth of an unused register on the wire.
        return self.max_gap * 16 if table.holds_bits else self.max_gap


def plan_reads(points: Iterable[Point], limits: BlockLimits = BlockLimits()) -> list[ReadBlock]:
    """Group points into as few reads as the limits allow, merging only within a table.

    Greedy over points sorted by address; that is optimal here because a
    block can only ever be extended at its end.
    """
    blocks: list[ReadBlock] = []
    by_table: dict[Table, list[Point]] = {}
    for point in points:
        by_table.setdefault(point.table, []).append(point)
    for table in Table:
        members = sorted(by_table.get(table, ()), key=lambda p: (p.address, p.end))
        limit, gap = limits.size_limit(table), limits.gap_limit(table)
        current: list[Point] = []
        start = end = 0
        for point in members:
            if current and point.address - end <= gap and max(end, point.end) - start <= limit:
                current.append(point)
                end = max(end, point.end)
                continue
            if current:
                blocks.append(ReadBlock(table, start, end - start, tuple(current)))
            current, start, end = [point], point.address, point.end
        if current:
            blocks.append(ReadBlock(table, start, end - start, tuple(current)))
    return blocks


def points_by_name(points: Iterable[Point]) -> Mapping[str, Point]:
    return {point.name: point for point in points}
