"""Real peers as fixtures: pymodbus servers as meters, socat pty pairs as serial cables."""

from __future__ import annotations

import pytest
from pymodbus.framer import FramerType

from tests.modbus.interop_support import PtyPair, PymodbusServer, sample_meter


@pytest.fixture
def meter_server():
    servers: list[PymodbusServer] = []

    def start(framer: FramerType = FramerType.SOCKET, units=(1,), serial_port: str | None = None) -> PymodbusServer:
        server = PymodbusServer([sample_meter(u) for u in units], framer=framer, serial_port=serial_port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def pty_pair():
    pair = PtyPair()
    yield pair.ends
    pair.close()
