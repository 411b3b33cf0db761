"""Links and meters back to the file's keys: what the database stores and the API shows."""

from __future__ import annotations

import tomllib

from dtucenter.config import read_settings
from dtucenter.modbus.config import link_table, meter_table
from dtucenter.modbus.filter import decode_packet_option, encode_packet_option

MODBUS = """
[modbus]
listen = "tcp:5020:interface=127.0.0.1"
"""

DEVICES = MODBUS + """
[[link]]
name = "site-a"
registration = "hex:00 FF 41"
registration_mode = "data"
heartbeat = "HB"
idle_timeout = 120
timeout = 2.5
retries = 3

[[link]]
name = "site-b"
registration = "DTU-0002"
registration_prefix = true

[[link]]
name = "yard"
listen = "tcp:20101:interface=127.0.0.1"
registration = "YARD"

[[link]]
name = "plant"
protocol = "tcp"
connect = "tcp:host=127.0.0.1:port=1502"

[[link]]
name = "panel"
serial = "/dev/ttyTEST0"
baudrate = 19200
parity = "E"
stopbits = 2

[[meter]]
name = "sdm"
link = "site-a"
unit = 3
interval = 5
template = "eastron-sdm120"

[[meter]]
name = "custom"
link = "plant"
unit = 7
max_registers = 20

[[meter.point]]
name = "energy"
table = "input"
address = 342
type = "float32"
word_order = "little"
scale = 0.001
unit = "kWh"

[[meter.point]]
name = "relay"
table = "coil"
address = 1
write_multiple = true

[[meter.point]]
name = "raw"
table = "holding"
address = 9
"""


def test_every_link_and_meter_reads_back_from_its_table_as_it_was() -> None:
    original = read_settings(tomllib.loads(DEVICES)).modbus
    document = tomllib.loads(MODBUS) | {
        "link": [link_table(link) for link in original.links],
        "meter": [meter_table(meter) for meter in original.meters],
    }
    again = read_settings(document).modbus
    assert again.links == original.links
    assert again.meters == original.meters


def test_a_table_holds_only_what_differs_from_the_defaults_in_the_files_spelling() -> None:
    site_a, site_b, _, _, panel = read_settings(tomllib.loads(DEVICES)).modbus.links
    assert link_table(site_a) == {
        "name": "site-a", "timeout": 2.5, "retries": 3, "registration": "hex:00FF41", "registration_mode": "data",
        "heartbeat": "HB", "idle_timeout": 120.0,
    }
    assert link_table(site_b) == {"name": "site-b", "registration": "DTU-0002", "registration_mode": "both"}
    assert link_table(panel) == {
        "name": "panel", "serial": "/dev/ttyTEST0", "baudrate": 19200, "parity": "E", "stopbits": 2.0,
    }
    sdm, custom = read_settings(tomllib.loads(DEVICES)).modbus.meters
    assert meter_table(sdm) == {"name": "sdm", "link": "site-a", "unit": 3, "template": "eastron-sdm120",
                                "interval": 5.0}
    assert meter_table(custom)["point"][2] == {"name": "raw", "table": "holding", "address": 9, "type": "uint16"}


def test_packets_are_spelt_as_text_only_where_text_reads_back_the_same() -> None:
    for packet in (b"DTU-1", b"\x00\xff", b"hex:41", "IMEI \u00e9".encode(), b"A\r\n", b"\xff"):
        assert decode_packet_option(encode_packet_option(packet)) == packet
    assert encode_packet_option(b"DTU-1") == "DTU-1"
    assert encode_packet_option(b"hex:41") == "hex:6865783A3431"
    assert encode_packet_option(b"A\r\n") == "hex:410D0A"
