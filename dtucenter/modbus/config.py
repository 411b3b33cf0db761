"""The ``[modbus]``, ``[[link]]`` and ``[[meter]]`` parts of the config file, validated.

Input is the document as ``tomllib`` loaded it; other top-level keys belong
to the rest of the configuration and are ignored here. Every error names the
key path (``meter[2].point[0].type``) so the caller only has to prefix the
file name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from twisted.internet.endpoints import clientFromString, serverFromString

from dtucenter.modbus.filter import decode_packet_option
from dtucenter.modbus.points import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    BlockLimits,
    Point,
    PointType,
    Table,
    WordOrder,
)

DEFAULT_LOGIN_TIMEOUT = 30.0


class ModbusConfigError(ValueError):
    """A Modbus part of the configuration is wrong; the message says where and why."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@attrs.frozen
class SerialSettings:
    device: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # N, E, O, M or S as pyserial spells them
    stopbits: float = 1


@attrs.frozen
class LinkSettings:
    name: str
    protocol: str = "rtu"  # "rtu" or "tcp" (MBAP)
    timeout: float = 3.0
    retries: int = 1
    registration: bytes | None = None
    registration_prefix: bool = False
    heartbeat: bytes | None = None
    listen: str | None = None  # dedicated server endpoint
    connect: str | None = None  # client endpoint; the DTU is the TCP server
    serial: SerialSettings | None = None
    idle_timeout: float | None = None  # close a connection that sent nothing for this long

    @property
    def kind(self) -> str:
        """``shared``, ``listen``, ``connect`` or ``serial``."""
        if self.serial is not None:
            return "serial"
        if self.connect is not None:
            return "connect"
        if self.listen is not None:
            return "listen"
        return "shared"


@attrs.frozen
class MeterSettings:
    name: str
    link: str
    unit: int
    interval: float
    points: tuple[Point, ...]
    limits: BlockLimits = BlockLimits()


@attrs.frozen
class ModbusSettings:
    listen: str | None = None  # the shared listener for DTUs that register
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    links: tuple[LinkSettings, ...] = ()
    meters: tuple[MeterSettings, ...] = ()


class _Table:
    """A TOML table being read: typed getters, and leftovers reported as typos."""

    def __init__(self, path: str, data: object) -> None:
        if not isinstance(data, Mapping):
            raise ModbusConfigError(path, f"must be a table, not {_describe(data)}")
        self.path = path
        self._data = data
        self._used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str) -> Any:
        self._used.add(key)
        return self._data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ModbusConfigError(self.at(key), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise ModbusConfigError(self.at(key), f"must be a non-empty string, not {_describe(value)}")
        return value

    def integer(self, key: str, default: int | None, low: int, high: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise ModbusConfigError(self.at(key), "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModbusConfigError(self.at(key), f"must be an integer, not {_describe(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ModbusConfigError(self.at(key), f"must be {bounds}, not {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ModbusConfigError(self.at(key), f"must be a number, not {_describe(value)}")
        if positive and value <= 0:
            raise ModbusConfigError(self.at(key), f"must be greater than 0, not {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ModbusConfigError(self.at(key), f"must be true or false, not {_describe(value)}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if value not in choices:
            raise ModbusConfigError(
                self.at(key), f"{_describe(value)} is not one of {', '.join(choices)}"
            )
        return value

    def array_of_tables(self, key: str, path: str) -> Iterator[_Table]:
        value = self.raw(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise ModbusConfigError(path, f"must be an array of tables ([[{key}]]), not {_describe(value)}")
        for index, item in enumerate(value):
            yield _Table(f"{path}[{index}]", item)

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ModbusConfigError(self.at(unknown[0]), "unknown key (a typo?)")


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def parse_modbus_settings(document: Mapping[str, Any]) -> ModbusSettings:
    """Validated Modbus settings from a loaded TOML document; raises :class:`ModbusConfigError`."""
    section = _Table("modbus", document.get("modbus", {}))
    listen = section.string("listen")
    if listen is not None:
        _check_server_endpoint(section.at("listen"), listen)
    login_timeout = section.number("login_timeout", DEFAULT_LOGIN_TIMEOUT)
    section.finish()

    root = _Table("", {key: document[key] for key in ("link", "meter") if key in document})
    links = tuple(_parse_link(table) for table in root.array_of_tables("link", "link"))
    meters = tuple(_parse_meter(table) for table in root.array_of_tables("meter", "meter"))
    _check_links(links, listen)
    _check_meters(meters, links)
    return ModbusSettings(listen=listen, login_timeout=login_timeout, links=links, meters=meters)


def _parse_link(table: _Table) -> LinkSettings:
    name = table.string("name", required=True)
    protocol = table.choice("protocol", "rtu", ("rtu", "tcp"))
    timeout = table.number("timeout", 3.0)
    retries = table.integer("retries", 1, 0, 10)
    registration = _packet(table, "registration")
    registration_prefix = table.boolean("registration_prefix", False)
    heartbeat = _packet(table, "heartbeat")
    idle_timeout = table.number("idle_timeout", 0.0) or None
    listen = table.string("listen")
    connect = table.string("connect")
    device = table.string("serial")
    serial_keys = ("baudrate", "bytesize", "parity", "stopbits")

    transports = [key for key, value in (("listen", listen), ("connect", connect), ("serial", device)) if value]
    if len(transports) > 1:
        raise ModbusConfigError(table.at(transports[1]), f"cannot be combined with {transports[0]}; a link has one transport")
    if not transports and registration is None:
        raise ModbusConfigError(
            table.path, "needs one of registration (DTU dials the shared listener), listen, connect or serial"
        )
    if registration_prefix and registration is None:
        raise ModbusConfigError(table.at("registration_prefix"), "needs registration")
    if registration is not None and (connect or device):
        raise ModbusConfigError(
            table.at("registration"), f"only applies to links the DTU dials, not to {transports[0]} links"
        )
    if listen:
        _check_server_endpoint(table.at("listen"), listen)
    if connect:
        _check_client_endpoint(table.at("connect"), connect)

    serial = None
    if device:
        for key in ("heartbeat", "idle_timeout"):
            if table.has(key):
                raise ModbusConfigError(table.at(key), "only applies to network links, not serial")
        if protocol != "rtu":
            raise ModbusConfigError(table.at("protocol"), "a serial line carries rtu only")
        serial = SerialSettings(
            device=device,
            baudrate=table.integer("baudrate", 9600, 50, 4_000_000),
            bytesize=table.integer("bytesize", 8, 5, 8),
            parity=table.choice("parity", "N", ("N", "E", "O", "M", "S")),
            stopbits=_stopbits(table),
        )
    else:
        present = [key for key in serial_keys if table.has(key)]
        if present:
            raise ModbusConfigError(table.at(present[0]), "only applies to serial links")
    table.finish()
    return LinkSettings(
        name=name,
        protocol=protocol,
        timeout=timeout,
        retries=retries,
        registration=registration,
        registration_prefix=registration_prefix,
        heartbeat=heartbeat,
        listen=listen,
        connect=connect,
        serial=serial,
        idle_timeout=idle_timeout,
    )


def _packet(table: _Table, key: str) -> bytes | None:
    text = table.string(key)
    if text is None:
        return None
    try:
        return decode_packet_option(text)
    except ValueError as exc:
        raise ModbusConfigError(table.at(key), str(exc)) from None


def _stopbits(table: _Table) -> float:
    value = table.raw("stopbits")
    if value is None:
        return 1
    if isinstance(value, bool) or value not in (1, 1.5, 2):
        raise ModbusConfigError(table.at("stopbits"), f"must be 1, 1.5 or 2, not {_describe(value)}")
    return value


def _check_server_endpoint(path: str, description: str) -> None:
    try:
        # Building an endpoint only parses the description; nothing listens yet.
        serverFromString(None, description)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModbusConfigError(path, f"{description!r} is not a valid server endpoint ({exc})") from None


def _check_client_endpoint(path: str, description: str) -> None:
    try:
        clientFromString(None, description)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModbusConfigError(path, f"{description!r} is not a valid client endpoint ({exc})") from None


def _parse_meter(table: _Table) -> MeterSettings:
    name = table.string("name", required=True)
    link = table.string("link", required=True)
    unit = table.integer("unit", None, 0, 255)
    interval = table.number("interval", 10.0)
    limits = BlockLimits(
        max_registers=table.integer("max_registers", MAX_READ_REGISTERS, 1, MAX_READ_REGISTERS),
        max_bits=table.integer("max_bits", MAX_READ_BITS, 1, MAX_READ_BITS),
        max_gap=table.integer("max_gap", BlockLimits().max_gap, 0, MAX_READ_REGISTERS),
    )
    points = tuple(_parse_point(point) for point in table.array_of_tables("point", table.at("point")))
    if not points:
        raise ModbusConfigError(table.at("point"), "a meter needs at least one [[meter.point]]")
    _check_unique_names(table.at("point"), [point.name for point in points])
    table.finish()
    return MeterSettings(name=name, link=link, unit=unit, interval=interval, points=points, limits=limits)


_TYPES = (*tuple(t.value for t in PointType if t is not PointType.BOOL), "bool")


def _parse_point(table: _Table) -> Point:
    name = table.string("name", required=True)
    if not table.has("table"):
        raise ModbusConfigError(table.at("table"), "is required")
    kind = Table(table.choice("table", "", tuple(t.value for t in Table)))
    address = table.integer("address", None, 0, 65535)
    type_name = table.choice("type", "bool" if kind.holds_bits else "uint16", _TYPES)
    point_type = PointType(type_name)
    if kind.holds_bits and point_type is not PointType.BOOL:
        raise ModbusConfigError(table.at("type"), f"a {kind.value} point is a single bit: use bool, not {type_name}")
    has_word_order = table.has("word_order")
    word_order = WordOrder(table.choice("word_order", "big", ("big", "little")))
    if has_word_order and point_type.registers < 2:
        raise ModbusConfigError(table.at("word_order"), f"only applies to 32- and 64-bit types, not {type_name}")
    has_scale = table.has("scale")
    scale = table.number("scale", 1.0, positive=False)
    if scale == 0:
        raise ModbusConfigError(table.at("scale"), "must not be 0")
    if has_scale and point_type is PointType.BOOL:
        raise ModbusConfigError(table.at("scale"), "does not apply to bool points")
    unit = table.string("unit")
    write_multiple = table.boolean("write_multiple", False)
    width = 1 if kind.holds_bits else point_type.registers
    if address + width > 65536:
        raise ModbusConfigError(table.at("address"), f"{type_name} at {address} runs past address 65535")
    table.finish()
    return Point(
        name=name,
        table=kind,
        address=address,
        type=point_type,
        word_order=word_order,
        scale=scale,
        unit=unit,
        write_multiple=write_multiple,
    )


def _check_unique_names(path: str, names: list[str]) -> None:
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            earlier = f"{path.rsplit('.', 1)[-1]}[{first[name]}]"
            raise ModbusConfigError(f"{path}[{index}].name", f"{name!r} is already the name of {earlier}")
        first[name] = index


def _check_links(links: tuple[LinkSettings, ...], shared_listen: str | None) -> None:
    _check_unique_names("link", [link.name for link in links])
    shared = [(index, link) for index, link in enumerate(links) if link.kind == "shared"]
    if shared and shared_listen is None:
        index, link = shared[0]
        raise ModbusConfigError(
            f"link[{index}]", f"link {link.name!r} waits for its DTU on the shared listener: set [modbus] listen"
        )
    # On a byte stream "DTU-1" cannot be told apart from the start of "DTU-10".
    for index, link in shared:
        for other_index, other in shared:
            if index == other_index or link.registration is None or other.registration is None:
                continue
            if other.registration.startswith(link.registration):
                relation = "the same as" if other.registration == link.registration else "a prefix of"
                raise ModbusConfigError(
                    f"link[{index}].registration",
                    f"is {relation} the registration of link[{other_index}] ({other.name!r});"
                    " registrations on the shared listener must be distinguishable",
                )


def _check_meters(meters: tuple[MeterSettings, ...], links: tuple[LinkSettings, ...]) -> None:
    _check_unique_names("meter", [meter.name for meter in meters])
    protocols = {link.name: link.protocol for link in links}
    for index, meter in enumerate(meters):
        if meter.link not in protocols:
            known = ", ".join(repr(name) for name in protocols) or "none defined"
            raise ModbusConfigError(f"meter[{index}].link", f"no link named {meter.link!r} (links: {known})")
        if protocols[meter.link] == "rtu" and not 1 <= meter.unit <= 247:
            raise ModbusConfigError(f"meter[{index}].unit", f"an rtu unit id is 1..247, not {meter.unit}")
