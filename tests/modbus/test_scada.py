"""The Modbus TCP server for SCADA on a fake clock and a StringTransport, bytes fed one at a time."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.errors import LinkOffline, ModbusExceptionResponse, ModbusTimeout
from dtucenter.modbus.points import Point, PointType, Table, WordOrder, decode_registers
from dtucenter.modbus.scada import (
    BadHeader,
    Exception_,
    Frame,
    Read,
    RequestReader,
    Write,
    decode_request,
)
from dtucenter.modbus.scada_server import ScadaFactory

VOLTAGE = Point("voltage", Table.HOLDING, 0, PointType.UINT16, scale=0.1)
ENERGY = Point("energy", Table.HOLDING, 1, PointType.FLOAT32, word_order=WordOrder.LITTLE)
OFFSET = Point("offset", Table.HOLDING, 3, PointType.INT16)
TOTAL = Point("total", Table.HOLDING, 10, PointType.UINT32)
SERIAL = Point("serial", Table.INPUT, 0, PointType.UINT16)
RELAY = Point("relay", Table.COIL, 2, PointType.BOOL)
PUMP = Point("pump", Table.COIL, 3, PointType.BOOL)
DOOR = Point("door", Table.DISCRETE, 1, PointType.BOOL)
ENABLED = Point("enabled", Table.HOLDING, 4, PointType.BOOL)
POINTS = (VOLTAGE, ENERGY, OFFSET, TOTAL, SERIAL, RELAY, PUMP, DOOR, ENABLED)

#: What the meter holds, as pymodbus' sample meter in interop_support does: and what SCADA must read.
HOLDING = {0: 2301, 1: 0x0000, 2: 0x3FC0, 3: 0xFFFE, 4: 1, 10: 0x0001, 11: 0x0002}
VALUES = {"voltage": 230.1, "energy": 1.5, "offset": -2, "total": 65538, "serial": 501, "relay": True,
          "pump": False, "door": True, "enabled": True}


@attrs.define
class FakeMeters:
    """The bridge as the server sees it: meters by scada_unit, their latest values, writes to answer by hand."""

    clock: Clock
    meters: dict[int, MeterSettings] = attrs.Factory(dict)
    latest: dict[str, dict[str, tuple[object, float]]] = attrs.Factory(dict)
    writes: list[tuple[str, str, object, defer.Deferred[None]]] = attrs.Factory(list)

    def add(self, scada_unit: int, name: str = "m1", points: tuple[Point, ...] = POINTS, **extra: object) -> None:
        self.meters[scada_unit] = MeterSettings(
            name=name, link="bus", unit=1, interval=10.0, points=points, scada_unit=scada_unit, **extra)
        self.latest[name] = {point: (value, self.clock.seconds()) for point, value in VALUES.items()}

    def scada_meter(self, unit: int) -> MeterSettings | None:
        return self.meters.get(unit)

    def latest_values(self, meter: str) -> Mapping[str, tuple[object, float]]:
        return self.latest[meter]

    def write(self, meter: str, point: str, value: object) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.writes.append((meter, point, value, d))
        return d


class Client:
    """A SCADA master on a StringTransport, sending byte by byte."""

    def __init__(self, factory: ScadaFactory, host: str = "10.0.0.7") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 50000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.next_id = 1

    def send(self, unit: int, pdu: bytes, transaction_id: int | None = None) -> int:
        if transaction_id is None:
            transaction_id, self.next_id = self.next_id, self.next_id + 1
        for byte in struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu:
            self.protocol.dataReceived(bytes([byte]))
        return transaction_id

    def answers(self) -> list[tuple[int, int, bytes]]:
        """(transaction id, unit, PDU) of every answer so far, taken."""
        data = self.transport.value()
        self.transport.clear()
        found = []
        while data:
            transaction_id, protocol, length, unit = struct.unpack_from(">HHHB", data)
            assert protocol == 0 and len(data) >= 6 + length
            found.append((transaction_id, unit, data[7 : 6 + length]))
            data = data[6 + length :]
        return found

    def ask(self, unit: int, pdu: bytes) -> bytes:
        transaction_id = self.send(unit, pdu)
        [(answered_id, answered_unit, answer)] = self.answers()
        assert (answered_id, answered_unit) == (transaction_id, unit)
        return answer


def read(function: int, address: int, count: int) -> bytes:
    return struct.pack(">BHH", function, address, count)


def registers(answer: bytes) -> list[int]:
    assert answer[0] in (3, 4) and answer[1] == len(answer) - 2, answer.hex()
    return list(struct.unpack(f">{answer[1] // 2}H", answer[2:]))


def exception(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def meters(clock: Clock) -> FakeMeters:
    meters = FakeMeters(clock)
    meters.add(7)
    return meters


@pytest.fixture
def client(meters: FakeMeters, clock: Clock) -> Client:
    return Client(ScadaFactory(meters, clock))


# -- the wire ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("pdu", "expected"), [
    (read(3, 0, 2), Read(Table.HOLDING, 0, 2)),
    (read(4, 9, 125), Read(Table.INPUT, 9, 125)),
    (read(1, 0, 2000), Read(Table.COIL, 0, 2000)),
    (read(2, 65535, 1), Read(Table.DISCRETE, 65535, 1)),
    (bytes.fromhex("05 0002 FF00"), Write(Table.COIL, 2, (1,))),
    (bytes.fromhex("05 0002 0000"), Write(Table.COIL, 2, (0,))),
    (bytes.fromhex("06 0000 08FD"), Write(Table.HOLDING, 0, (2301,))),
    (bytes.fromhex("0F 0002 0003 01 05"), Write(Table.COIL, 2, (1, 0, 1))),
    (bytes.fromhex("10 000A 0002 04 0001 0002"), Write(Table.HOLDING, 10, (1, 2))),
    # Malformed for its function: 0x03.
    (read(3, 0, 0), Exception_.ILLEGAL_DATA_VALUE),
    (read(3, 0, 126), Exception_.ILLEGAL_DATA_VALUE),
    (read(1, 0, 2001), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("03 0000"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("03 0000 0001 00"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("05 0002 1234"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("0F 0002 0003 02 05 00"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("10 000A 0002 04 0001"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("10 000A 0002 02 0001"), Exception_.ILLEGAL_DATA_VALUE),
    (bytes.fromhex("10 000A 007C F8") + bytes(248), Exception_.ILLEGAL_DATA_VALUE),
    # Past the last address: 0x02; functions not served: 0x01.
    (read(3, 65535, 2), Exception_.ILLEGAL_DATA_ADDRESS),
    (bytes.fromhex("10 FFFF 0002 04 0001 0002"), Exception_.ILLEGAL_DATA_ADDRESS),
    (bytes.fromhex("17 0000 0001 0000 0001 02 0000"), Exception_.ILLEGAL_FUNCTION),
    (bytes.fromhex("2B 0E 01 00"), Exception_.ILLEGAL_FUNCTION),
    (b"", Exception_.ILLEGAL_FUNCTION),
])
def test_requests_are_decoded_strictly(pdu: bytes, expected: object) -> None:
    assert decode_request(pdu) == expected


def test_the_reader_keeps_frames_apart_and_stops_at_a_bad_header() -> None:
    reader = RequestReader()
    stream = bytes.fromhex("0001 0000 0006 07 03 0000 0002 0002 0000 0006 08 04 0001 0001")
    frames = []
    for byte in stream:
        reader.feed(bytes([byte]))
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
    assert frames == [Frame(1, 7, read(3, 0, 2)), Frame(2, 8, read(4, 1, 1))]
    assert reader.buffered == 0

    reader.feed(b"GET / HTTP/1.1\r\n")
    bad = reader.next_frame()
    assert isinstance(bad, BadHeader) and "protocol id" in bad.reason
    reader.feed(b"more")
    assert (reader.next_frame(), reader.buffered) == (None, 0), "nothing is kept after a bad header"
    long = RequestReader()
    long.feed(bytes.fromhex("0001 0000 00FF 07"))
    assert long.next_frame() == BadHeader("not a Modbus TCP header (length 255)", bytes.fromhex("0001 0000 00FF 07"))


# -- reads ---------------------------------------------------------------------------------------


def test_a_read_spanning_several_points_answers_what_the_meter_holds(client: Client) -> None:
    assert registers(client.ask(7, read(3, 0, 5))) == [HOLDING[a] for a in range(5)]
    assert registers(client.ask(7, read(3, 10, 2))) == [1, 2]
    assert registers(client.ask(7, read(4, 0, 1))) == [501]


def test_part_of_a_wide_point_reads_its_own_words(client: Client) -> None:
    assert registers(client.ask(7, read(3, 2, 1))) == [0x3FC0]
    assert registers(client.ask(7, read(3, 11, 1))) == [2]


def test_bits_read_as_the_meter_packs_them(client: Client) -> None:
    assert client.ask(7, read(1, 2, 2)) == bytes([1, 1, 0b01])
    assert client.ask(7, read(2, 1, 1)) == bytes([2, 1, 1])


def test_an_address_no_point_covers_is_an_illegal_data_address(client: Client) -> None:
    assert client.ask(7, read(3, 0, 11)) == exception(3, 2), "5..9 are no point's"
    assert client.ask(7, read(3, 100, 1)) == exception(3, 2)
    assert client.ask(7, read(1, 1, 2)) == exception(1, 2)
    assert client.ask(7, read(4, 1, 1)) == exception(4, 2)


def test_an_unknown_unit_is_answered_never_ignored(client: Client) -> None:
    assert client.ask(8, read(3, 0, 1)) == exception(3, 0x0A)
    assert client.ask(8, bytes.fromhex("06 0000 0001")) == exception(6, 0x0A)


def test_malformed_and_unserved_requests_are_answered(client: Client) -> None:
    assert client.ask(7, read(3, 0, 0)) == exception(3, 3)
    assert client.ask(7, bytes.fromhex("2B 0E 01 00")) == exception(0x2B, 1)
    assert client.ask(7, read(3, 0, 1)) == bytes([3, 2, 0x08, 0xFD]), "the connection goes on"


def test_a_value_older_than_its_max_age_or_missing_is_a_gateway_target_failure(
    client: Client, meters: FakeMeters, clock: Clock
) -> None:
    clock.advance(30.0)  # three intervals of 10 s: still served
    assert registers(client.ask(7, read(3, 0, 1))) == [2301]
    clock.advance(0.5)
    assert client.ask(7, read(3, 0, 1)) == exception(3, 0x0B)
    meters.latest["m1"]["voltage"] = (230.1, clock.seconds())
    assert registers(client.ask(7, read(3, 0, 1))) == [2301]
    del meters.latest["m1"]["voltage"]  # its latest read failed
    assert client.ask(7, read(3, 0, 2)) == exception(3, 0x0B)


def test_a_meter_may_set_its_own_max_age(clock: Clock) -> None:
    meters = FakeMeters(clock)
    meters.add(9, name="slow", scada_max_age=100.0)
    client = Client(ScadaFactory(meters, clock))
    clock.advance(99.0)
    assert registers(client.ask(9, read(4, 0, 1))) == [501]
    clock.advance(2.0)
    assert client.ask(9, read(4, 0, 1)) == exception(4, 0x0B)


@given(
    point_type=st.sampled_from([PointType.INT16, PointType.UINT16, PointType.INT32, PointType.UINT32]),
    word_order=st.sampled_from(list(WordOrder)),
    scale=st.sampled_from([1.0, 0.1, 0.01, 10.0, 0.5]),
    words=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_integers_are_served_as_their_registers_whatever_the_scale(
    point_type: PointType, word_order: WordOrder, scale: float, words: list[int]
) -> None:
    check_served(Point("p", Table.HOLDING, 0, point_type, word_order=word_order, scale=scale), words)


@given(
    point_type=st.sampled_from([PointType.FLOAT32, PointType.FLOAT64, PointType.INT64, PointType.UINT64]),
    word_order=st.sampled_from(list(WordOrder)),
    words=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_64_bit_and_float_points_are_served_as_their_registers(
    point_type: PointType, word_order: WordOrder, words: list[int]
) -> None:
    point = Point("p", Table.HOLDING, 0, point_type, word_order=word_order)
    value = decode_registers(point, words[: point_type.registers])
    if isinstance(value, float) and value != value:
        return  # a NaN has many encodings; the value stored is just "NaN"
    check_served(point, words)


def check_served(point: Point, words: list[int]) -> None:
    clock = Clock()
    meters = FakeMeters(clock)
    meters.meters[1] = MeterSettings(name="m", link="bus", unit=1, interval=10.0, points=(point,), scada_unit=1)
    held = words[: point.type.registers]
    meters.latest["m"] = {"p": (decode_registers(point, held), 0.0)}
    client = Client(ScadaFactory(meters, clock))
    assert registers(client.ask(1, read(3, 0, point.type.registers))) == held


# -- writes --------------------------------------------------------------------------------------


def test_a_write_is_forwarded_and_answered_once_the_meter_answered(client: Client, meters: FakeMeters) -> None:
    request = bytes.fromhex("06 0000 0905")  # 2309 -> 230.9 V
    client.send(7, request)
    [(meter, point, value, written)] = meters.writes
    assert (meter, point, value) == ("m1", "voltage", 230.9)
    assert client.answers() == []
    written.callback(None)
    assert client.answers() == [(1, 7, request)]


def test_answers_keep_the_order_of_their_requests(client: Client, meters: FakeMeters) -> None:
    first = client.send(7, bytes.fromhex("05 0002 0000"))
    second = client.send(7, read(3, 0, 1))
    assert client.answers() == [], "the read waits for the write before it"
    meters.writes[0][3].callback(None)
    assert [answer[0] for answer in client.answers()] == [first, second]
    assert meters.writes[0][:3] == ("m1", "relay", False)


def test_a_write_spanning_points_writes_each_in_address_order(client: Client, meters: FakeMeters) -> None:
    # energy (float32, little word order: 1.5 is 0x3FC00000 with its low word first) and offset.
    request = bytes.fromhex("10 0001 0003 06 0000 3FC0 FFFB")
    client.send(7, request)
    meters.writes[0][3].callback(None)
    meters.writes[1][3].callback(None)
    assert [w[:3] for w in meters.writes] == [("m1", "energy", 1.5), ("m1", "offset", -5)]
    assert client.answers() == [(1, 7, request[:5])]
    coils = bytes.fromhex("0F 0002 0002 01 02")  # relay off, pump on
    client.send(7, coils)
    meters.writes[2][3].callback(None)
    meters.writes[3][3].callback(None)
    assert [w[:3] for w in meters.writes[2:]] == [("m1", "relay", False), ("m1", "pump", True)]
    assert client.answers() == [(2, 7, coils[:5])]


@pytest.mark.parametrize(("request_pdu", "code"), [
    (bytes.fromhex("06 0001 0000"), 2),  # half of the float32 energy
    (bytes.fromhex("10 0001 0001 02 0000"), 2),
    (bytes.fromhex("10 0004 0002 04 0000 0000"), 2),  # enabled, then the unmapped 5
    (bytes.fromhex("06 0005 0001"), 2),
    (bytes.fromhex("05 0000 FF00"), 2),
    (bytes.fromhex("06 0004 0002"), 3),  # a bool register takes 0 or 1
])
def test_writes_the_meter_would_not_make_sense_of_are_refused_unsent(
    client: Client, meters: FakeMeters, request_pdu: bytes, code: int
) -> None:
    assert client.ask(7, request_pdu) == exception(request_pdu[0], code)
    assert meters.writes == []


@pytest.mark.parametrize(("error", "code"), [
    (ModbusExceptionResponse(1, 6, 4), 4),  # the meter's own answer, passed on
    (ModbusExceptionResponse(1, 6, 2), 2),
    (ModbusTimeout(1, 6, 2), 0x0B),
    (LinkOffline("bus"), 0x0B),
])
def test_a_failed_write_answers_an_exception(client: Client, meters: FakeMeters, error: Exception, code: int) -> None:
    client.send(7, bytes.fromhex("06 0000 0905"))
    meters.writes[0][3].errback(error)
    assert client.answers() == [(1, 7, exception(6, code))]


# -- bounds ----------------------------------------------------------------------------------------


def test_a_client_with_too_many_requests_in_flight_is_read_no_further(meters: FakeMeters, clock: Clock) -> None:
    client = Client(ScadaFactory(meters, clock, max_pending=2))
    client.send(7, bytes.fromhex("06 0000 0001"))
    client.send(7, bytes.fromhex("06 0000 0002"))
    assert client.transport.producerState == "paused"
    client.send(7, read(3, 0, 1))  # arrives although the transport was asked to pause
    assert len(meters.writes) == 2 and client.answers() == []
    meters.writes[0][3].callback(None)
    assert [answer[0] for answer in client.answers()] == [1]
    assert client.transport.producerState == "paused", "the waiting read took the place that came free"
    meters.writes[1][3].callback(None)
    assert [answer[0] for answer in client.answers()] == [2, 3], "the waiting read answered after the writes"
    assert client.transport.producerState == "producing"


def test_a_client_that_reads_no_answers_is_read_no_further(client: Client) -> None:
    client.protocol.pauseProducing()  # what the transport does when its buffer fills
    client.send(7, read(3, 0, 1))
    assert client.answers() == [] and client.transport.producerState == "paused"
    client.protocol.resumeProducing()
    assert [answer[0] for answer in client.answers()] == [1]
    assert client.transport.producerState == "producing"


def test_a_stream_that_is_not_modbus_tcp_closes_the_connection(client: Client) -> None:
    client.protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01")  # a TLS hello
    client.protocol.dataReceived(b"\x00\x01\xfc\x03")
    assert client.transport.disconnecting
    assert client.answers() == []


def test_clients_outside_the_allow_list_or_past_the_limit_are_closed(meters: FakeMeters, clock: Clock) -> None:
    factory = ScadaFactory(meters, clock, allow=["192.168.0.0/16", "10.0.0.7/32"], max_clients=2)
    outsider = Client(factory, "10.0.0.8")
    assert outsider.transport.disconnecting
    first, second = Client(factory, "10.0.0.7"), Client(factory, "192.168.3.4")
    assert not first.transport.disconnecting and not second.transport.disconnecting
    third = Client(factory, "192.168.3.5")
    assert third.transport.disconnecting
    first.protocol.connectionLost()
    assert not Client(factory, "192.168.3.5").transport.disconnecting, "a place came free"
    assert registers(second.ask(7, read(3, 0, 1))) == [2301]


def test_the_unsent_answer_of_a_client_gone_is_dropped(client: Client, meters: FakeMeters) -> None:
    client.send(7, bytes.fromhex("06 0000 0001"))
    client.protocol.connectionLost()
    meters.writes[0][3].callback(None)
    assert client.transport.value() == b""



@pytest.fixture
def summaries() -> Iterator[list[str]]:
    """The SCADA server's log lines about its clients."""
    texts: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "dtucenter.modbus.scada_server":
            texts.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield texts
    globalLogPublisher.removeObserver(observe)


def test_exceptions_answered_are_summarised_in_the_log_at_most_once_a_minute(
    client: Client, clock: Clock, summaries: list[str]
) -> None:
    summaries.clear()
    client.ask(7, read(3, 100, 1))
    assert summaries == [(
        "SCADA client 10.0.0.7:50000: exceptions answered in 0 s: illegal data address 1;"
        " e.g. unit 7, function 3: holding 100: no point"
    )]
    client.ask(7, read(3, 100, 1))
    client.ask(8, read(3, 0, 1))
    clock.advance(59)
    client.ask(7, read(3, 0, 1))  # read 59 s ago: stale
    assert len(summaries) == 1, "one line a minute, however many exceptions"
    clock.advance(1)
    client.ask(7, bytes.fromhex("41 00"))
    assert summaries[1] == (
        "SCADA client 10.0.0.7:50000: exceptions answered in 60 s: gateway path unavailable 1, gateway target"
        " device failed to respond 1, illegal data address 1, illegal function 1; e.g. unit 7, function 3:"
        " holding 100: no point"
    )
    client.ask(7, read(3, 5, 1))
    client.protocol.connectionLost()
    assert "illegal data address 1" in summaries[-2] and "disconnected after 6 answers" in summaries[-1]


def test_a_redefined_meter_is_read_by_its_new_addresses(client: Client, meters: FakeMeters) -> None:
    assert registers(client.ask(7, read(3, 0, 1))) == [2301]
    moved = attrs.evolve(VOLTAGE, address=20)
    meters.meters[7] = attrs.evolve(meters.meters[7], points=(moved, *POINTS[1:]))
    assert client.ask(7, read(3, 0, 1)) == exception(3, 2)
    assert registers(client.ask(7, read(3, 20, 1))) == [2301]
