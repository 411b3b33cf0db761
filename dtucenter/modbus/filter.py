"""Sans-IO stream filter for DTU connections: registration, heartbeats, responses.

A DTU in transparent mode mixes its own packets into the Modbus byte stream:
a registration packet when it connects (optionally in front of every packet
it sends) and heartbeat packets whenever its timer fires. TCP may split or
glue any of these, so nothing here relies on read boundaries.

The heartbeat rule
------------------
Heartbeat (and repeated registration) packets are stripped only at a frame
boundary, i.e. at the head of the receive buffer, never from inside data.
At the head, in this order:

0. If the DTU puts its registration in front of every packet (registration
   mode ``data`` or ``both``) and the head is not the body of a packet whose
   prefix was just stripped: a head that starts with the registration is
   stripped, one that is a proper prefix of it waits. Such a DTU sends the
   response behind its registration too, so this comes before rule 1: a
   prefix whose bytes look like the awaited response is still stripped.
1. If a request is in flight and the head is, or may still become, the
   awaited response (right unit and function code, and for a complete RTU
   frame a good CRC; right MBAP transaction for Modbus TCP), it is treated
   as the response: delivered when complete, waited for otherwise.
2. Otherwise, if the head starts with a whole noise packet, it is stripped.
3. Otherwise, if the head is a proper prefix of a noise packet, wait.
4. Otherwise the head is junk: in Modbus TCP a foreign frame (a late answer
   to an abandoned transaction) is waited for and dropped whole, anything
   else is dropped one byte at a time while hunting for the next boundary.

So a heartbeat whose bytes collide with the start of the awaited response
can only delay the decision until the frame is complete; a CRC that fails
then hands the bytes to rule 2. A Modbus frame is never cut by rule 2
because rule 1 claims every head that could be the response, and bytes that
arrive while no request is in flight cannot be a response at all.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Sequence

import attrs
from pymodbus.pdu import ModbusPDU

from dtucenter.modbus.framing import (
    Complete,
    Expectation,
    Framing,
    Incomplete,
    OtherFrame,
    PartialOtherFrame,
)

MAX_PACKET_OPTION = 128


def encode_packet_option(packet: bytes) -> str:
    """The spelling :func:`decode_packet_option` reads back as ``packet``: text where it is
    printable (and cannot be taken for hex), else ``hex:...``."""
    try:
        text = packet.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not text.isprintable() or text.startswith("hex:"):
        return "hex:" + packet.hex().upper()
    return text


def decode_packet_option(text: str) -> bytes:
    """Bytes of a registration or heartbeat option: ``"hex:0A0B"`` or plain UTF-8 text."""
    if text.startswith("hex:"):
        digits = "".join(text[4:].split())
        try:
            packet = binascii.unhexlify(digits)
        except (binascii.Error, ValueError):
            raise ValueError(f"{text!r} is not valid hex after 'hex:'") from None
    else:
        packet = text.encode("utf-8")
    if not packet:
        raise ValueError("must not be empty")
    if len(packet) > MAX_PACKET_OPTION:
        raise ValueError(f"is {len(packet)} bytes long, at most {MAX_PACKET_OPTION} allowed")
    return packet


# -- login: which registration did a connection open with? -------------------


@attrs.frozen
class LoginPending:
    """Everything received so far may still become a known registration."""


@attrs.frozen
class LoginMatched:
    registration: bytes
    rest: bytes  # bytes glued behind the registration, for the link's reader
    heartbeats: tuple[bytes, ...] = ()  # whole heartbeats skipped in front of the registration


@attrs.frozen
class LoginRejected:
    received: bytes  # what the peer sent instead of a known registration


LoginResult = LoginPending | LoginMatched | LoginRejected


class RegistrationReader:
    """Recognises the registration packet a connection starts with.

    No registration may be a prefix of another (the configuration refuses
    that), so the first full match is the only possible one and is final.
    Whole ``heartbeats`` in front of it are skipped: a DTU that sends its
    registration only in front of data (mode ``data``) may send an unprefixed
    heartbeat first, which says nothing about who it is.
    """

    def __init__(self, registrations: Iterable[bytes], heartbeats: Iterable[bytes] = ()) -> None:
        self._registrations = tuple(registrations)
        self._heartbeats = tuple(sorted(set(heartbeats), key=len, reverse=True))
        self._buffer = b""
        self._skipped: list[bytes] = []
        self._done = False

    def feed(self, data: bytes) -> LoginResult:
        if self._done:
            raise RuntimeError("registration already decided")
        self._buffer += data
        while True:
            for registration in self._registrations:
                if self._buffer.startswith(registration):
                    self._done = True
                    return LoginMatched(registration, self._buffer[len(registration) :], tuple(self._skipped))
            if any(registration.startswith(self._buffer) for registration in self._registrations):
                return LoginPending()
            heartbeat = next((beat for beat in self._heartbeats if self._buffer.startswith(beat)), None)
            if heartbeat is not None:
                self._buffer = self._buffer[len(heartbeat) :]
                self._skipped.append(heartbeat)
                continue
            if any(beat.startswith(self._buffer) for beat in self._heartbeats):
                return LoginPending()
            self._done = True
            return LoginRejected(self._buffer)


# -- noise packets at frame boundaries ----------------------------------------


@attrs.frozen
class NoisePacket:
    kind: str  # "heartbeat" or "registration"
    packet: bytes


@attrs.frozen
class Strip:
    noise: NoisePacket


class WaitForMore:
    """The head is a proper prefix of a noise packet."""


WAIT_FOR_MORE = WaitForMore()


class BoundaryNoise:
    """The DTU's own packets that may show up between Modbus frames.

    ``prefix`` is a registration the DTU puts in front of every packet it sends
    (registration modes ``data`` and ``both``); see :class:`ResponseReader`.
    """

    def __init__(self, packets: Sequence[NoisePacket], prefix: NoisePacket | None = None) -> None:
        # Longest first, so of two packets sharing a start the longer wins.
        self._packets = sorted(packets, key=lambda noise: len(noise.packet), reverse=True)
        self.prefix = prefix

    @property
    def packets(self) -> tuple[bytes, ...]:
        return tuple(noise.packet for noise in self._packets)

    @classmethod
    def for_link(
        cls, registration: bytes | None, registration_prefix: bool, heartbeat: bytes | None
    ) -> BoundaryNoise:
        packets = []
        prefix = None
        if heartbeat:
            packets.append(NoisePacket("heartbeat", heartbeat))
        if registration and registration_prefix:
            prefix = NoisePacket("registration", registration)
            packets.append(prefix)
        return cls(packets, prefix)

    def at_head(self, buffer: bytes) -> Strip | WaitForMore | None:
        for noise in self._packets:
            if buffer.startswith(noise.packet):
                return Strip(noise)
        for noise in self._packets:
            if noise.packet.startswith(buffer):
                return WAIT_FOR_MORE
        return None


# -- the established connection's inbound side --------------------------------


@attrs.frozen
class Response:
    pdu: ModbusPDU


@attrs.frozen
class Stripped:
    noise: NoisePacket


@attrs.frozen
class Discarded:
    """Bytes thrown away: ``count`` of them, the first ``JUNK_SAMPLE`` kept in ``data`` for the log."""

    data: bytes
    reason: str  # "junk" or "foreign frame"
    count: int = attrs.field()

    @count.default
    def _whole_data(self) -> int:
        return len(self.data)


InboundEvent = Response | Stripped | Discarded

#: Bytes of a run of junk kept to show in a log line; the rest is only counted.
JUNK_SAMPLE = 64
#: The head of the buffer is first looked at through a window this long; a longer one
#: only when a frame or a noise packet may begin there and needs more bytes to tell.
_FIRST_LOOK = 16
#: The parsed bytes are cut off the buffer once they are this many and at least half of it.
_COMPACT_AT = 4096


class _LookFurther:
    """The window at the head was too short to decide."""


_LOOK_FURTHER = _LookFurther()


class _Wait:
    """The head may still become a prefixed registration: wait for more bytes."""


_WAIT = _Wait()


class ResponseReader:
    """Splits a master's inbound bytes into the awaited response, DTU noise and junk.

    The owner sets :attr:`expected` when it sends a request; the reader clears
    it when the matching response has been taken from the stream.

    The cost is linear in the bytes fed: the head is looked at through a short
    window (not the whole buffer), a run of junk is skipped to the next byte
    where a frame or a noise packet may start (``Framing.next_start`` and the
    packets' first bytes, found with ``bytes.find``), the buffer is an offset
    into a ``bytearray`` compacted once per ``_COMPACT_AT`` bytes, and of junk
    only a sample is kept. What stays buffered between reads is at most a
    frame or a noise packet. ``examined`` counts the bytes looked at, for tests.
    """

    def __init__(self, framing: Framing, noise: BoundaryNoise | None = None) -> None:
        self._framing = framing
        self._noise = noise or BoundaryNoise(())
        self._noise_starts = sorted({packet[:1] for packet in self._noise.packets})
        #: A window this long decides any head: no frame and no noise packet is longer.
        self._longest_look = max([framing.max_frame, *(len(p) for p in self._noise.packets)]) + 1
        self._buffer = bytearray()
        self._pos = 0
        self.expected: Expectation | None = None
        self.examined = 0
        #: The head is the body of a packet whose registration prefix was just stripped.
        self._behind_prefix = False

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> list[InboundEvent]:
        self._buffer += data
        events: list[InboundEvent] = []
        junk = bytearray()
        junk_count = 0
        while self._pos < len(self._buffer):
            decision = self._decide_head()
            if decision is None:
                break
            if isinstance(decision, Discarded) and decision.reason == "junk":
                if len(junk) < JUNK_SAMPLE:
                    junk += decision.data[: JUNK_SAMPLE - len(junk)]
                junk_count += decision.count
                continue
            if junk_count:
                events.append(Discarded(bytes(junk), "junk", junk_count))
                junk, junk_count = bytearray(), 0
            events.append(decision)
        if junk_count:
            events.append(Discarded(bytes(junk), "junk", junk_count))
        self._compact()
        return events

    def flush(self) -> bytes:
        """Drop whatever is buffered, e.g. after a timeout on an RTU line."""
        dropped = bytes(self._buffer[self._pos :])
        self._buffer = bytearray()
        self._pos = 0
        self._behind_prefix = False
        return dropped

    def _consume(self, length: int) -> bytes:
        head = bytes(self._buffer[self._pos : self._pos + length])
        self._pos += length
        return head

    def _compact(self) -> None:
        pos = self._pos
        if pos and (pos == len(self._buffer) or (pos >= _COMPACT_AT and 2 * pos >= len(self._buffer))):
            del self._buffer[:pos]
            self._pos = 0

    def _decide_head(self) -> InboundEvent | None:
        available = len(self._buffer) - self._pos
        size = min(available, _FIRST_LOOK)
        while True:
            truncated = size < available and size < self._longest_look
            self.examined += size
            head = bytes(self._buffer[self._pos : self._pos + size])
            decision = self._decide_prefix(head, truncated) if not self._behind_prefix else None
            if decision is None:
                decision = self._decide(head, available, truncated)
            if decision is None or decision is _WAIT:
                return None
            if not isinstance(decision, _LookFurther | _Wait):
                self._behind_prefix = isinstance(decision, Stripped) and decision.noise is self._noise.prefix
                return decision
            size = min(available, self._longest_look, size * 4)

    def _decide_prefix(self, head: bytes, truncated: bool) -> InboundEvent | _LookFurther | _Wait | None:
        """Rule 0: a DTU that prefixes every packet puts its registration in front of the response
        too, so at a packet's start the registration goes before rule 1, even where its bytes look
        like the awaited response; the packet's body behind it gets the ordinary rules."""
        prefix = self._noise.prefix
        if prefix is None:
            return None
        if head.startswith(prefix.packet):
            self._consume(len(prefix.packet))
            return Stripped(prefix)
        if prefix.packet.startswith(head):
            return _LOOK_FURTHER if truncated else _WAIT
        return None

    def _decide(self, head: bytes, available: int, truncated: bool) -> InboundEvent | _LookFurther | None:
        """The head's fate, seen through ``head``: the first bytes of the ``available`` ones."""
        probe = self._framing.probe(head, self.expected)
        if isinstance(probe, Complete):
            self._consume(probe.length)
            self.expected = None
            return Response(probe.pdu)
        if truncated and isinstance(probe, Incomplete | PartialOtherFrame):
            return _LOOK_FURTHER
        may_grow = available <= self._framing.max_frame
        if isinstance(probe, Incomplete) and may_grow:
            return None
        noise = self._noise.at_head(head)
        if isinstance(noise, Strip):
            self._consume(len(noise.noise.packet))
            return Stripped(noise.noise)
        if noise is WAIT_FOR_MORE:
            return _LOOK_FURTHER if truncated else None
        if isinstance(probe, PartialOtherFrame) and may_grow:
            return None  # let a late answer complete, to drop it whole
        if isinstance(probe, OtherFrame):
            return Discarded(self._consume(probe.length), "foreign frame")
        return self._junk_run()

    def _junk_run(self) -> Discarded:
        """The head byte is junk, and so is every byte before the next that may start something."""
        buf = self._buffer
        start = self._pos
        after = start + 1
        stop = len(buf)
        for first in self._noise_starts:
            found = buf.find(first, after, stop)
            if found >= 0:
                stop = found
        stop = self._framing.next_start(buf, after, stop, self.expected)
        self._pos = stop
        return Discarded(bytes(buf[start : min(stop, start + JUNK_SAMPLE)]), "junk", stop - start)
