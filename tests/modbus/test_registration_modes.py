"""USR registration modes: ``connect`` (once), ``data`` (in front of every packet only), ``both``.

Each mode on a dedicated port and on the shared listener, with bytes fed one at a time and
in any chunking; a prefix whose bytes look like the awaited response is still stripped.
"""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dtucenter.config import ConfigError, read_settings
from dtucenter.modbus.config import LinkSettings
from dtucenter.modbus.filter import (
    BoundaryNoise,
    LoginMatched,
    LoginPending,
    LoginRejected,
    RegistrationReader,
    Response,
    ResponseReader,
    Stripped,
)
from dtucenter.modbus.framing import Expectation, MbapFraming, RtuFraming
from dtucenter.modbus.links import Link, LoginFactory, MasterFactory, Probe, link_factory
from tests.modbus.modbus_helpers import byte_by_byte, holding_response, mbap, read_holding, result_of, rtu

HEARTBEAT = b"HB"
READ_HOLDING = 3
#: Registrations that are themselves a whole, valid answer to the request in flight
#: (unit 1, function 3, transaction 1): the worst case for telling a prefix from a response.
RTU_LOOKALIKE = rtu(holding_response(1, [0xBEEF]))
MBAP_LOOKALIKE = mbap(holding_response(1, [0xBEEF]), 1)
PREFIX_MODES = ("data", "both")


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into pieces at any set of places."""
    cuts = st.lists(st.integers(1, max(1, len(data) - 1)), max_size=len(data)).map(sorted)
    return cuts.map(lambda at: [data[i:j] for i, j in zip([0, *at], [*at, len(data)], strict=True) if i < j])


def reader_for(mode: str, registration: bytes, protocol: str = "rtu") -> ResponseReader:
    settings = LinkSettings(
        name="usr", registration=registration, registration_mode=mode,
        registration_prefix=mode != "connect", heartbeat=HEARTBEAT, listen="tcp:0",
    )
    noise = BoundaryNoise.for_link(settings.registration, settings.registration_prefix, settings.heartbeat)
    return ResponseReader(RtuFraming() if protocol == "rtu" else MbapFraming(), noise)


def feed(reader: ResponseReader, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


def summary(events: list[object]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Response):
            out.append(list(event.pdu.registers))
        elif isinstance(event, Stripped):
            out.append(event.noise.kind)
        else:
            out.append(event)
    return out


def usr_stream(mode: str, registration: bytes, answer: bytes) -> tuple[bytes, list[object]]:
    """What a USR DTU sends around one answer in ``mode``, and what the reader must make of it:
    a heartbeat before, the answer (prefixed in data/both), a heartbeat after (prefixed too)."""
    prefix = registration if mode in PREFIX_MODES else b""
    stripped_prefix: list[object] = ["registration"] if prefix else []
    stream = HEARTBEAT + prefix + answer + prefix + HEARTBEAT
    expected = ["heartbeat", *stripped_prefix, [7], *stripped_prefix, "heartbeat"]
    return stream, expected


@pytest.mark.parametrize("mode", PREFIX_MODES)
@pytest.mark.parametrize(
    ("protocol", "registration", "answer"),
    [
        ("rtu", RTU_LOOKALIKE, rtu(holding_response(1, [7]))),
        ("rtu", b"DTU-0001", rtu(holding_response(1, [7]))),
        ("tcp", MBAP_LOOKALIKE, mbap(holding_response(1, [7]), 1)),
    ],
)
def test_a_prefix_that_looks_like_the_response_is_stripped_fed_byte_by_byte(
    mode: str, protocol: str, registration: bytes, answer: bytes
) -> None:
    reader = reader_for(mode, registration, protocol)
    reader.expected = Expectation(1, READ_HOLDING, 1)
    stream, expected = usr_stream(mode, registration, answer)
    assert summary(feed(reader, byte_by_byte(stream))) == expected
    assert reader.buffered == 0


# Not parametrized: pytest-twisted wraps a @given test once, so a second parameter set breaks it.
@given(data=st.data())
def test_every_mode_in_any_chunking(data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(("connect", *PREFIX_MODES)))
    registration = data.draw(st.sampled_from([RTU_LOOKALIKE, b"DTU-0001", b"\x01"]))
    reader = reader_for(mode, registration)
    reader.expected = Expectation(1, READ_HOLDING, 1)
    stream, expected = usr_stream(mode, registration, rtu(holding_response(1, [7])))
    assert summary(feed(reader, data.draw(chunkings(stream)))) == expected


def test_the_body_behind_a_prefix_gets_the_ordinary_rules() -> None:
    """An answer whose own bytes begin like the registration is not cut once its prefix is gone."""
    answer = rtu(holding_response(1, [7]))
    reader = reader_for("data", answer[:3])
    reader.expected = Expectation(1, READ_HOLDING, 1)
    assert summary(feed(reader, byte_by_byte(answer[:3] + answer))) == ["registration", [7]]


def test_a_lone_heartbeat_in_data_mode_is_stripped_with_or_without_its_prefix() -> None:
    reader = reader_for("data", RTU_LOOKALIKE)
    assert summary(feed(reader, byte_by_byte(HEARTBEAT + RTU_LOOKALIKE + HEARTBEAT))) == [
        "heartbeat", "registration", "heartbeat",
    ]


# -- the registration reader: heartbeats before a data-mode DTU's first prefixed packet ---------


def test_login_skips_whole_heartbeats_before_the_registration() -> None:
    reader = RegistrationReader([b"DTU-A", b"DTU-B"], [HEARTBEAT])
    results = [reader.feed(byte) for byte in byte_by_byte(b"HBHBDTU-")]
    assert all(isinstance(r, LoginPending) for r in results)
    assert reader.feed(b"Bxy") == LoginMatched(b"DTU-B", b"xy", (HEARTBEAT, HEARTBEAT))


def test_login_rejects_what_follows_a_heartbeat_when_it_is_no_registration() -> None:
    reader = RegistrationReader([b"DTU-A"], [HEARTBEAT])
    assert reader.feed(b"HBXX") == LoginRejected(b"XX")


# -- the link layer -----------------------------------------------------------


def peer() -> IPv4Address:
    return IPv4Address("TCP", "10.1.2.3", 40000)


def usr_link(mode: str, registration: bytes = RTU_LOOKALIKE, **kw: object) -> LinkSettings:
    return LinkSettings(
        name=f"usr-{mode}", registration=registration, registration_mode=mode,
        registration_prefix=mode != "connect", heartbeat=HEARTBEAT, timeout=3.0, retries=0, **kw,
    )


def test_a_data_mode_link_on_its_own_port_is_online_before_it_says_anything() -> None:
    clock = Clock()
    link = Link(usr_link("data", listen="tcp:0"), clock)
    factory = link_factory(link, clock, 30.0)
    assert isinstance(factory, MasterFactory)
    protocol = factory.buildProtocol(peer())
    transport = StringTransport(peerAddress=peer())
    protocol.makeConnection(transport)
    assert link.online
    d = link.request(read_holding(1, 0, 1))
    assert transport.value() == rtu(read_holding(1, 0, 1))
    for byte in byte_by_byte(RTU_LOOKALIKE + rtu(holding_response(1, [7])) + RTU_LOOKALIKE + HEARTBEAT):
        protocol.dataReceived(byte)
    assert result_of(d).registers == [7]
    assert link.status().counters["heartbeats"] == 3
    assert link.status().counters["discarded_bytes"] == 0
    transport.loseConnection()
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("mode", ["connect", "both"])
def test_a_link_that_registers_on_connect_is_checked_on_its_own_port(mode: str) -> None:
    clock = Clock()
    link = Link(usr_link(mode, b"DTU-0001", listen="tcp:0"), clock)
    assert isinstance(link_factory(link, clock, 30.0), LoginFactory)


class SharedListener:
    def __init__(self, *settings: LinkSettings, probe: Probe | None = None, login_timeout: float = 30.0) -> None:
        self.clock = Clock()
        self.links = {s.name: Link(s, self.clock) for s in settings}
        by_registration = {link.settings.registration: link for link in self.links.values()}
        self.factory = LoginFactory(by_registration, self.clock, login_timeout, probe=probe)

    def connect(self):
        protocol = self.factory.buildProtocol(peer())
        transport = StringTransport(peerAddress=peer())
        protocol.makeConnection(transport)
        return protocol, transport


@pytest.mark.parametrize("mode", ["connect", *PREFIX_MODES])
def test_each_mode_is_identified_on_the_shared_listener_by_its_first_prefixed_packet(mode: str) -> None:
    """connect/both open with the registration; data sends it first in front of its heartbeat."""
    other = LinkSettings(name="other", registration=b"DTU-B", heartbeat=HEARTBEAT)
    listener = SharedListener(usr_link(mode, b"DTU-A"), other)
    link = listener.links[f"usr-{mode}"]
    protocol, transport = listener.connect()
    first = b"DTU-A" + HEARTBEAT if mode == "data" else b"DTU-A"
    for byte in byte_by_byte(HEARTBEAT + first):
        protocol.dataReceived(byte)
    assert link.online
    assert link.status().counters["heartbeats"] == (2 if mode == "data" else 1)
    d = link.request(read_holding(1, 0, 1))
    assert transport.value() == rtu(read_holding(1, 0, 1))
    answer = rtu(holding_response(1, [7]))
    protocol.dataReceived((b"DTU-A" if mode != "connect" else b"") + answer)
    assert result_of(d).registers == [7]
    assert listener.clock.getDelayedCalls() == []


def test_the_probe_makes_a_silent_data_mode_dtu_name_itself() -> None:
    probe = Probe(rtu(read_holding(1, 0, 1)), after=5.0)
    listener = SharedListener(usr_link("data", b"DTU-A"), probe=probe)
    link = listener.links["usr-data"]
    protocol, transport = listener.connect()
    listener.clock.advance(4.9)
    assert transport.value() == b""
    listener.clock.advance(0.1)
    assert transport.value() == probe.request
    for byte in byte_by_byte(b"DTU-A" + rtu(holding_response(1, [1]))):
        protocol.dataReceived(byte)
    assert link.online
    assert listener.clock.getDelayedCalls() == []
    transport.clear()
    d = link.request(read_holding(1, 0, 1))
    protocol.dataReceived(b"DTU-A" + rtu(holding_response(1, [7])))
    assert result_of(d).registers == [7]


def test_no_probe_for_a_connection_that_registered() -> None:
    listener = SharedListener(usr_link("both", b"DTU-A"), probe=Probe(b"\x01", after=5.0))
    protocol, transport = listener.connect()
    protocol.dataReceived(b"DTU-A")
    listener.clock.advance(60)
    assert transport.value() == b""


# -- the configuration --------------------------------------------------------


def link_of(body: str) -> LinkSettings:
    text = '[modbus]\nlisten = "tcp:0"\n[[link]]\nname = "a"\n' + body
    (link,) = read_settings(tomllib.loads(text), source="center.toml").modbus.links
    return link


@pytest.mark.parametrize(
    ("body", "mode", "prefix"),
    [
        ('registration = "R"\n', "connect", False),
        ('registration = "R"\nregistration_mode = "data"\n', "data", True),
        ('registration = "R"\nregistration_mode = "both"\n', "both", True),
        ('registration = "R"\nregistration_prefix = true\n', "both", True),
        ('registration = "R"\nregistration_prefix = true\nregistration_mode = "both"\n', "both", True),
        ('registration = "R"\nregistration_mode = "data"\nlisten = "tcp:1"\n', "data", True),
    ],
)
def test_registration_mode_in_the_file(body: str, mode: str, prefix: bool) -> None:
    link = link_of(body)
    assert (link.registration_mode, link.registration_prefix) == (mode, prefix)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('registration = "R"\nregistration_mode = "sometimes"\n', "must be one of connect, data, both"),
        ('registration = "R"\nregistration_prefix = true\nregistration_mode = "data"\n',
         'true means registration_mode = "both"'),
        ('listen = "tcp:1"\nregistration_mode = "data"\n', "registration_mode: needs registration"),
    ],
)
def test_registration_mode_mistakes(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        link_of(body)


@pytest.mark.parametrize(("timing", "message"), [
    ("probe_after = 30\n", "modbus: probe_after: is 30 s: the probe must go out before the registration timeout"),
    ("login_timeout = 4\n", "modbus: probe_after: is 5 s: the probe must go out before the registration timeout"),
])
def test_a_probe_after_the_registration_timeout_is_refused(timing: str, message: str) -> None:
    text = '[modbus]\nlisten = "tcp:0"\nprobe = "hex:01"\n' + timing
    with pytest.raises(ConfigError, match=message):
        read_settings(tomllib.loads(text), source="center.toml")


def test_the_probe_in_the_file() -> None:
    text = '[modbus]\nlisten = "tcp:0"\nprobe = "hex:01 03 00 00 00 01 84 0A"\nprobe_after = 2\n'
    modbus = read_settings(tomllib.loads(text), source="center.toml").modbus
    assert (modbus.probe, modbus.probe_after) == (bytes.fromhex("010300000001840A"), 2.0)
