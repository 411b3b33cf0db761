"""The Modbus TCP server for SCADA, end to end: the real center polls pymodbus meters behind a DTU
that dials in, and mbpoll and pymodbus' client, as SCADA masters, read and write them through the
center's server and find what the meters themselves hold."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from pymodbus.client import ModbusTcpClient
from pymodbus.framer import FramerType
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from tests.modbus.interop_support import STEP_TIMEOUT, FakeDtu, PymodbusServer, meter_toml, read_back, sample_meter
from tests.support import ApiClient, RunningCenter, eventually, make_account, run_process, start_center

#: The meters' unit ids on their bus, and the unit ids SCADA reads them under. Their values are served for
#: 10 s: the dead meter's timeouts hold up the bus they share, so polls come late.
SCADA_UNITS = {"m1": 11, "m2": 12}
DEAD_UNIT, SLOW_UNIT, UNKNOWN_UNIT = 19, 13, 99

#: What SCADA reads, each compared with the same read of the meter itself: every table, several points
#: in one read, a part of a 32-bit point.
READS = [("holding", 0, 4), ("holding", 10, 2), ("holding", 2, 1), ("input", 0, 3), ("coil", 2, 1),
         ("discrete", 1, 1)]


def config() -> str:
    meters = "".join(
        meter_toml(name, "site-a", unit).replace(
            "interval = 0.2\n", f"interval = 0.2\nscada_unit = {scada_unit}\nscada_max_age = 10\n"
        )
        for name, unit, scada_unit in (("m1", 1, SCADA_UNITS["m1"]), ("m2", 2, SCADA_UNITS["m2"]))
    )
    return f"""
[modbus]
listen = "tcp:0:interface=127.0.0.1"
server = "tcp:0:interface=127.0.0.1"
server_allow = ["127.0.0.0/8"]

[[link]]
name = "site-a"
registration = "DTU-0001"
heartbeat = "HB"
timeout = 0.5
retries = 0

[[meter]]
name = "dead"
link = "site-a"
unit = 9
interval = 0.2
scada_unit = {DEAD_UNIT}

[[meter.point]]
name = "setpoint"
table = "holding"
address = 0

# Polled once an hour, and its values served for 2 s only: they go stale between polls.
[[meter]]
name = "slow"
link = "site-a"
unit = 2
interval = 3600
scada_unit = {SLOW_UNIT}
scada_max_age = 2

[[meter.point]]
name = "serial"
table = "input"
address = 0
""" + meters


def read_with(client: ModbusTcpClient, table: str, address: int, count: int, unit: int) -> list[int] | str:
    """The registers or bits read, or ``exception N``."""
    read = {"holding": client.read_holding_registers, "input": client.read_input_registers,
            "coil": client.read_coils, "discrete": client.read_discrete_inputs}[table]
    response = read(address, count=count, device_id=unit)
    if response.isError():
        return f"exception {response.exception_code}"
    if table in ("coil", "discrete"):
        return [int(bit) for bit in response.bits[:count]]
    return list(response.registers)


def in_thread(
    port: int, job: Callable[[ModbusTcpClient], Any], framer: FramerType = FramerType.SOCKET
) -> defer.Deferred:
    """Run ``job`` with a pymodbus client of ``port`` in a thread, so that the reactor serves it meanwhile."""

    def run() -> Any:
        client = ModbusTcpClient("127.0.0.1", port=port, framer=framer, timeout=STEP_TIMEOUT, retries=0)
        try:
            if not client.connect():
                raise ConnectionError(f"pymodbus client cannot reach 127.0.0.1:{port}")
            return job(client)
        finally:
            client.close()

    return deferToThread(run)


def mbpoll(port: int, unit: int, *options: str, cwd: Path, write: tuple[str, ...] = ()) -> defer.Deferred:
    """mbpoll once against the server (reading, or writing ``write``), in a thread; fires with
    its (status, stdout, stderr)."""
    argv = ["mbpoll", "-m", "tcp", "-p", str(port), "-a", str(unit), "-0", "-1", "-o", "5", *options, "127.0.0.1"]
    argv += write

    def run() -> tuple[int, str, str]:
        done = run_process(argv, cwd=cwd)
        return done.returncode, done.stdout, done.stderr

    return deferToThread(run)


def mbpoll_values(stdout: str) -> list[str]:
    """``[0]: 0x08FD`` lines: the values, in order."""
    return [match.group(1) for match in re.finditer(r"^\[\d+\]:\s+(\S+)", stdout, re.MULTILINE)]


async def scada_port(center: RunningCenter) -> int:
    return (await center.service.getServiceNamed("modbus-server").when_listening()).getHost().port  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_scada_masters_read_and_write_meters_through_the_center(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sample_meter(1), sample_meter(2)], framer=FramerType.RTU).start()
    path = tmp_path / "center.toml"
    path.write_text(config())
    center = await start_center(tmp_path, "--config", str(path), db_url=db_url)
    dtu = FakeDtu(silent_units=frozenset({9}))
    try:
        await dtu.start(await center.modbus_port(), bus.port)
        port = await scada_port(center)
        await check_reads_match_the_meters(port, bus)
        await check_mbpoll_reads(port, tmp_path)
        await check_failures(port, tmp_path, center.api())
        await check_writes_reach_the_meter(port, bus, tmp_path)
        await check_many_clients_at_once(port)
        await check_the_api_keeps_scada_units_unique(center.api(), port)
        await check_junk_closes_the_connection(port)
        lingering = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Closed())
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()

    async def closed() -> bool:
        return lingering.closed.called

    await eventually(closed, "a SCADA client still connected closed by the center's stop")


async def check_reads_match_the_meters(port: int, bus: PymodbusServer) -> None:
    for meter, unit in (("m1", 1), ("m2", 2)):
        for table, address, count in READS:
            held = await in_thread(bus.port, lambda c, t=table, a=address, n=count, u=unit: read_with(c, t, a, n, u),
                                   FramerType.RTU)
            assert isinstance(held, list), held

            async def served(
                t: str = table, a: int = address, n: int = count, held: list[int] = held, u: int = SCADA_UNITS[meter]
            ) -> bool:
                got = await in_thread(port, lambda c: read_with(c, t, a, n, u))
                return got == held

            await eventually(served, f"{meter} {table} {address}+{count} through the server as the meter holds it")
    gap = await in_thread(port, lambda c: read_with(c, "holding", 0, 11, SCADA_UNITS["m1"]))
    assert gap == "exception 2", "holding 5..9 are no point's"


async def check_mbpoll_reads(port: int, cwd: Path) -> None:
    status, out, err = await mbpoll(port, SCADA_UNITS["m1"], "-t", "4:hex", "-r", "0", "-c", "4", cwd=cwd)
    assert status == 0, err
    assert [int(v, 16) for v in mbpoll_values(out)] == [2301, 0x0000, 0x3FC0, 0xFFFE]
    # mbpoll's own decoding of the center's encoding: a float32 with its low word first, big-endian ones.
    status, out, err = await mbpoll(port, SCADA_UNITS["m1"], "-t", "4:float", "-r", "1", cwd=cwd)
    assert (status, mbpoll_values(out)) == (0, ["1.5"]), err
    status, out, err = await mbpoll(port, SCADA_UNITS["m2"], "-t", "3:float", "-B", "-r", "1", cwd=cwd)
    assert status == 0 and abs(float(mbpoll_values(out)[0]) - 3.14159) < 1e-5, (out, err)
    status, out, err = await mbpoll(port, SCADA_UNITS["m1"], "-t", "4:int", "-B", "-r", "10", cwd=cwd)
    assert (status, mbpoll_values(out)) == (0, ["65538"]), err
    status, out, err = await mbpoll(port, SCADA_UNITS["m2"], "-t", "3", "-r", "0", cwd=cwd)
    assert (status, mbpoll_values(out)) == (0, ["502"]), err
    status, out, err = await mbpoll(port, SCADA_UNITS["m1"], "-t", "0", "-r", "2", cwd=cwd)
    assert (status, mbpoll_values(out)) == (0, ["1"]), err


async def check_failures(port: int, cwd: Path, api: ApiClient) -> None:
    assert await in_thread(port, lambda c: read_with(c, "holding", 0, 1, DEAD_UNIT)) == "exception 11"
    assert await in_thread(port, lambda c: read_with(c, "holding", 0, 1, UNKNOWN_UNIT)) == "exception 10"
    status, out, err = await mbpoll(port, UNKNOWN_UNIT, "-t", "4", "-r", "0", cwd=cwd)
    assert status != 0 and mbpoll_values(out) == [], out
    assert "gateway path unavailable" in (out + err).lower(), (out, err)

    # A fresh value of the slow meter (read on demand) is served; two seconds on, it is stale.
    async def fresh() -> bool:
        assert (await api.post("/api/meters/slow/read", {})).status == 200
        return await in_thread(port, lambda c: read_with(c, "input", 0, 1, SLOW_UNIT)) == [502]

    await eventually(fresh, "a fresh value of the slow meter served")

    async def stale() -> bool:
        return await in_thread(port, lambda c: read_with(c, "input", 0, 1, SLOW_UNIT)) == "exception 11"

    await eventually(stale, "the slow meter's value, older than its scada_max_age, refused")
    status, out, err = await mbpoll(port, SLOW_UNIT, "-t", "3", "-r", "0", cwd=cwd)
    assert status != 0 and "target device failed to respond" in (out + err).lower(), (out, err)


async def check_writes_reach_the_meter(port: int, bus: PymodbusServer, cwd: Path) -> None:
    unit = SCADA_UNITS["m1"]
    answer = await in_thread(port, lambda c: c.write_register(0, 2317, device_id=unit).isError())
    assert answer is False
    assert await read_back(bus.port, FramerType.RTU, "holding", 0) == [2317]
    answer = await in_thread(port, lambda c: c.write_registers(10, [0xEE6B, 0x2800], device_id=unit).isError())
    assert answer is False
    assert await read_back(bus.port, FramerType.RTU, "holding", 10, 2) == [0xEE6B, 0x2800]
    answer = await in_thread(port, lambda c: c.write_coil(2, False, device_id=unit).isError())
    assert answer is False
    assert await read_back(bus.port, FramerType.RTU, "coil", 2) == [False]
    # mbpoll writes 16-bit registers unsigned: 65529 is the int16 offset's -7.
    status, out, err = await mbpoll(port, unit, "-t", "4", "-r", "3", cwd=cwd, write=(str(0x10000 - 7),))
    assert status == 0, (out, err)
    assert await read_back(bus.port, FramerType.RTU, "holding", 3) == [0x10000 - 7]

    async def polled_back() -> bool:
        return await in_thread(port, lambda c: read_with(c, "holding", 0, 1, unit)) == [2317]

    await eventually(polled_back, "the written value, polled back, served")
    # Refused by the meter, or by the center before anything is sent.
    timed_out = await in_thread(port, lambda c: c.write_register(0, 1, device_id=DEAD_UNIT).exception_code)
    assert timed_out == 0x0B
    half = await in_thread(port, lambda c: c.write_register(1, 1, device_id=unit).exception_code)
    assert half == 2, "half of a float32"


async def check_many_clients_at_once(port: int) -> None:
    def reads(client: ModbusTcpClient) -> set[str]:
        return {repr(read_with(client, "holding", 10, 2, SCADA_UNITS["m2"])) for _ in range(20)}

    results = await defer.gatherResults([in_thread(port, reads) for _ in range(8)])
    assert results == [{"[1, 2]"}] * 8


async def check_the_api_keeps_scada_units_unique(api: ApiClient, port: int) -> None:
    meter = {"name": "m3", "link": "site-a", "unit": 1, "interval": 0.2, "scada_unit": SCADA_UNITS["m1"],
             "point": [{"name": "voltage", "table": "holding", "address": 0, "type": "uint16", "scale": 0.1}]}
    taken = await api.post("/api/meters", meter)
    assert (taken.status, taken.error) == (409, "meter 'm3': scada_unit 11 is already the scada_unit of meter 'm1'")
    assert (await api.get("/api/meters/m3")).status == 404, "the row is taken back"
    made = await api.post("/api/meters", meter | {"scada_unit": 14})
    assert made.status == 201 and made.body["definition"]["scada_unit"] == 14

    async def served() -> bool:
        return await in_thread(port, lambda c: read_with(c, "holding", 0, 1, 14)) == [2317]

    await eventually(served, "a meter made through the API served under its scada_unit")

    # The server has no accounts: an account may not put its meters on it, nor take them off.
    acme = await make_account(api, "acme")
    refused = await acme.post("/api/meters", meter | {"name": "m4", "scada_unit": 15})
    assert refused.status == 403 and "only an admin account may set or change a meter's scada_unit" in refused.error
    moved = await api.call("PUT", "/api/meters/m3/account", {"account": "acme"})
    assert moved.status == 200, moved.body
    # Keeping the admin's scada_unit passes (to be refused for the admin's link, which is not acme's).
    kept = await acme.call("PUT", "/api/meters/m3", meter | {"scada_unit": 14})
    assert (kept.status, kept.error) == (400, "meter 'm3': no link named 'site-a'")
    dropped = await acme.call("PUT", "/api/meters/m3", {k: v for k, v in meter.items() if k != "scada_unit"})
    assert dropped.status == 403


class _Closed(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


async def check_junk_closes_the_connection(port: int) -> None:
    junk = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Closed())
    junk.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await junk.closed
    assert junk.data == b""
