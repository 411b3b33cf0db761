"""The MQTT 3.1.1 and 5 packets of a client that only publishes, sans-IO.

The worker (:mod:`dtucenter.mqtt.worker`) publishes tens of thousands of
messages a second at ingest rates. A general client spends tens of
microseconds of Python on each (paho-mqtt: an object, a lock, a socket write
and a wake-up per message, and a properties object per PUBACK). Here a whole
batch of PUBLISH packets is encoded into one buffer for one socket write, and
the broker's answers are split out of whatever was read in one pass.

A publishing client needs few packets: CONNECT (with the last will, user name
and password) and DISCONNECT, PUBLISH at QoS 0 or 1, PINGREQ; from the broker
CONNACK, PUBACK, PINGRESP and, in MQTT 5, DISCONNECT. Anything else from the
broker is a protocol error; :class:`PacketReader` reports it as an event and
never raises.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

#: Packet types (the fixed header's high nibble).
CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

#: The protocol levels CONNECT names.
LEVELS = {"3.1.1": 4, "5": 5}
#: A packet from the broker larger than this is refused: a publishing client only gets small ones.
MAX_INCOMING = 1 << 20
#: MQTT's own ceiling on a packet's remaining length.
MAX_REMAINING = 268_435_455

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

#: MQTT 5 properties whose value is a number: how many bytes it takes, by identifier.
_FIXED_PROPERTY_SIZES = {
    0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
    0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2,
    0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4,
}
_STRING_PROPERTIES = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
_USER_PROPERTY = 0x26
_REASON_STRING = 0x1F
_SUBSCRIPTION_ID = 0x0B


class ConnAck(NamedTuple):
    """The broker's answer to CONNECT. ``code``: 0 is accepted (3.1.1 return code or 5 reason code)."""

    code: int
    #: MQTT 5 limits the broker sets (None: not said, so MQTT's own).
    receive_maximum: int | None = None
    maximum_qos: int | None = None
    retain_available: bool = True
    maximum_packet_size: int | None = None
    server_keepalive: int | None = None
    reason: str | None = None


class PubAck(NamedTuple):
    mid: int
    #: MQTT 5's reason code (0 success, 0x10 no subscribers; 0x80 and up: the broker refused the message).
    code: int


class PingResp(NamedTuple):
    pass


class Disconnected(NamedTuple):
    """MQTT 5: the broker says why it closes the connection."""

    code: int
    reason: str | None


class ProtocolError(NamedTuple):
    """The broker sent something a publishing client cannot take: the connection cannot be trusted from here."""

    why: str


Packet = ConnAck | PubAck | PingResp | Disconnected | ProtocolError


def remaining_length(length: int) -> bytes:
    """MQTT's variable byte integer."""
    if length < 128:
        return bytes((length,))
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _U16.pack(len(data)) + data


def connect(level: int, client_id: str, keepalive: int, will: tuple[str, bytes, int, bool] | None,
            username: str | None, password: str | None) -> bytes:
    """A clean-session CONNECT; ``will`` is (topic, payload, qos, retain)."""
    flags = 0x02  # clean session (3.1.1), clean start (5)
    payload = [_string(client_id)]
    v5 = level == 5
    if will is not None:
        topic, body, qos, retain = will
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        if v5:
            payload.append(b"\x00")  # no will properties
        payload += [_string(topic), _string(body)]
    if username is not None:
        flags |= 0x80
        payload.append(_string(username))
        if password is not None:
            flags |= 0x40
            payload.append(_string(password))
    variable = _string("MQTT") + bytes((level, flags)) + _U16.pack(keepalive) + (b"\x00" if v5 else b"")
    body = variable + b"".join(payload)
    return bytes((CONNECT,)) + remaining_length(len(body)) + body


#: DISCONNECT, in MQTT 5 too: an empty body is reason 0, a normal disconnection (the will is not said).
DISCONNECT_PACKET = bytes((DISCONNECT, 0))
PINGREQ_PACKET = bytes((PINGREQ, 0))


#: The two bytes of a fixed header with a remaining length under 128, by first byte and length.
_SHORT_HEADERS = [[bytes((first, length)) for length in range(128)] for first in range(256)]
#: Topics' encoded names (with their length) kept at most by one cache; past it, the cache starts anew.
MAX_CACHED_TOPICS = 200_000


def publishes(rows: Iterable[tuple[str, bytes, int, bool, int]], v5: bool,
              names: dict[str, bytes] | None = None) -> bytes:
    """PUBLISH packets, one after the other, for rows of (topic, payload, qos, retain, mid).

    ``mid`` is used for QoS 1 only. ``names`` keeps each topic's encoded name between calls (a value's topic
    comes again with each upload). The hot path: no object per message but the bytes.
    """
    if names is None:
        names = {}
    elif len(names) > MAX_CACHED_TOPICS:
        names.clear()
    parts: list[bytes] = []
    extend = parts.extend
    pack16 = _U16.pack
    short = _SHORT_HEADERS
    properties = b"\x00" if v5 else b""
    extra = len(properties)
    for topic, payload, qos, retain, mid in rows:
        name = names.get(topic)
        if name is None:
            name = names[topic] = encoded_name(topic)
        length = len(name) + extra + len(payload)
        first = PUBLISH | qos << 1 | retain
        if qos:
            length += 2
            head = short[first][length] if length < 128 else bytes((first,)) + remaining_length(length)
            extend((head, name, pack16(mid), properties, payload))
        else:
            head = short[first][length] if length < 128 else bytes((first,)) + remaining_length(length)
            extend((head, name, properties, payload))
    return b"".join(parts)


def encoded_name(topic: str) -> bytes:
    """A topic name as a PUBLISH packet carries it: its length in bytes, then its UTF-8."""
    data = topic.encode()
    return _U16.pack(len(data)) + data


#: Each packet identifier's two bytes, by identifier (0 is none).
_MIDS = [_U16.pack(mid) for mid in range(65536)]


def value_publishes(runs: Iterable[tuple[object, Sequence[bytes], bytes, Sequence[int], int, bool]], tail: bytes,
                    mid: int, v5: bool) -> bytes:
    """PUBLISH packets of runs of values, one packet per value.

    A run is (its number, which is not this function's business; names; head; values; qos; retain): to each
    topic (an :func:`encoded_name`) the payload ``head``, the value in decimal, ``tail``, with the run's QoS
    and retain flag. QoS 1 packets are numbered from ``mid`` on, the runs one after the other.

    The hottest path of all at a message per value: a packet's body is one formatting, its identifier's
    bytes and its header come from tables, and one call encodes what is published at once.
    """
    body_of = b"%s%s" + (b"\x00" if v5 else b"") + b"%s%d" + tail.replace(b"%", b"%%")
    untagged = b"%s" + (b"\x00" if v5 else b"") + b"%s%d" + tail.replace(b"%", b"%%")
    parts: list[bytes] = []
    append = parts.append
    for _, names, head, values, qos, retain in runs:
        first = PUBLISH | qos << 1 | retain
        short = _SHORT_HEADERS[first]
        if qos:
            count = len(values)
            # Past 65535, identifiers start again from 1.
            mids = _MIDS[mid:mid + count] if mid + count <= 65536 else _MIDS[mid:] + _MIDS[1:mid + count - 65535]
            mid = next_mid(mid, count)
            bodies = [body_of % (name, tag, head, value) for name, tag, value in zip(names, mids, values, strict=True)]
        else:
            bodies = [untagged % (name, head, value) for name, value in zip(names, values, strict=True)]
        for body in bodies:
            length = len(body)
            append(short[length] if length < 128 else bytes((first,)) + remaining_length(length))
            append(body)
    return b"".join(parts)


def next_mid(mid: int, count: int = 1) -> int:
    """The packet identifier ``count`` after ``mid``."""
    return (mid - 1 + count) % 65535 + 1


#: The PUBACK of success (no reason code, no properties: MQTT 3.1.1, and MQTT 5's short form) of every
#: packet identifier, one after the other from 1: 256 KiB, sliced for each batch.
_PUBACKS = struct.pack(">65535I", *range(PUBACK << 24 | 2 << 16 | 1, PUBACK << 24 | 2 << 16 | 65536))


def pubacks(first: int, count: int) -> bytes:
    """The PUBACKs of success a broker sends for ``count`` messages from identifier ``first``, in order.

    The worker holds what it reads against these: when the broker acknowledged in order, as it does but
    for a refusal, a whole read is settled with one comparison, without a packet object per message.
    """
    start = (first - 1) * 4
    end = start + count * 4
    if end <= len(_PUBACKS):
        return _PUBACKS[start:end]
    return _PUBACKS[start:] + _PUBACKS[:end - len(_PUBACKS)]


def publish_size(topic: str, payload: bytes, qos: int, v5: bool) -> int:
    """A PUBLISH packet's whole size, to hold it against a broker's maximum packet size."""
    length = 2 + len(topic.encode()) + (1 if v5 else 0) + len(payload) + (2 if qos else 0)
    return 1 + len(remaining_length(length)) + length


class PacketReader:
    """Splits the broker's bytes into packets; bounded by :data:`MAX_INCOMING`, never raises."""

    def __init__(self, v5: bool) -> None:
        self._v5 = v5
        self._buffer = bytearray()
        self._broken = False

    @property
    def idle(self) -> bool:
        """Between packets, with nothing held back: the next bytes begin a packet."""
        return not self._buffer and not self._broken

    def feed(self, data: bytes) -> list[Packet]:
        if self._broken:
            return []
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        start, size = 0, len(buffer)
        while size - start >= 2:
            kind = buffer[start]
            # The common case, a PUBACK of MQTT 3.1.1 or one of MQTT 5 with success and no properties.
            if kind == PUBACK and buffer[start + 1] == 2:
                if size - start < 4:
                    break
                packets.append(PubAck(buffer[start + 2] << 8 | buffer[start + 3], 0))
                start += 4
                continue
            length, header = 0, 1
            for shift in (0, 7, 14, 21):
                if start + header >= size:
                    length = -1
                    break
                byte = buffer[start + header]
                header += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
            else:
                return self._fail(packets, "a packet's length takes more than 4 bytes")
            if length < 0:
                break  # the length itself is not all here yet
            if length > MAX_INCOMING:
                return self._fail(packets, f"a packet of {length} bytes announced (at most {MAX_INCOMING})")
            end = start + header + length
            if end > size:
                break
            packet = self._packet(kind, bytes(buffer[start + header:end]))
            packets.append(packet)
            start = end
            if isinstance(packet, ProtocolError):
                self._broken = True
                break
        del buffer[:start]
        return packets

    def _fail(self, packets: list[Packet], why: str) -> list[Packet]:
        self._broken = True
        self._buffer.clear()
        packets.append(ProtocolError(why))
        return packets

    def _packet(self, kind: int, body: bytes) -> Packet:
        kind_type = kind & 0xF0
        try:
            if kind == PUBACK:
                code = body[2] if len(body) > 2 else 0
                return PubAck(_U16.unpack_from(body)[0], code)
            if kind == CONNACK:
                return self._connack(body)
            if kind == PINGRESP:
                return PingResp()
            if kind == DISCONNECT and self._v5:
                code = body[0] if body else 0
                return Disconnected(code, _properties(body, 1)[1] if len(body) > 1 else None)
        except (IndexError, struct.error, ValueError, UnicodeDecodeError) as e:
            return ProtocolError(f"a malformed packet 0x{kind:02x}: {e}")
        return ProtocolError(f"an unexpected packet 0x{kind_type:02x} (flags 0x{kind & 0x0F:x})")

    def _connack(self, body: bytes) -> ConnAck:
        code = body[1]
        if not self._v5:
            return ConnAck(code)
        numbers, reason = _properties(body, 2)
        return ConnAck(
            code,
            receive_maximum=numbers.get(0x21),
            maximum_qos=numbers.get(0x24),
            retain_available=numbers.get(0x25, 1) != 0,
            maximum_packet_size=numbers.get(0x27),
            server_keepalive=numbers.get(0x13),
            reason=reason,
        )


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A variable byte integer at ``at``: its value and where it ends."""
    value = 0
    for shift in (0, 7, 14, 21):
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise ValueError("a variable byte integer of more than 4 bytes")


def _properties(body: bytes, at: int) -> tuple[dict[int, int], str | None]:
    """MQTT 5 properties from ``at`` (their length first): the numbers by identifier, and the reason
    string if there is one; the others are skipped."""
    length, at = _varint(body, at)
    end = at + length
    if end > len(body):
        raise ValueError("properties longer than their packet")
    numbers: dict[int, int] = {}
    reason = None
    while at < end:
        identifier, at = _varint(body, at)
        size = _FIXED_PROPERTY_SIZES.get(identifier)
        if size is not None:
            if at + size > end:
                raise ValueError(f"property 0x{identifier:02x} cut short")
            numbers[identifier] = int.from_bytes(body[at:at + size], "big")
            at += size
        elif identifier in _STRING_PROPERTIES:
            (count,) = _U16.unpack_from(body, at)
            if identifier == _REASON_STRING:
                reason = body[at + 2:at + 2 + count].decode()
            at += 2 + count
        elif identifier == _USER_PROPERTY:
            for _ in range(2):
                (count,) = _U16.unpack_from(body, at)
                at += 2 + count
        elif identifier == _SUBSCRIPTION_ID:
            _, at = _varint(body, at)
        else:
            raise ValueError(f"an unknown property 0x{identifier:02x}")
    if at != end:
        raise ValueError("properties overrun their length")
    return numbers, reason
