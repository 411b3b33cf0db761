"""Meter templates: the shipped ones, the reader's messages, and a templated meter in the config file."""

from __future__ import annotations

import io
import json
import struct
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import pytest_twisted
from pymodbus.framer import FramerType
from pymodbus.simulator import DataType, SimData, SimDevice

from dtucenter import cli
from dtucenter.config import ConfigError, read_settings
from dtucenter.modbus.points import PointType, Table, WordOrder, plan_reads
from dtucenter.modbus.templates import find_template, parse_template, read_template, shipped_templates
from tests.modbus.interop_support import PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.support import eventually, start_center

#: The Eastron addresses the brief's public register maps give, pinned here so that
#: a change to a template's address is a deliberate change to this table too.
SDM120_MAP = {
    "voltage": 0x0000, "current": 0x0006, "power": 0x000C, "apparent_power": 0x0012,
    "reactive_power": 0x0018, "power_factor": 0x001E, "frequency": 0x0046,
    "import_energy": 0x0048, "export_energy": 0x004A, "import_reactive_energy": 0x004C,
    "export_reactive_energy": 0x004E, "total_energy": 0x0156, "total_reactive_energy": 0x0158,
}
SDM630_MAP = {
    "voltage_l1": 0x0000, "voltage_l2": 0x0002, "voltage_l3": 0x0004,
    "current_l1": 0x0006, "current_l2": 0x0008, "current_l3": 0x000A,
    "power_l1": 0x000C, "power_l2": 0x000E, "power_l3": 0x0010,
    "apparent_power_l1": 0x0012, "apparent_power_l2": 0x0014, "apparent_power_l3": 0x0016,
    "reactive_power_l1": 0x0018, "reactive_power_l2": 0x001A, "reactive_power_l3": 0x001C,
    "power_factor_l1": 0x001E, "power_factor_l2": 0x0020, "power_factor_l3": 0x0022,
    "current_average": 0x002E, "current_sum": 0x0030, "power": 0x0034, "apparent_power": 0x0038,
    "reactive_power": 0x003C, "power_factor": 0x003E, "frequency": 0x0046,
    "import_energy": 0x0048, "export_energy": 0x004A, "import_reactive_energy": 0x004C,
    "export_reactive_energy": 0x004E, "total_energy": 0x0156, "total_reactive_energy": 0x0158,
}


# -- the shipped templates ------------------------------------------------------------------------


def test_the_shipped_templates_are_the_package_files() -> None:
    files = sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files("dtucenter.modbus.templates").iterdir()
        if entry.name.endswith(".toml")
    )
    assert files == sorted(shipped_templates()) == ["eastron-sdm120", "eastron-sdm630", "generic-energy-meter"]


@pytest.mark.parametrize("name", ["eastron-sdm120", "eastron-sdm630", "generic-energy-meter"])
def test_each_shipped_template_loads_and_plans_into_few_reads(name: str) -> None:
    template = find_template(name)
    assert template.name == name and template.version >= 1
    assert template.description and template.manufacturer and template.model and template.source
    blocks = plan_reads(template.points)
    assert sum(len(block.points) for block in blocks) == len(template.points)
    assert len(blocks) <= 3, [block.describe() for block in blocks]


@pytest.mark.parametrize(("name", "register_map"), [("eastron-sdm120", SDM120_MAP), ("eastron-sdm630", SDM630_MAP)])
def test_eastron_templates_follow_the_public_register_map(name: str, register_map: dict[str, int]) -> None:
    template = find_template(name)
    assert {point.name: point.address for point in template.points} == register_map
    for point in template.points:
        assert (point.table, point.type, point.word_order, point.scale) == (
            Table.INPUT, PointType.FLOAT32, WordOrder.BIG, 1.0
        ), point.name
    assert "Eastron" in template.source and "manual" in template.source


def test_an_unknown_template_names_the_shipped_ones() -> None:
    with pytest.raises(LookupError) as caught:
        find_template("sdm120")
    assert str(caught.value) == (
        "no template named 'sdm120' (templates: eastron-sdm120, eastron-sdm630, generic-energy-meter)"
    )


def test_the_cli_lists_and_shows_the_shipped_templates() -> None:
    out = io.StringIO()
    assert cli.main(["template", "list", "--json"], out) == 0
    listed = json.loads(out.getvalue())["templates"]
    assert [entry["name"] for entry in listed] == list(shipped_templates())
    assert listed[0] == {**shipped_templates()["eastron-sdm120"].summary(), "points": len(SDM120_MAP), "account": None}
    out = io.StringIO()
    assert cli.main(["template", "list"], out) == 0
    assert out.getvalue().splitlines()[1].startswith("eastron-sdm630\tversion 1\t31 points\t")
    out = io.StringIO()
    assert cli.main(["template", "show", "generic-energy-meter"], out) == 0
    assert parse_template(out.getvalue(), "shown") == find_template("generic-energy-meter")
    assert out.getvalue().startswith("# A generic energy meter")


def test_the_cli_names_the_templates_when_asked_for_another(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["template", "show", "sdm120"], io.StringIO()) == 1
    assert capsys.readouterr().err == (
        "dtucenter: no template named 'sdm120' (templates: eastron-sdm120, eastron-sdm630, generic-energy-meter)\n"
    )


# -- a template file's mistakes: one line naming the file and the point -----------------------------

GOOD = """
name = "my-meter"
version = 2
description = "d"
manufacturer = "m"
model = "x"
source = "s"

[[point]]
name = "voltage"
table = "input"
address = 0
type = "float32"
"""


def test_a_template_is_read_from_a_document() -> None:
    template = parse_template(GOOD, "my-meter.toml")
    assert (template.name, template.version, [p.name for p in template.points]) == ("my-meter", 2, ["voltage"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('type = "float32"', 'type = "float32"\nscale = 0'), 'my-meter.toml: point "voltage": scale: must not be 0'),
        (('type = "float32"', 'type = "float32"\nword-order = "sideways"'),
         'my-meter.toml: point "voltage": word-order: must be one of big, little, got \'sideways\''),
        (('table = "input"', 'table = "coil"'),
         'my-meter.toml: point "voltage": type: a coil point is a single bit: use bool, not float32'),
        (("address = 0", "address = 65535"),
         'my-meter.toml: point "voltage": address: float32 at 65535 runs past address 65535'),
        (('source = "s"\n', ""), "my-meter.toml: source: is required"),
        (("version = 2", "version = 0"), "my-meter.toml: version: must be between 1 and 1000000, got 0"),
        (('name = "my-meter"', 'name = "My Meter"'),
         "my-meter.toml: name: must be lower-case letters, digits and dashes (at most 100), got 'My Meter'"),
        (('model = "x"', 'model = "x"\npoints = 3'), "my-meter.toml: points: unknown key (a typo?)"),
        (('type = "float32"', 'type = "float32"\n[[point]]\nname = "voltage"\ntable = "input"\naddress = 9'),
         "my-meter.toml: point[1]: name: 'voltage' is already the name of point[0]"),
        (("[[point]]", "[point]"), "my-meter.toml: point: must be an array of tables ([[point]]), got a table"),
        (("name = \"voltage\"\n", ""), "my-meter.toml: point[0]: name: is required"),
    ],
)
def test_template_mistakes_are_one_line(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as caught:
        parse_template(GOOD.replace(old, new, 1), "my-meter.toml")
    assert str(caught.value) == message


def test_a_template_without_points_or_toml_is_refused() -> None:
    without_points = GOOD[: GOOD.index("[[point]]")]
    with pytest.raises(ConfigError, match=r"^t.toml: point: a template needs at least one \[\[point\]\]$"):
        parse_template(without_points, "t.toml")
    with pytest.raises(ConfigError, match=r"^t.toml: not valid TOML: "):
        parse_template(b"name = ", "t.toml")
    with pytest.raises(ConfigError, match=r"^t.toml: must be a table, got an array$"):
        read_template([], "t.toml")  # type: ignore[arg-type]


# -- a templated meter in the config file ----------------------------------------------------------

LINK = """
[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port=502"
"""


def templated_meter(template: str = "eastron-sdm120", extra: str = "") -> str:
    return f'[[meter]]\nname = "house"\nlink = "plant"\nunit = 3\ninterval = 5\ntemplate = "{template}"\n{extra}'


def test_a_meter_takes_its_points_from_a_template() -> None:
    (meter,) = read_settings(tomllib.loads(LINK + templated_meter())).modbus.meters
    assert meter.points == find_template("eastron-sdm120").points
    assert (meter.template, meter.unit, meter.interval) == ("eastron-sdm120", 3, 5.0)


@pytest.mark.parametrize(
    ("meter", "message"),
    [
        (templated_meter("sdm120"), (
            'c.toml: meter "house": template: no template named \'sdm120\' (templates: '
            "eastron-sdm120, eastron-sdm630, generic-energy-meter)"
        )),
        (templated_meter(extra='[[meter.point]]\nname = "x"\ntable = "input"\naddress = 0\n'),
         (
             'c.toml: meter "house": point: cannot be combined with template \'eastron-sdm120\'; '
             "to change its points, list them all instead"
         )),
        (templated_meter().replace('template = "eastron-sdm120"\n', ""),
         'c.toml: meter "house": point: a meter needs a template or at least one [[meter.point]]'),
        (templated_meter().replace('"eastron-sdm120"', "120"),
         'c.toml: meter "house": template: must be a non-empty string, got 120'),
    ],
)
def test_templated_meter_mistakes(meter: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_settings(tomllib.loads(LINK + meter), source="c.toml")
    assert str(caught.value) == message


# -- end to end: an SDM120 answers, the center stores its floats ----------------------------------

#: What the fake SDM120 holds: a distinct float at every point, and a value at every register
#: around them that no point decodes to, so a point read at a wrong address shows.
SDM120_VALUES = {
    "voltage": 230.5, "current": 4.25, "power": 979.75, "apparent_power": 1000.5, "reactive_power": -201.25,
    "power_factor": 0.96875, "frequency": 49.96875, "import_energy": 12345.5, "export_energy": 17.125,
    "import_reactive_energy": 3.5, "export_reactive_energy": 0.75, "total_energy": 12362.625,
    "total_reactive_energy": 4.25 + 0.015625,
}
FILLER = 0xDEAD


def sdm120(unit: int) -> SimDevice:
    registers = [FILLER] * 0x0160
    for name, address in SDM120_MAP.items():
        registers[address : address + 2] = struct.unpack(">HH", struct.pack(">f", SDM120_VALUES[name]))
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[0] * 16, datatype=DataType.REGISTERS)],
            [SimData(0, values=registers, datatype=DataType.REGISTERS)],
        ),
    )


@pytest_twisted.ensureDeferred
async def test_a_templated_meter_is_polled_and_its_floats_stored(tmp_path: Path, db_url: str) -> None:
    meter = PymodbusServer([sdm120(7)], framer=FramerType.SOCKET).start()
    try:
        config = tmp_path / "center.toml"
        config.write_text(
            f'[[link]]\nname = "plant"\nprotocol = "tcp"\nconnect = "tcp:host=127.0.0.1:port={meter.port}"\n'
            '[[meter]]\nname = "house"\nlink = "plant"\nunit = 7\ninterval = 0.2\ntemplate = "eastron-sdm120"\n'
        )
        center = await start_center(tmp_path, "--config", str(config), db_url=db_url)
        try:
            api = center.api()
            stored = await eventually(lambda: latest_poll(api, "house"), "the stored values of the SDM120")
            assert stored == SDM120_VALUES
            info = (await api.get("/api/meters/house")).body
            assert [point["name"] for point in info["points"]] == list(SDM120_MAP)
        finally:
            await center.stop()
    finally:
        meter.stop()

