"""The Modbus part of the config file: a full example, and errors that name their key."""

from __future__ import annotations

import tomllib

import pytest

from dtucenter.modbus.config import (
    ModbusConfigError,
    SerialSettings,
    parse_modbus_settings,
)
from dtucenter.modbus.points import BlockLimits, PointType, Table, WordOrder

EXAMPLE = """
[modbus]
listen = "tcp:5020:interface=127.0.0.1"
login_timeout = 20

[[link]]
name = "site-a"
protocol = "rtu"
registration = "DTU-0001"
heartbeat = "HB"
idle_timeout = 180
timeout = 3.0
retries = 1

[[link]]
name = "site-b"
registration = "hex:0A0B0C"
registration_prefix = true

[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port=502"
heartbeat = "hex:FE"

[[link]]
name = "yard"
listen = "tcp:20101"

[[link]]
name = "panel"
serial = "/dev/ttyUSB0"
baudrate = 19200
parity = "E"
stopbits = 1

[[meter]]
name = "meter-1"
link = "site-a"
unit = 1
interval = 10

[[meter.point]]
name = "voltage"
table = "holding"
address = 0
type = "uint16"
scale = 0.1
unit = "V"

[[meter.point]]
name = "energy"
table = "input"
address = 10
type = "float32"
word_order = "little"
unit = "kWh"

[[meter]]
name = "meter-2"
link = "site-a"
unit = 2
max_gap = 0
max_registers = 64

[[meter.point]]
name = "relay"
table = "coil"
address = 3
"""


def parse(text: str):
    return parse_modbus_settings(tomllib.loads(text))


def error_of(text: str) -> ModbusConfigError:
    with pytest.raises(ModbusConfigError) as caught:
        parse(text)
    return caught.value


def test_full_example_parses() -> None:
    settings = parse(EXAMPLE)
    assert settings.listen == "tcp:5020:interface=127.0.0.1"
    assert settings.login_timeout == 20.0
    links = {link.name: link for link in settings.links}
    assert links["site-a"].registration == b"DTU-0001"
    assert links["site-a"].heartbeat == b"HB"
    assert links["site-a"].kind == "shared"
    assert links["site-a"].idle_timeout == 180.0
    assert links["site-b"].idle_timeout is None
    assert links["site-b"].registration == b"\x0a\x0b\x0c"
    assert links["site-b"].registration_prefix
    assert links["plant"].kind == "connect"
    assert links["plant"].protocol == "tcp"
    assert links["plant"].heartbeat == b"\xfe"
    assert links["yard"].kind == "listen"
    assert links["panel"].serial == SerialSettings("/dev/ttyUSB0", baudrate=19200, parity="E")
    meter1, meter2 = settings.meters
    assert (meter1.link, meter1.unit, meter1.interval) == ("site-a", 1, 10.0)
    voltage, energy = meter1.points
    assert (voltage.table, voltage.type, voltage.scale, voltage.unit) == (Table.HOLDING, PointType.UINT16, 0.1, "V")
    assert (energy.table, energy.type, energy.word_order) == (Table.INPUT, PointType.FLOAT32, WordOrder.LITTLE)
    assert meter2.limits == BlockLimits(max_registers=64, max_bits=2000, max_gap=0)
    assert meter2.points[0].type is PointType.BOOL  # the default for a coil


def test_a_document_without_modbus_parts_gives_empty_settings() -> None:
    settings = parse_modbus_settings({"db": "sqlite:///x.db"})
    assert (settings.listen, settings.links, settings.meters) == (None, (), ())


METER = """
[[link]]
name = "l"
listen = "tcp:20101"
[[meter]]
name = "m"
link = "l"
unit = 1
"""


def with_point(**keys: object) -> str:
    point = {"name": "p", "table": "holding", "address": 0} | keys
    body = "\n".join(f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}" for k, v in point.items() if v is not None)
    return METER + "[[meter.point]]\n" + body.replace("'", '"') + "\n"


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        (with_point(type="uint15"), "meter[0].point[0].type", "'uint15' is not one of int16, uint16"),
        (with_point(table="holdings"), "meter[0].point[0].table", "is not one of holding, input, coil, discrete"),
        (with_point(table=None), "meter[0].point[0].table", "is required"),
        (with_point(address=None), "meter[0].point[0].address", "is required"),
        (with_point(address=70000), "meter[0].point[0].address", "between 0 and 65535"),
        (with_point(address=65535, type="uint32"), "meter[0].point[0].address", "runs past address 65535"),
        (with_point(address="7"), "meter[0].point[0].address", "must be an integer"),
        (with_point(addres=3), "meter[0].point[0].addres", "unknown key"),
        (with_point(word_order="big", type="uint16"), "meter[0].point[0].word_order", "only applies to 32- and 64-bit"),
        (with_point(word_order="middle", type="uint32"), "meter[0].point[0].word_order", "not one of big, little"),
        (with_point(scale=0), "meter[0].point[0].scale", "must not be 0"),
        (with_point(scale=True), "meter[0].point[0].scale", "must be a number"),
        (with_point(type="bool", scale=2), "meter[0].point[0].scale", "does not apply to bool"),
        (with_point(table="coil", type="uint16"), "meter[0].point[0].type", "single bit: use bool"),
        (METER, "meter[0].point", "at least one"),
    ],
)
def test_point_errors_name_the_key(text: str, path: str, problem: str) -> None:
    error = error_of(text)
    assert error.path == path
    assert problem in error.problem
    assert str(error).startswith(path + ": ")


def test_error_path_counts_meters_and_points() -> None:
    text = with_point() + with_point(type="uint15").replace(METER, '[[meter]]\nname = "m2"\nlink = "l"\nunit = 2\n')
    text += '[[meter.point]]\nname = "q"\ntable = "input"\naddress = 1\ntype = "int99"\n'
    assert error_of(text).path == "meter[1].point[0].type"


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ('[modbus]\nlisten = "tcp:5020"\nlisen = 1\n', "modbus.lisen", "unknown key"),
        ('[modbus]\nlisten = "tcp:port"\n', "modbus.listen", "not a valid server endpoint"),
        ('[modbus]\nlogin_timeout = -1\n', "modbus.login_timeout", "greater than 0"),
        ('modbus = 3\n', "modbus", "must be a table"),
        ('link = 3\n', "link", "array of tables"),
        ('[[link]]\nlisten = "tcp:1"\n', "link[0].name", "is required"),
        ('[[link]]\nname = "a"\n', "link[0]", "needs one of registration"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nheartbeet = "HB"\n', "link[0].heartbeet", "unknown key"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nprotocol = "ascii"\n', "link[0].protocol", "not one of rtu, tcp"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\ntimeout = 0\n', "link[0].timeout", "greater than 0"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nretries = -1\n', "link[0].retries", "between 0 and 10"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nheartbeat = "hex:XY"\n', "link[0].heartbeat", "not valid hex"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nconnect = "tcp:host=h:port=1"\n', "link[0].connect", "cannot be combined with listen"),
        ('[[link]]\nname = "a"\nconnect = "tcp:host=h"\n', "link[0].connect", "not a valid client endpoint"),
        ('[[link]]\nname = "a"\nconnect = "tcp:host=h:port=1"\nregistration = "X"\n', "link[0].registration", "only applies to links the DTU dials"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nregistration_prefix = true\n', "link[0].registration_prefix", "needs registration"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nbaudrate = 9600\n', "link[0].baudrate", "only applies to serial"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nheartbeat = "HB"\n', "link[0].heartbeat", "network links"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nidle_timeout = 60\n', "link[0].idle_timeout", "network links"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nprotocol = "tcp"\n', "link[0].protocol", "rtu only"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nstopbits = 3\n', "link[0].stopbits", "1, 1.5 or 2"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nparity = "X"\n', "link[0].parity", "not one of N, E, O"),
        ('[[link]]\nname = "a"\nregistration = "R"\n', "link[0]", "set [modbus] listen"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\n[[link]]\nname = "a"\nlisten = "tcp:2"\n', "link[1].name", "already the name of link[0]"),
    ],
)
def test_link_errors_name_the_key(text: str, path: str, problem: str) -> None:
    error = error_of(text)
    assert error.path == path
    assert problem in error.problem


def test_registrations_on_the_shared_listener_must_be_distinguishable() -> None:
    text = '[modbus]\nlisten = "tcp:5020"\n'
    text += '[[link]]\nname = "a"\nregistration = "DTU-1"\n[[link]]\nname = "b"\nregistration = "DTU-10"\n'
    error = error_of(text)
    assert error.path == "link[0].registration"
    assert "a prefix of the registration of link[1] ('b')" in error.problem
    same = text.replace("DTU-10", "DTU-1")
    assert "the same as" in error_of(same).problem


@pytest.mark.parametrize(
    ("extra", "path", "problem"),
    [
        ('link = "nope"', "meter[0].link", "no link named 'nope' (links: 'l')"),
        ("unit = 0", "meter[0].unit", "an rtu unit id is 1..247"),
        ("interval = 0", "meter[0].interval", "greater than 0"),
        ("max_registers = 126", "meter[0].max_registers", "between 1 and 125"),
        ("colour = 1", "meter[0].colour", "unknown key"),
    ],
)
def test_meter_errors_name_the_key(extra: str, path: str, problem: str) -> None:
    text = with_point()
    key = extra.split(" = ")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key + " ="))
    text = text.replace('[[meter]]\n', f'[[meter]]\n{extra}\n')
    error = error_of(text)
    assert error.path == path
    assert problem in error.problem


def test_meter_needs_a_unit_and_unique_names() -> None:
    text = with_point().replace("unit = 1\n", "")
    assert error_of(text).path == "meter[0].unit"
    twice = with_point() + '[[meter.point]]\nname = "p"\ntable = "input"\naddress = 0\n'
    error = error_of(twice)
    assert (error.path, error.problem) == ("meter[0].point[1].name", "'p' is already the name of point[0]")


def test_tcp_links_accept_any_unit_id() -> None:
    text = with_point().replace('listen = "tcp:20101"', 'listen = "tcp:20101"\nprotocol = "tcp"').replace("unit = 1", "unit = 255")
    assert parse(text).meters[0].unit == 255
