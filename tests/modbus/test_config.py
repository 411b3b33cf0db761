"""The Modbus part of the config file: a full example, and errors that name their key."""

from __future__ import annotations

import tomllib

import pytest

from dtucenter.config import ConfigError, read_settings
from dtucenter.modbus.config import ModbusSettings, SerialSettings
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


def parse(text: str) -> ModbusSettings:
    return read_settings(tomllib.loads(text), source="center.toml").modbus


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == f"center.toml: {caught.value.path}: {caught.value.problem}"
    assert "\n" not in str(caught.value)
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
    settings = read_settings({"db": "sqlite:///x.db"}).modbus
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
    body = "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in point.items() if v is not None
    )
    return METER + "[[meter.point]]\n" + body.replace("'", '"') + "\n"


POINT = 'meter "m": point "p"'


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        (with_point(type="uint15"), f"{POINT}: type", "must be one of int16, uint16"),
        (with_point(table="holdings"), f"{POINT}: table",
         "must be one of holding, input, coil, discrete, got 'holdings'"),
        (with_point(table=None), f"{POINT}: table", "is required"),
        (with_point(address=None), f"{POINT}: address", "is required"),
        (with_point(address=70000), f"{POINT}: address", "must be between 0 and 65535, got 70000"),
        (with_point(address=65535, type="uint32"), f"{POINT}: address", "runs past address 65535"),
        (with_point(address="seven"), f"{POINT}: address", "must be a whole number, got 'seven'"),
        (with_point(address=1.5), f"{POINT}: address", "must be a whole number, got 1.5"),
        (with_point(addres=3), f"{POINT}: addres", "unknown key (a typo?)"),
        (with_point(word_order="big", type="uint16"), f"{POINT}: word_order", "only applies to 32- and 64-bit"),
        (with_point(word_order="middle", type="uint32"), f"{POINT}: word_order", "must be one of big, little"),
        (with_point(scale=0), f"{POINT}: scale", "must not be 0"),
        (with_point(scale=True), f"{POINT}: scale", "must be a number, got true"),
        (with_point(type="bool", scale=2), f"{POINT}: scale", "does not apply to bool"),
        (with_point(table="coil", type="uint16"), f"{POINT}: type", "single bit: use bool"),
        (with_point(name=None), 'meter "m": point[0]: name', "is required"),
        (with_point(name=""), 'meter "m": point[0]: name', "must be a non-empty string, got ''"),
        (with_point(name=7), 'meter "m": point[0]: name', "must be a non-empty string, got 7"),
        (with_point(name="p" * 101), 'meter "m": point[0]: name', "at most 100 characters, got 101"),
        (METER, 'meter "m": point', "a meter needs a template or at least one [[meter.point]]"),
        (METER + 'point = 3\n', 'meter "m": point', "must be an array of tables ([[point]]), got 3"),
        (METER + 'point = [3]\n', 'meter "m": point[0]', "must be a table, got 3"),
    ],
)
def test_point_errors_name_the_key(text: str, path: str, problem: str) -> None:
    error = error_of(text)
    assert error.path == path
    assert problem in error.problem


def test_error_path_names_meters_and_points() -> None:
    text = with_point() + with_point(type="uint15").replace(METER, '[[meter]]\nname = "m2"\nlink = "l"\nunit = 2\n')
    text += '[[meter.point]]\nname = "q"\ntable = "input"\naddress = 1\ntype = "int99"\n'
    assert error_of(text).path == 'meter "m2": point "p": type'


def test_keys_may_be_written_with_dashes_but_only_once() -> None:
    assert parse('[modbus]\nlisten = "tcp:5020"\nlogin-timeout = 4\n').login_timeout == 4
    error = error_of('[modbus]\nlogin-timeout = 4\nlogin_timeout = 5\n')
    assert (error.path, error.problem) == ("modbus: login_timeout", "given twice, as login-timeout and login_timeout")


def test_numbers_may_be_written_as_text() -> None:
    point = parse(with_point(address="0x10", scale="0.5")).meters[0].points[0]
    assert (point.address, point.scale) == (16, 0.5)


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ('[modbus]\nlisten = "tcp:5020"\nlisen = 1\n', "modbus: lisen", "unknown key"),
        ('[modbus]\nlisten = "tcp:port"\n', "modbus: listen", "not a usable server endpoint 'tcp:port'"),
        ('[modbus]\nlogin_timeout = -1\n', "modbus: login_timeout", "must be a number > 0, got -1"),
        ('modbus = 3\n', "modbus", "must be a table, got 3"),
        ('link = 3\n', "link", "must be an array of tables ([[link]]), got 3"),
        ('link = [3]\n', "link[0]", "must be a table, got 3"),
        ('[[link]]\nlisten = "tcp:1"\n', "link[0]: name", "is required"),
        ('[[link]]\nname = "a"\n', 'link "a"', "needs one of registration"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nheartbeet = "HB"\n', 'link "a": heartbeet', "unknown key"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nprotocol = "ascii"\n', 'link "a": protocol',
         "must be one of rtu, tcp"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\ntimeout = 0\n', 'link "a": timeout', "must be a number > 0, got 0"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nretries = -1\n', 'link "a": retries', "must be between 0 and 10"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nheartbeat = "hex:XY"\n', 'link "a": heartbeat', "not valid hex"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nconnect = "tcp:host=h:port=1"\n', 'link "a": connect',
         "cannot be combined with listen"),
        ('[[link]]\nname = "a"\nconnect = "tcp:host=h"\n', 'link "a": connect', "not a usable client endpoint"),
        ('[[link]]\nname = "a"\nconnect = "tcp:host=h:port=1"\nregistration = "X"\n', 'link "a": registration',
         "only applies to links the DTU dials"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nregistration_prefix = true\n', 'link "a": registration_prefix',
         "needs registration"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nregistration_prefix = 1\n', 'link "a": registration_prefix',
         "must be true or false, got 1"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\nbaudrate = 9600\n', 'link "a": baudrate', "only applies to serial"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nheartbeat = "HB"\n', 'link "a": heartbeat', "network links"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nidle_timeout = 60\n', 'link "a": idle_timeout', "network links"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nprotocol = "tcp"\n', 'link "a": protocol', "rtu only"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nstopbits = 3\n', 'link "a": stopbits', "must be 1, 1.5 or 2, got 3"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nparity = "X"\n', 'link "a": parity', "must be one of N, E, O"),
        ('[[link]]\nname = "a"\nserial = "/dev/x"\nbaudrate = 10\n', 'link "a": baudrate',
         "must be between 50 and 4000000, got 10"),
        ('[[link]]\nname = "a"\nregistration = "R"\n', 'link "a"', "set [modbus] listen (or --modbus)"),
        ('[[link]]\nname = "a"\nlisten = "tcp:1"\n[[link]]\nname = "a"\nlisten = "tcp:2"\n', "link[1]: name",
         "'a' is already the name of link[0]"),
    ],
)
def test_link_errors_name_the_key(text: str, path: str, problem: str) -> None:
    error = error_of(text)
    assert error.path == path
    assert problem in error.problem


def test_the_example_message() -> None:
    text = '[[link]]\nname = "site-a"\nlisten = "tcp:1"\ntimeout = 0\n'
    assert str(error_of(text)) == 'center.toml: link "site-a": timeout: must be a number > 0, got 0'


def test_registrations_on_the_shared_listener_must_be_distinguishable() -> None:
    text = '[modbus]\nlisten = "tcp:5020"\n'
    text += '[[link]]\nname = "a"\nregistration = "DTU-1"\n[[link]]\nname = "b"\nregistration = "DTU-10"\n'
    error = error_of(text)
    assert error.path == 'link "a": registration'
    assert "a prefix of the registration of link 'b'" in error.problem
    same = text.replace("DTU-10", "DTU-1")
    assert "the same as" in error_of(same).problem


@pytest.mark.parametrize(
    ("extra", "path", "problem"),
    [
        ('link = "nope"', 'meter "m": link', "no link named 'nope' (links: 'l')"),
        ("unit = 0", 'meter "m": unit', "an rtu unit id is 1..247, got 0"),
        ("unit = 256", 'meter "m": unit', "must be between 0 and 255, got 256"),
        ("interval = 0", 'meter "m": interval', "must be a number > 0"),
        ("max_registers = 126", 'meter "m": max_registers', "must be between 1 and 125"),
        ("max_bits = 0", 'meter "m": max_bits', "must be between 1 and 2000"),
        ("max_gap = -1", 'meter "m": max_gap', "must be between 0 and 125"),
        ("colour = 1", 'meter "m": colour', "unknown key"),
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


def test_meter_needs_a_name_a_unit_and_unique_names() -> None:
    text = with_point().replace("unit = 1\n", "")
    assert error_of(text).path == 'meter "m": unit'
    assert error_of(with_point().replace('name = "m"\n', "")).path == "meter[0]: name"
    twice = with_point() + '[[meter.point]]\nname = "p"\ntable = "input"\naddress = 0\n'
    error = error_of(twice)
    assert (error.path, error.problem) == ('meter "m": point[1]: name', "'p' is already the name of point[0]")
    other = with_point() + '[[meter]]\nname = "m"\nlink = "l"\nunit = 2\n'
    other += '[[meter.point]]\nname = "p"\ntable = "input"\naddress = 0\n'
    error = error_of(other)
    assert (error.path, error.problem) == ("meter[1]: name", "'m' is already the name of meter[0]")


def test_tcp_links_accept_any_unit_id() -> None:
    text = with_point().replace('listen = "tcp:20101"', 'listen = "tcp:20101"\nprotocol = "tcp"')
    text = text.replace("unit = 1", "unit = 255")
    assert parse(text).meters[0].unit == 255


def test_scada_units_are_checked_and_unique() -> None:
    served = with_point().replace("unit = 1\n", "unit = 1\nscada_unit = 7\nscada_max_age = 60\n")
    [meter] = parse(served).meters
    assert (meter.scada_unit, meter.scada_max_age, meter.served_age) == (7, 60.0, 60.0)
    [unserved] = parse(with_point()).meters
    assert (unserved.scada_unit, unserved.served_age) == (None, 3 * unserved.interval)
    assert error_of(served.replace("scada_unit = 7", "scada_unit = 0")).path == 'meter "m": scada_unit'
    other = served + '[[meter]]\nname = "n"\nlink = "l"\nunit = 2\nscada_unit = 7\n'
    other += '[[meter.point]]\nname = "p"\ntable = "input"\naddress = 0\n'
    error = error_of(other)
    assert (error.path, error.problem) == ('meter "n": scada_unit', "7 is already the scada_unit of meter 'm'")


def test_the_scada_server_keys_need_the_server() -> None:
    text = with_point().replace('[[link]]', '[modbus]\nserver_allow = ["10.0.0.0/8"]\n\n[[link]]', 1)
    error = error_of(text)
    assert (error.path, error.problem) == (
        "modbus: server_allow", "applies to the Modbus TCP server for SCADA: set server (or --modbus-server)")
    settings = parse(text.replace("[modbus]\n", '[modbus]\nserver = "tcp:502:interface=10.0.0.5"\n'))
    assert (settings.server, settings.server_allow, settings.server_max_clients) == (
        "tcp:502:interface=10.0.0.5", ("10.0.0.0/8",), 64)
    bad = error_of(text.replace("10.0.0.0/8", "10.0.0.300"))
    assert bad.path == "modbus: server_allow" and "not an address or network: '10.0.0.300'" in bad.problem
