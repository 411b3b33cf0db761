"""Each USR registration mode end to end: a scripted DTU dials the real bridge on loopback and
relays to a real pymodbus server, on a dedicated port and on the shared listener."""

from __future__ import annotations

import pytest
import pytest_twisted
from pymodbus.framer import FramerType

from dtucenter.modbus.service import SHARED_LISTENER
from tests.modbus.interop_support import FakeDtu, WaitingSink, matches_unit_1, meter_toml
from tests.modbus.modbus_helpers import holding_response, mbap, read_holding, rtu
from tests.modbus.test_interop import start_bridge

#: A registration that is itself a valid answer of unit 1 to a holding read (CRC included):
#: taken for the response, it would decode as the wrong block.
RTU_LOOKALIKE = rtu(holding_response(1, [0xBEEF]))
MBAP_LOOKALIKE = mbap(holding_response(1, [0xBEEF]), 1)
#: What the shared listener sends a connection that stays silent: read unit 1's register 0.
PROBE = rtu(read_holding(1, 0, 1))


async def poll_through(dtu_options: dict, toml: str, link: str, listener: str, framer: FramerType,
                       meter_server) -> None:
    bus = meter_server(framer)
    sink = WaitingSink()
    bridge = await start_bridge(toml + meter_toml("m1", link, 1), sink)
    dtu = None
    try:
        port = (await bridge.listening(listener)).getHost().port
        dtu = await FakeDtu(**dtu_options).start(port, bus.port)
        await sink.wait_for("three polls of m1", lambda: len(sink.values) >= 3)
        assert all(matches_unit_1(values) for _, _, values in sink.values), "every poll decoded right"
        assert {reason for _, _, reason in sink.failures} <= {f"link {link} is offline"}, "only before it dialled"
        counters = bridge.links[link].status().counters
        assert counters["heartbeats"] > 0
        assert counters["errors"] == counters["timeouts"] == 0
    finally:
        if dtu is not None:
            await dtu.stop()
        await bridge.stopService()


@pytest.mark.parametrize("mode", ["connect", "data", "both"])
@pytest.mark.parametrize(
    ("protocol", "framer", "registration"),
    [("rtu", FramerType.RTU, RTU_LOOKALIKE), ("tcp", FramerType.SOCKET, MBAP_LOOKALIKE)],
    ids=["rtu", "tcp"],
)
@pytest_twisted.ensureDeferred
async def test_each_mode_on_a_dedicated_port(meter_server, mode: str, protocol: str, framer: FramerType,
                                             registration: bytes) -> None:
    toml = f"""
[[link]]
name = "usr"
protocol = "{protocol}"
listen = "tcp:0:interface=127.0.0.1"
registration = "hex:{registration.hex()}"
registration_mode = "{mode}"
heartbeat = "HB"
timeout = 1.0
"""
    dtu = {"registration": registration, "registration_mode": mode, "framing": protocol}
    await poll_through(dtu, toml, "usr", "usr", framer, meter_server)


SHARED = """
[modbus]
listen = "tcp:0:interface=127.0.0.1"
login_timeout = 5
{probe}

[[link]]
name = "other"
registration = "DTU-0002"
registration_mode = "data"
heartbeat = "HB"

[[link]]
name = "usr"
registration = "DTU-0001"
registration_mode = "{mode}"
heartbeat = "HB"
timeout = 1.0
"""


@pytest.mark.parametrize(
    ("mode", "prefix_heartbeats", "probe"),
    [
        ("connect", True, False),
        ("both", True, False),
        ("data", True, False),  # named by the prefix of its first heartbeat
        ("data", False, True),  # bare heartbeats: named by its answer to the probe
    ],
    ids=["connect", "both", "data-heartbeat", "data-probe"],
)
@pytest_twisted.ensureDeferred
async def test_each_mode_on_the_shared_listener(meter_server, mode: str, prefix_heartbeats: bool,
                                                probe: bool) -> None:
    toml = SHARED.format(mode=mode, probe=f'probe = "hex:{PROBE.hex()}"\nprobe_after = 0.3' if probe else "")
    dtu = {"registration": b"DTU-0001", "registration_mode": mode, "prefix_heartbeats": prefix_heartbeats,
           "junk": not probe}
    await poll_through(dtu, toml, "usr", SHARED_LISTENER, FramerType.RTU, meter_server)
