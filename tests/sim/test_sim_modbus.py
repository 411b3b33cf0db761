"""Transparent DTUs with simulated meters: registration, heartbeats, answers framed by pymodbus."""

from __future__ import annotations

import random

import pytest
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    WriteSingleRegisterRequest,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dtucenter.sim.links import _StreamProtocol
from dtucenter.sim.modbus import (
    TransparentDTU,
    build_request,
    decode_response,
    meters_for,
    numbered_registration,
    parse_packet_text,
    parse_units,
)
from dtucenter.sim.stats import SimStats


def make(protocol: str) -> tuple[TransparentDTU, StringTransport, _StreamProtocol, Clock]:
    clock = Clock()
    clock.advance(1000)
    dtu = TransparentDTU(b"DTU-0007", protocol, meters_for([1, 2], clock, random.Random(5)), clock, SimStats(),
                         heartbeat=b"HB", heartbeat_interval=30)
    transport = StringTransport()
    proto = _StreamProtocol(dtu)
    proto.makeConnection(transport)
    return dtu, transport, proto, clock


def feed_bytewise(proto: _StreamProtocol, data: bytes) -> None:
    for byte in data:
        proto.dataReceived(bytes([byte]))


@pytest.mark.parametrize("protocol", ["rtu", "tcp"])
def test_registration_then_answers_then_heartbeats(protocol: str) -> None:
    _dtu, transport, proto, clock = make(protocol)
    assert transport.value() == b"DTU-0007"
    transport.clear()
    request = build_request(protocol, ReadHoldingRegistersRequest(address=0, count=10, dev_id=2, transaction_id=9))
    feed_bytewise(proto, b"\x00" + request if protocol == "rtu" else request)  # a stray byte first on the bus
    response = decode_response(protocol, transport.value())
    assert response is not None and len(response.registers) == 10
    assert response.dev_id == 2
    if protocol == "tcp":
        assert response.transaction_id == 9
    transport.clear()
    clock.advance(30)
    assert transport.value() == b"HB"
    proto.connectionLost()
    assert clock.getDelayedCalls() == []


def test_glued_requests_get_one_answer_each() -> None:
    dtu, transport, proto, _ = make("rtu")
    transport.clear()
    write = build_request("rtu", WriteSingleRegisterRequest(address=4, registers=[777], dev_id=1))
    read = build_request("rtu", ReadHoldingRegistersRequest(address=4, count=1, dev_id=1))
    proto.dataReceived(write + read)
    assert dtu.stats.counts["polls"] == 2
    answer = ReadHoldingRegistersResponse(registers=[777], dev_id=1)
    assert transport.value().endswith(build_request("rtu", answer))
    proto.connectionLost()


def test_unknown_unit_stays_silent_and_bad_address_is_an_exception() -> None:
    dtu, transport, proto, _ = make("rtu")
    transport.clear()
    proto.dataReceived(build_request("rtu", ReadHoldingRegistersRequest(address=0, count=1, dev_id=9)))
    assert transport.value() == b""
    assert dtu.stats.counts["unknown_unit"] == 1
    proto.dataReceived(build_request("rtu", ReadHoldingRegistersRequest(address=9999, count=2, dev_id=1)))
    response = decode_response("rtu", transport.value())
    assert isinstance(response, ExceptionResponse) and response.exception_code == 2
    proto.connectionLost()


def test_registers_change_over_time() -> None:
    dtu, _transport, proto, clock = make("rtu")
    meter = dtu.meters[1]
    before = [meter.register(a) for a in range(10)]
    clock.advance(7)
    assert [meter.register(a) for a in range(10)] != before
    proto.connectionLost()


def test_registration_text_numbering_and_parsing() -> None:
    assert numbered_registration("DTU-{n:04d}", 7) == "DTU-0007"
    assert numbered_registration("SITE", 12) == "SITE12"
    assert parse_packet_text("hex:0A0b ff") == b"\x0a\x0b\xff"
    assert parse_packet_text("héllo") == "héllo".encode()
    with pytest.raises(ValueError, match="hex"):
        parse_packet_text("hex:zz")
    assert parse_units("1-3,7,2") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match=r"1\.\.247"):
        parse_units("0")


@pytest.mark.parametrize(
    ("mode", "bare", "on_connect", "answer_prefix", "heartbeat"),
    [
        ("connect", False, b"DTU-0007", b"", b"HB"),
        ("both", False, b"DTU-0007", b"DTU-0007", b"DTU-0007HB"),
        ("data", False, b"", b"DTU-0007", b"DTU-0007HB"),
        ("data", True, b"", b"DTU-0007", b"HB"),
    ],
)
def test_each_registration_mode(mode: str, bare: bool, on_connect: bytes, answer_prefix: bytes,
                                heartbeat: bytes) -> None:
    clock = Clock()
    dtu = TransparentDTU(b"DTU-0007", "rtu", meters_for([1], clock, random.Random(5)), clock, SimStats(),
                         heartbeat=b"HB", heartbeat_interval=30, registration_mode=mode, bare_heartbeats=bare)
    transport = StringTransport()
    proto = _StreamProtocol(dtu)
    proto.makeConnection(transport)
    assert transport.value() == on_connect
    transport.clear()
    feed_bytewise(proto, build_request("rtu", ReadHoldingRegistersRequest(address=0, count=2, dev_id=1)))
    sent = transport.value()
    assert sent.startswith(answer_prefix)
    response = decode_response("rtu", sent[len(answer_prefix):])
    assert response is not None and len(response.registers) == 2
    transport.clear()
    clock.advance(30)
    assert transport.value() == heartbeat


def test_an_unknown_registration_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="registration mode must be one of connect, data, both"):
        TransparentDTU(b"R", "rtu", [], Clock(), SimStats(), registration_mode="sometimes")
