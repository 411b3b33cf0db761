"""The MQTT packets of the worker (``dtucenter.mqtt.packets``) and its connection (``worker.Link``).

End to end against Mosquitto: tests/test_mqtt_e2e.py. Here: the bytes, against
the examples of the MQTT 3.1.1 and 5 specifications, and the broker's answers
fed a byte at a time.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from dtucenter.mqtt import packets
from dtucenter.mqtt.messages import Row
from dtucenter.mqtt.packets import ConnAck, Disconnected, PacketReader, PingResp, ProtocolError, PubAck
from dtucenter.mqtt.worker import Link, Lost, NamedRun, take_up_to


def feed_bytewise(reader: PacketReader, data: bytes) -> list[packets.Packet]:
    out: list[packets.Packet] = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    return out


def test_remaining_length_is_mqtts_variable_byte_integer() -> None:
    # The boundaries of MQTT 3.1.1 table 2.4.
    assert packets.remaining_length(0) == b"\x00"
    assert packets.remaining_length(127) == b"\x7f"
    assert packets.remaining_length(128) == b"\x80\x01"
    assert packets.remaining_length(16_383) == b"\xff\x7f"
    assert packets.remaining_length(16_384) == b"\x80\x80\x01"
    assert packets.remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


def test_connect_3_1_1_with_will_user_and_password() -> None:
    data = packets.connect(4, "dtucenter", 30, ("c/status", b"{}", 1, True), "u", "p")
    body = (b"\x00\x04MQTT\x04" + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02]) + b"\x00\x1e"
            + b"\x00\x09dtucenter" + b"\x00\x08c/status" + b"\x00\x02{}" + b"\x00\x01u" + b"\x00\x01p")
    assert data == b"\x10" + bytes([len(body)]) + body


def test_connect_5_has_empty_properties_and_a_user_without_password() -> None:
    data = packets.connect(5, "c", 60, ("w", b"x", 0, False), "u", None)
    body = (b"\x00\x04MQTT\x05" + bytes([0x80 | 0x04 | 0x02]) + b"\x00\x3c" + b"\x00"
            + b"\x00\x01c" + b"\x00" + b"\x00\x01w" + b"\x00\x01x" + b"\x00\x01u")
    assert data == b"\x10" + bytes([len(body)]) + body


def decode_publishes(data: bytes, v5: bool) -> list[tuple[str, bytes, int, bool, int]]:
    """A plain decoder written from the specification, to read back what ``publishes`` wrote."""
    out = []
    at = 0
    while at < len(data):
        header = data[at]
        assert header & 0xF0 == 0x30
        length, shift, at = 0, 0, at + 1
        while True:
            byte = data[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        end = at + length
        (size,) = struct.unpack_from(">H", data, at)
        topic = data[at + 2:at + 2 + size].decode()
        at += 2 + size
        qos = header >> 1 & 3
        mid = 0
        if qos:
            (mid,) = struct.unpack_from(">H", data, at)
            at += 2
        if v5:
            assert data[at] == 0  # no properties
            at += 1
        out.append((topic, data[at:end], qos, bool(header & 1), mid))
        at = end
    assert at == len(data)
    return out


@pytest.mark.parametrize("v5", [False, True])
def test_publishes_encode_every_size_of_length(v5: bool) -> None:
    rows = [
        ("a/b", b"1", 0, False, 0),
        ("dtucenter/acme/17/0", b'{"time":"t","value":5}', 1, True, 1),
        ("t", b"x" * 200, 1, False, 2),  # a two-byte remaining length
        ("long/" + "\u00e9" * 10, b"y" * 20_000, 0, True, 0),  # three bytes, and a topic that is not ASCII
    ]
    assert decode_publishes(packets.publishes(rows, v5), v5) == rows
    for topic, payload, qos, _, _ in rows:
        whole = packets.publishes([(topic, payload, qos, False, 1)], v5)
        assert packets.publish_size(topic, payload, qos, v5) == len(whole)


def test_the_brokers_answers_fed_a_byte_at_a_time_3_1_1() -> None:
    stream = b"\x20\x02\x00\x00" + b"\x40\x02\x00\x01" + b"\x40\x02\x01\x00" + b"\xd0\x00"
    assert feed_bytewise(PacketReader(v5=False), stream) == [ConnAck(0), PubAck(1, 0), PubAck(256, 0), PingResp()]


def test_mqtt_5_connack_properties_and_puback_reasons() -> None:
    properties = (b"\x21\x00\x0a" + b"\x24\x00" + b"\x25\x00" + b"\x27\x00\x00\x10\x00" + b"\x13\x00\x3c"
                  + b"\x26\x00\x01k\x00\x01v" + b"\x1f\x00\x02ok" + b"\x12\x00\x03abc")
    connack = b"\x20" + bytes([2 + 1 + len(properties)]) + b"\x00\x00" + bytes([len(properties)]) + properties
    puback_refused = b"\x40\x04\x00\x07\x87\x00"  # not authorized, empty properties
    puback_no_subscribers = b"\x40\x03\x00\x08\x10"
    assert feed_bytewise(PacketReader(v5=True), connack + puback_refused + puback_no_subscribers) == [
        ConnAck(0, receive_maximum=10, maximum_qos=0, retain_available=False, maximum_packet_size=4096,
                server_keepalive=60, reason="ok"),
        PubAck(7, 0x87),
        PubAck(8, 0x10),
    ]


def test_a_refusing_connack_and_the_brokers_disconnect() -> None:
    reason = b"\x1f\x00\x04busy"
    disconnect = b"\xe0" + bytes([2 + len(reason)]) + b"\x89" + bytes([len(reason)]) + reason
    assert feed_bytewise(PacketReader(v5=True), b"\x20\x03\x00\x86\x00" + disconnect) == [
        ConnAck(0x86), Disconnected(0x89, "busy")
    ]


@pytest.mark.parametrize(("stream", "why"), [
    (b"\x30\x02\x00\x00", "unexpected packet 0x30"),  # a PUBLISH: this client subscribes to nothing
    (b"\x20\x01\x00", "malformed packet 0x20"),
    (b"\x20\x04\x00\x00\x01\x7e", "unknown property 0x7e"),
    (b"\x20\x05\x00\x00\x02\x21\x00", "cut short"),
    (b"\x40\xff\xff\xff\xff\x01", "more than 4 bytes"),
    (b"\x40" + packets.remaining_length(packets.MAX_INCOMING + 1), "at most"),
])
def test_what_a_publishing_client_cannot_take_is_one_error_then_nothing(stream: bytes, why: str) -> None:
    reader = PacketReader(v5=True)
    found = feed_bytewise(reader, stream)
    assert len(found) == 1 and isinstance(found[0], ProtocolError) and why in found[0].why, found
    assert reader.feed(b"\xd0\x00") == []  # out of step from there: the connection is to be dropped


# -- the worker's connection, over a socket pair standing in for the broker --------------------------

@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    client, broker = socket.socketpair()
    client.setblocking(False)
    broker.settimeout(5)
    yield client, broker
    client.close()
    broker.close()


def read_publishes(link: Link, broker: socket.socket, count: int, v5: bool) -> list[tuple[str, bytes, int, bool, int]]:
    """Lets ``link`` write, and reads what the broker got until ``count`` packets are whole."""
    data = b""
    while True:
        link.pump(0)
        data += broker.recv(65536)
        try:
            found = decode_publishes(data, v5)
        except (IndexError, struct.error, AssertionError):
            continue  # a packet cut in two
        if len(found) >= count:
            return found


def link_for(client: socket.socket, accepted: ConnAck, keepalive: int = 30, v5: bool = True) -> Link:
    return Link(client, PacketReader(v5), accepted, 5 if v5 else 4, keepalive)


def pump_until(link: Link, done: Callable[[], bool], rounds: int = 1000) -> None:
    for _ in range(rounds):
        if done():
            return
        link.pump(0.01)
    raise AssertionError("no progress")


def test_the_window_holds_and_acks_settle_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0, receive_maximum=2), v5=False)
    assert link.window == 2
    link.publish([(10, "a", b"1", 1, True), (11, "b", b"2", 0, False), (12, "c", b"3", 1, False)])
    written = read_publishes(link, broker, 3, v5=False)
    assert [(topic, qos, mid) for topic, _, qos, _, mid in written] == [("a", 1, 1), ("b", 0, 0), ("c", 1, 2)]
    assert link.delivered_through() is None  # written, not acknowledged
    broker.sendall(b"\x40\x02\x00\x02")  # the later one first: nothing is delivered past the unacknowledged
    pump_until(link, lambda: link.awaiting_ack == 1)
    assert link.delivered_through() is None
    broker.sendall(b"\x40\x02\x00\x01")
    pump_until(link, link.settled)
    assert link.delivered_through() == 12 and link.outstanding == 0


@pytest.mark.parametrize("v5", [False, True])
def test_runs_are_split_at_the_window_and_settled_by_in_order_acks_read_in_any_chunks(
        pair: tuple[socket.socket, socket.socket], v5: bool) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0, receive_maximum=2), v5=v5)
    long = "t/\u00e9" * 40  # a remaining length of two bytes
    names = (packets.encoded_name("t/0"), packets.encoded_name("t/1"), packets.encoded_name(long))
    pending: deque[Row | NamedRun] = deque([(7, names, b'{"v":', (1, -20, 300), 1, True), (10, "s", b"up", 1, True)])
    link.publish(take_up_to(pending, link.window - link.outstanding))
    assert list(pending) == [(9, names[2:], b'{"v":', (300,), 1, True), (10, "s", b"up", 1, True)]  # split
    assert read_publishes(link, broker, 2, v5) == [("t/0", b'{"v":1}', 1, True, 1), ("t/1", b'{"v":-20}', 1, True, 2)]
    assert take_up_to(pending, link.window - link.outstanding) == []  # the window is full
    acks = packets.pubacks(1, 2)
    assert acks == b"\x40\x02\x00\x01\x40\x02\x00\x02"
    broker.sendall(acks[:6])  # one whole, one cut short
    pump_until(link, lambda: link.awaiting_ack == 1)
    assert link.delivered_through() == 7 and link.delivered_through() is None  # told once
    broker.sendall(acks[6:])
    pump_until(link, link.settled)
    assert link.delivered_through() == 8
    link.publish(take_up_to(pending, link.window - link.outstanding))
    assert not pending
    assert read_publishes(link, broker, 2, v5) == [(long, b'{"v":300}', 1, True, 3), ("s", b"up", 1, True, 4)]
    broker.sendall(packets.pubacks(3, 2))
    pump_until(link, link.settled)
    assert link.delivered_through() == 10


def test_packet_identifiers_wrap_and_the_expected_acks_with_them() -> None:
    assert packets.next_mid(65535) == 1 and packets.next_mid(65534, 3) == 2
    assert packets.pubacks(65535, 2) == b"\x40\x02\xff\xff\x40\x02\x00\x01"
    names = (packets.encoded_name("a"),) * 3
    runs = [(0, names, b"", (1, 2, 3), 1, False), (3, names[:1], b"", (4,), 0, True),
            (4, names[:2], b"", (5, 6), 1, True)]
    data = packets.value_publishes(runs, b"}", 65534, False)
    assert decode_publishes(data, False) == [("a", b"1}", 1, False, 65534), ("a", b"2}", 1, False, 65535),
                                             ("a", b"3}", 1, False, 1), ("a", b"4}", 0, True, 0),
                                             ("a", b"5}", 1, True, 2), ("a", b"6}", 1, True, 3)]


def test_runs_at_qos_0_are_delivered_once_written_in_order_with_those_at_qos_1(
        pair: tuple[socket.socket, socket.socket]) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0), v5=False)
    name = packets.encoded_name("t")
    empty: NamedRun = (2, (), b"", (), 1, False)  # an upload of no values
    link.publish([(1, (name,), b"", (1,), 1, False), empty, (2, (name, name), b"", (2, 3), 0, False)])
    assert [qos for _, _, qos, _, _ in read_publishes(link, broker, 3, v5=False)] == [1, 0, 0]
    assert link.delivered_through() is None and link.outstanding == 1  # the QoS 0 ones went out, behind the first
    broker.sendall(packets.pubacks(1, 1))
    pump_until(link, link.settled)
    assert link.delivered_through() == 3


def test_mqtt_5_limits_are_kept_and_refusals_counted(pair: tuple[socket.socket, socket.socket]) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0, maximum_qos=0, retain_available=False, maximum_packet_size=40))
    link.publish([(1, "a", b"x", 1, True), (2, "b", b"y" * 100, 0, False)])
    assert read_publishes(link, broker, 1, v5=True) == [("a", b"x", 0, False, 0)]  # QoS 0 and not retained, as told
    pump_until(link, link.settled)
    assert link.delivered_through() == 2  # the one too large for the broker can never go: counted, not retried
    assert link.refused == {"larger than the broker's maximum packet size": 1}
    link = link_for(client, ConnAck(0, maximum_packet_size=40))  # a run too, message by message
    link.publish([(3, (packets.encoded_name("r"), packets.encoded_name("r" * 40)), b"", (1, 2), 1, False)])
    assert read_publishes(link, broker, 1, v5=True) == [("r", b"1}", 1, False, 1)]
    broker.sendall(b"\x40\x02\x00\x01")
    pump_until(link, link.settled)
    assert link.delivered_through() == 4 and link.refused == {"larger than the broker's maximum packet size": 1}
    link = link_for(client, ConnAck(0))
    link.publish([(3, "c", b"z", 1, False)])
    read_publishes(link, broker, 1, v5=True)
    broker.sendall(b"\x40\x04\x00\x01\x87\x00")
    pump_until(link, link.settled)
    assert link.delivered_through() == 3 and link.refused == {"refused by the broker (reason 0x87)": 1}


def test_a_broker_that_stops_answering_pings_is_left(pair: tuple[socket.socket, socket.socket]) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0, server_keepalive=1))  # the broker's keep-alive wins over ours
    link.pump(0)
    with pytest.raises(Lost, match="no answer to a ping in 1 s"):
        for _ in range(1000):
            link.pump(0.01)
    assert broker.recv(2) == packets.PINGREQ_PACKET


def test_the_brokers_disconnect_and_close_end_the_link(pair: tuple[socket.socket, socket.socket]) -> None:
    client, broker = pair
    link = link_for(client, ConnAck(0))
    broker.sendall(b"\xe0\x02\x8b\x00")
    with pytest.raises(Lost, match=r"disconnected \(reason 0x8b\)"):
        pump_until(link, lambda: False)
    link = link_for(client, ConnAck(0), v5=False)
    broker.close()
    with pytest.raises(Lost, match="closed the connection"):
        pump_until(link, lambda: False)


def test_topic_names_are_kept_between_batches_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packets, "MAX_CACHED_TOPICS", 2)
    names: dict[str, bytes] = {}
    rows = [(f"t/{n}", b"v", 1, False, n + 1) for n in range(3)]
    assert decode_publishes(packets.publishes(rows, False, names), False) == rows
    assert names == {"t/0": b"\x00\x03t/0", "t/1": b"\x00\x03t/1", "t/2": b"\x00\x03t/2"}
    assert decode_publishes(packets.publishes(rows[:1], False, names), False) == rows[:1]
    assert names == {"t/0": b"\x00\x03t/0"}  # past the bound: started anew
