"""The MQTT worker process: the broker's connection, off the center's process and its GIL.

Started by :class:`dtucenter.mqtt.client.BrokerConnection` as
``python -m dtucenter.mqtt.worker``; it speaks :mod:`dtucenter.mqtt.frames`
on its stdin (from the center) and stdout (to it), and writes only unexpected
trouble to stderr, which the center logs.

From the center: first ``("config", settings, broker, last_will)``, then
``("send", [(connection, entries), ...])`` (numbered messages, each batch with
the connection it was meant for; an entry is a row or a run of rows, see
:class:`dtucenter.mqtt.messages.ValueRun`, whose topics are named by a slot, or
by ``(slot, topics)`` where the worker learns them, see
:class:`dtucenter.mqtt.client.TopicSlots`), ``("birth", connection, row)`` (the
center's status, said first on a new connection) and ``("stop", row)`` (the
goodbye: said, its ack and the last messages' acks awaited, then the worker
disconnects and exits). A row is ``(seq, topic, payload, qos, retain)``.

To the center: ``("up", connection)``, ``("down", reason)`` and
``("delivered", seq)``: every message up to ``seq`` was delivered (PUBACK for
QoS 1, written to the socket for QoS 0).

It speaks MQTT itself (:mod:`dtucenter.mqtt.packets`) rather than through
paho-mqtt: at a message per value, ingest rates mean tens of thousands of
messages a second, and paho's tens of microseconds of Python per message were
more than the center spends on the upload they come from (docs/performance.md,
"MQTT"). Here what the center hands over in one frame goes out in one socket
write, and the broker's PUBACKs are taken a read at a time. One thread does
it all, waiting on the broker's socket and the center's pipe at once: a
second thread for the pipe cost a hand-over of the interpreter lock per frame.

Nothing is re-sent behind the center's back: what was not delivered when a
connection dropped is the center's to keep, in order, and a batch handed over
for one connection is never published on the next (each connection starts a
clean session). The worker ends when its stdin ends (the center is gone)
without saying goodbye, so that the broker says the center's last will; on
Linux the kernel also kills it when the center dies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections import deque
from typing import Any

from dtucenter.mqtt import packets
from dtucenter.mqtt.config import Broker, MqttSettings
from dtucenter.mqtt.frames import FrameError, FrameReader, encode
from dtucenter.mqtt.messages import VALUE_TAIL, Row, payloads_of, size_of, split_run

#: Seconds before reconnecting after a failure, doubling up to RETRY_MAX.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0
#: Seconds the network loop waits at most when there is nothing to do (the center's frames wake it).
IDLE_WAIT = 1.0
#: Seconds between "delivered" tells at most, so that acks cost the center a wake-up per batch, not per message.
TELL_INTERVAL = 0.01
#: Seconds a connection attempt has to be answered (TCP, TLS and CONNACK each).
CONNECT_TIMEOUT = 10.0
#: Messages on their way at once (written, not yet acknowledged), unless the broker allows fewer (MQTT 5).
MAX_INFLIGHT = 1000
#: Seconds the broker's acks are let gather when the window is all but full, if it is at least PACED_WINDOW:
#: the broker keeps working through the rest of the window meanwhile, so that this costs no throughput below
#: PACED_WINDOW * 3/4 / ACK_PACE messages a second (250,000 at the full window).
ACK_PACE = 0.003
PACED_WINDOW = 500
#: Seconds a stopping center waits for its last messages' acks.
STOP_WAIT = 5.0
#: Bytes read from the center's pipe, and from the broker, at a time.
READ_SIZE = 1 << 20
#: Seconds between the lines that say how many messages the broker refused or could not take.
SUMMARY_INTERVAL = 60.0

#: A run as the worker keeps it: (first seq, its topics' encoded names, head, values, qos, retain).
NamedRun = tuple[int, tuple[bytes, ...], bytes, tuple[int, ...], int, bool]

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Lost(Exception):
    """The connection ended; the message says why."""


class Link:
    """One connection to the broker, once it accepted CONNECT: what was written, what is acknowledged.

    Messages are published in the order of their numbers (seqs). A QoS 1 message is in flight from its
    writing to its PUBACK; its packet identifiers are given out in order, so those in flight, at most
    :data:`MAX_INFLIGHT` of the 65535, are consecutive from the oldest one's. Brokers acknowledge in
    order (but for the rare refusal), so what is read is first held against the PUBACKs of success
    expected next (:func:`packets.pubacks`): a match settles the whole read at once; anything else is
    taken packet by packet. A QoS 0 message is delivered once written.
    """

    def __init__(self, sock: socket.socket, reader: packets.PacketReader, accepted: packets.ConnAck,
                 level: int, keepalive: int) -> None:
        self._sock = sock
        self._reader = reader
        self._v5 = level == 5
        self.window = min(MAX_INFLIGHT, accepted.receive_maximum or MAX_INFLIGHT)
        self._max_qos = 1 if accepted.maximum_qos is None else accepted.maximum_qos
        self._retain = accepted.retain_available
        self._max_packet = accepted.maximum_packet_size
        #: The broker set limits (MQTT 5): each message is held against them on its own.
        self._limited = self._max_qos < 1 or not self._retain or self._max_packet is not None
        self._keepalive = accepted.server_keepalive if accepted.server_keepalive is not None else keepalive
        self._out = bytearray()
        self._written = 0  # bytes written since the connection began
        self._queued = 0  # bytes queued since the connection began
        self._names: dict[str, bytes] = {}  # topics' encoded names, for packets.publishes
        #: The seq of the message published last on this connection (-1: none yet).
        self._last_seq = -1
        #: The seq through which delivery was last reported by :meth:`delivered_through`.
        self._told = -1
        # QoS 1 messages in flight, oldest first: for each, the seq published just before it (what is
        # delivered once the messages ahead of it are), its expected PUBACK (4 bytes), and whether it was
        # acknowledged early (before one ahead of it).
        self._before: list[int] = []
        self._expected = bytearray()
        self._early = bytearray()
        self._early_count = 0
        self._oldest_mid = 1  # the packet identifier of the oldest in flight (if none, of the next)
        self._next_mid = 1
        #: QoS 0 messages queued, not yet written: (the byte count at which they are, the seq before the
        #: first of them, how many), a batch each.
        self._unwritten: deque[tuple[int, int, int]] = deque()
        self._unwritten_count = 0
        self._last_write = time.monotonic()
        self._ping_sent: float | None = None
        #: Messages the broker refused (MQTT 5 reason codes from 0x80) or could not take (too large).
        self.refused: dict[str, int] = {}

    @property
    def outstanding(self) -> int:
        """Messages published and not yet delivered."""
        return len(self._before) + self._unwritten_count

    @property
    def awaiting_ack(self) -> int:
        """QoS 1 messages the broker has not acknowledged yet."""
        return len(self._before) - self._early_count

    def publish(self, entries: list[Row | NamedRun]) -> None:
        """Queue PUBLISH packets for ``entries`` (numbered in order), written by :meth:`pump`."""
        rows: list[Row] = []
        runs: list[NamedRun] = []
        for entry in entries:
            if len(entry) != 6:
                if runs:
                    self._publish_runs(runs)
                    runs = []
                rows.append(entry)
            elif self._limited:
                first, names, head, values, qos, retain = entry
                rows += [(seq, name[2:].decode(), payload, qos, retain) for seq, name, payload
                         in zip(itertools.count(first), names, payloads_of(head, values))]
            else:
                if rows:
                    self._publish_rows(rows)
                    rows = []
                runs.append(entry)
        if rows:
            self._publish_rows(rows)
        if runs:
            self._publish_runs(runs)

    def _publish_runs(self, runs: list[NamedRun]) -> None:
        """The hot path: uploads' messages, one per value, each with its run's QoS and retain flag."""
        mid, last, before = self._next_mid, self._last_seq, self._before
        in_flight = unwritten = 0
        unwritten_before = -1
        for first, _, _, values, qos, _ in runs:
            count = len(values)
            if not count:  # an upload of no values: nothing to publish
                continue
            if qos:
                before.append(last)
                before += range(first, first + count - 1)
                in_flight += count
            else:
                if not unwritten:
                    unwritten_before = last
                unwritten += count
            last = first + count - 1
        self._last_seq = last
        self._enqueue(packets.value_publishes(runs, VALUE_TAIL, mid, self._v5), mid, in_flight,
                      unwritten_before, unwritten)

    def _publish_rows(self, rows: list[Row]) -> None:
        encoded: list[tuple[str, bytes, int, bool, int]] = []
        first_mid, last, before = self._next_mid, self._last_seq, self._before
        in_flight = unwritten = 0
        unwritten_before = -1
        for seq, topic, payload, asked_qos, asked_retain in rows:
            qos, retain = asked_qos, asked_retain
            if self._limited:  # MQTT 5: what the broker said it takes
                qos, retain = min(qos, self._max_qos), retain and self._retain
                if (self._max_packet is not None
                        and packets.publish_size(topic, payload, qos, self._v5) > self._max_packet):
                    # The broker would close the connection on it, again at every attempt: it can never be delivered.
                    self._refuse("larger than the broker's maximum packet size")
                    last = seq
                    continue
            mid = 0
            if qos:
                mid = packets.next_mid(first_mid, in_flight)
                before.append(last)
                in_flight += 1
            else:
                if not unwritten:
                    unwritten_before = last
                unwritten += 1
            encoded.append((topic, payload, qos, retain, mid))
            last = seq
        self._last_seq = last
        self._enqueue(packets.publishes(encoded, self._v5, self._names), first_mid, in_flight,
                      unwritten_before, unwritten)

    def _enqueue(self, data: bytes, mid: int, in_flight: int, unwritten_before: int, unwritten: int) -> None:
        """A batch's packets queued: ``in_flight`` QoS 1 messages numbered from ``mid`` (their places in
        ``_before`` taken already), and ``unwritten`` QoS 0 ones, delivered once the batch is written."""
        self._queue(data)
        if in_flight:
            self._expected += packets.pubacks(mid, in_flight)
            self._early += bytes(in_flight)
            self._next_mid = packets.next_mid(mid, in_flight)
        if unwritten:
            self._unwritten.append((self._queued, unwritten_before, unwritten))
            self._unwritten_count += unwritten

    def _refuse(self, why: str) -> None:
        """A message the broker will not take: delivered as far as the center is concerned, and counted."""
        self.refused[why] = self.refused.get(why, 0) + 1

    def _queue(self, data: bytes) -> None:
        self._out += data
        self._queued += len(data)

    def pump(self, timeout: float, center: int | None = None) -> bool:
        """Write what is queued, read what came, wait up to ``timeout`` for either (or for ``center``, a
        pipe, to be readable: then True); raises :class:`Lost`."""
        sock = self._sock
        if self._out:
            self._write()
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        readable: list[Any] = [sock] if center is None else [sock, center]
        try:
            ready, writable, _ = select.select(readable, [sock] if self._out else [], [],
                                               0 if pending else max(timeout, 0))
        except (OSError, ValueError) as e:
            raise Lost(f"connection lost: {e}") from None
        if sock in ready or pending:
            self._read()
        if writable and self._out:
            self._write()
        self._keep_alive()
        return center is not None and center in ready

    def _write(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except _WOULD_BLOCK:
            return
        except OSError as e:
            raise Lost(f"connection lost: {e}") from None
        del self._out[:sent]
        self._written += sent
        self._last_write = time.monotonic()
        unwritten, written = self._unwritten, self._written
        while unwritten and unwritten[0][0] <= written:
            self._unwritten_count -= unwritten.popleft()[2]

    def _read(self) -> None:
        reader = self._reader
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
            except _WOULD_BLOCK:
                return
            except OSError as e:
                raise Lost(f"connection lost: {e}") from None
            if not data:
                raise Lost("the broker closed the connection")
            if reader.idle and self._expected.startswith(data):
                # The PUBACKs expected next, in order (the last one perhaps cut short: the reader keeps it).
                whole = len(data) >> 2
                self._settle(whole)
                if len(data) & 3:
                    reader.feed(data[whole << 2:])
            else:
                self._take(reader.feed(data))

    def _settle(self, count: int) -> None:
        """The oldest ``count`` messages in flight are acknowledged, and with them those acknowledged early."""
        early = self._early
        while count:
            if self._early_count:
                self._early_count -= early.count(1, 0, count)
            del self._before[:count], self._expected[:count * 4], early[:count]
            self._oldest_mid = packets.next_mid(self._oldest_mid, count)
            count = 0
            if self._early_count:
                while count < len(early) and early[count]:
                    count += 1

    def _take(self, answers: list[packets.Packet]) -> None:
        for answer in answers:
            if type(answer) is packets.PubAck:
                at = (answer.mid - self._oldest_mid) % 65535  # its place among those in flight
                if at >= len(self._before) or self._early[at]:
                    continue  # not ours (any more): nothing to settle
                if answer.code >= 0x80:
                    self._refuse(f"refused by the broker (reason 0x{answer.code:02x})")
                if at == 0:
                    self._settle(1)
                else:
                    self._early[at] = 1
                    self._early_count += 1
            elif isinstance(answer, packets.PingResp):
                self._ping_sent = None
            elif isinstance(answer, packets.Disconnected):
                said = f": {answer.reason}" if answer.reason else ""
                raise Lost(f"the broker disconnected (reason 0x{answer.code:02x}{said})")
            elif isinstance(answer, packets.ProtocolError):
                raise Lost(f"protocol error: {answer.why}")
            elif isinstance(answer, packets.ConnAck):
                raise Lost("protocol error: a second CONNACK")

    def _keep_alive(self) -> None:
        if not self._keepalive:
            return
        now = time.monotonic()
        if self._ping_sent is not None:
            if now - self._ping_sent > self._keepalive:
                raise Lost(f"no answer to a ping in {self._keepalive} s")
        elif now - self._last_write >= self._keepalive:
            self._ping_sent = now
            self._queue(packets.PINGREQ_PACKET)
            self._write()

    def delivered_through(self) -> int | None:
        """The seq through which everything published on this connection was delivered, if it moved."""
        through = self._before[0] if self._before else self._last_seq
        if self._unwritten:
            through = min(through, self._unwritten[0][1])
        if through <= self._told:
            return None
        self._told = through
        return through

    def settled(self) -> bool:
        """Everything written, every QoS 1 message acknowledged."""
        return not self._out and not self._before and not self._unwritten

    def close(self, goodbye: bool) -> None:
        """With ``goodbye``, DISCONNECT first (the broker then keeps the last will to itself)."""
        if goodbye:
            with contextlib.suppress(OSError, Lost):
                self._queue(packets.DISCONNECT_PACKET)
                self._sock.setblocking(True)
                self._sock.settimeout(1.0)
                self._sock.sendall(self._out)
        with contextlib.suppress(OSError):
            self._sock.close()


class Worker:
    """Keeps a connection to the broker, publishes what the center sends, tells what became of it."""

    def __init__(self, settings: MqttSettings, broker: Broker, last_will: Row, source: int, out: int,
                 reader: FrameReader) -> None:
        self._settings = settings
        self._broker = broker
        self._last_will = last_will
        self._source = source
        self._out = out
        self._reader = reader
        self._level = packets.LEVELS[settings.version]
        #: What the center sent, not yet published: ("send", connection, entries) or ("birth", connection, row);
        #: a run's topics given as their encoded names.
        self._inbox: deque[tuple[str, int, Any]] = deque()
        #: The topic sets the center told, by slot: each topic as a PUBLISH packet carries its name.
        self._topic_sets: dict[int, tuple[bytes, ...]] = {}
        self._goodbye: Row | None = None
        self._stopping = False
        #: The connection being served, counted from 1.
        self._connection = 0
        self._summary_at = 0.0

    # -- the center's frames -----------------------------------------------------

    def _hear(self) -> None:
        """Takes what the center wrote (its pipe is readable); exits the process when the center is gone."""
        data = os.read(self._source, READ_SIZE)
        if not data:
            # The center is gone without a goodbye: no DISCONNECT, so that the broker says the last will.
            os._exit(0)
        try:
            frames = self._reader.feed(data)
        except FrameError as e:
            print(f"MQTT worker: {e}", file=sys.stderr, flush=True)
            os._exit(2)
        self.take(frames)

    def _wait(self, seconds: float) -> None:
        """Waits ``seconds``, hearing the center meanwhile, or less if it says stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self._source], [], [], left)
            if ready:
                self._hear()

    def _topic_set(self, named: int | tuple[int, tuple[str, ...]]) -> tuple[bytes, ...]:
        """A run's topics, encoded, from their slot; learnt first if they come with it."""
        if isinstance(named, int):
            return self._topic_sets[named]
        slot, topics = named
        names = self._topic_sets[slot] = tuple(packets.encoded_name(topic) for topic in topics)
        return names

    @property
    def stopping(self) -> bool:
        """The center said stop."""
        return self._stopping

    def take(self, frames: list[Any]) -> None:
        """The center's frames: what to publish is queued, a stop is noted."""
        for frame in frames:
            if frame[0] == "send":
                for connection, entries in frame[1]:
                    self._inbox.append(("send", connection, [
                        (entry[0], self._topic_set(entry[1]), *entry[2:]) if len(entry) == 6 else entry
                        for entry in entries
                    ]))
            elif frame[0] == "birth":
                self._inbox.append(("birth", frame[1], frame[2]))
            elif frame[0] == "stop":
                self._goodbye = frame[1]
                self._stopping = True
                return

    # -- the broker ----------------------------------------------------------------

    def _tell(self, *frame: object) -> None:
        data = encode(frame)
        while data:
            data = data[os.write(self._out, data):]

    def run(self) -> None:
        delay = RETRY_FIRST
        while not self._stopping:
            reason = self._connect_and_serve()
            if self.stopping:  # said while connected, or while connecting
                break
            self._tell("down", reason)
            self._wait(delay)
            delay = min(delay * 2, RETRY_MAX)
            if reason == "":
                delay = RETRY_FIRST

    def _connect_and_serve(self) -> str:
        """One connection, from connecting to its end; returns why it ended ("" once it had served)."""
        try:
            link = self._open()
        except Lost as e:
            return f"{self._broker}: {e}"
        self._connection += 1
        self._tell("up", self._connection)
        try:
            self._serve(link)
        except Lost as e:
            link.close(goodbye=False)
            self._summarise(link, force=True)
            return f"{self._broker}: {e}"
        self._say_goodbye(link)
        return ""

    def _open(self) -> Link:
        """Connects, says CONNECT and waits for the broker to accept it; raises :class:`Lost` if it does not.

        The center is not heard while TCP and TLS connect (CONNECT_TIMEOUT at most, well within the
        center's wait for a stopping worker), only while the broker's CONNACK is awaited.
        """
        broker, settings = self._broker, self._settings
        try:
            sock = socket.create_connection((broker.host, broker.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise Lost(f"cannot connect: {e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if broker.tls:
                sock = self._tls().wrap_socket(sock, server_hostname=broker.host)
            _, topic, payload, qos, retain = self._last_will
            sock.sendall(packets.connect(self._level, settings.client_id, settings.keepalive,
                                         (topic, payload, qos, retain), broker.username, broker.password))
            reader = packets.PacketReader(self._level == 5)
            accepted = self._connack(sock, reader)
        except (OSError, ssl.SSLError, ValueError) as e:
            with contextlib.suppress(OSError):
                sock.close()
            raise Lost(f"cannot connect: {e}") from None
        except Lost:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        if accepted.code != 0:
            with contextlib.suppress(OSError):
                sock.close()
            raise Lost(f"refused ({_refusal(accepted, self._level)})")
        return Link(sock, reader, accepted, self._level, settings.keepalive)

    def _tls(self) -> ssl.SSLContext:
        settings = self._settings
        context = ssl.create_default_context(cafile=settings.ca)
        if settings.cert:
            context.load_cert_chain(settings.cert, settings.key)
        return context

    def _connack(self, sock: socket.socket, reader: packets.PacketReader) -> packets.ConnAck:
        """The broker's answer to CONNECT, the center heard meanwhile; the socket is left non-blocking."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        sock.setblocking(False)
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            waited_on: list[Any] = [sock, self._source]
            ready, _, _ = select.select(waited_on, [], [], 0 if pending else left)
            if self._source in ready:
                self._hear()
            if sock not in ready and not pending:
                continue
            try:
                data = sock.recv(4096)
            except _WOULD_BLOCK:
                continue
            if not data:
                raise Lost("the broker closed the connection before answering")
            for answer in reader.feed(data):
                if isinstance(answer, packets.ConnAck):
                    return answer
                raise Lost(f"protocol error: {getattr(answer, 'why', answer)} before CONNACK")
        raise Lost("no answer")

    def _serve(self, link: Link) -> None:
        untold: list[int] = []  # delivered through, not yet told
        try:
            self._publish_what_comes(link, untold)
        finally:
            if untold:  # before the center hears the connection is gone, and keeps what was not delivered
                self._tell("delivered", untold[-1])

    def _publish_what_comes(self, link: Link, untold: list[int]) -> None:
        inbox, pending = self._inbox, deque[Row | NamedRun]()
        told_at = 0.0
        while not self._stopping:
            while inbox:
                kind, connection, entries = inbox.popleft()
                if connection != self._connection:
                    continue  # meant for an earlier connection: the center kept it
                if kind == "birth":  # the center's status, before anything it sends after hearing "up"
                    link.publish([entries])
                else:
                    pending += entries
            room = link.window - link.outstanding
            if pending and room < link.window // 4 and link.window >= PACED_WINDOW:
                # All but full: the acks are let gather for a moment, then read, and the next messages written,
                # a quarter of the window at least at a time. Woken at each chunk of acks, the worker wrote ever
                # smaller batches, which the broker acknowledged in ever smaller chunks: on a busy machine, the
                # wake-ups cost more than the messages (docs/performance.md, "MQTT").
                self._wait(ACK_PACE)
                link.pump(0)
                room = link.window - link.outstanding
            if pending and room > 0:  # else read the acks first: the broker takes so many at once
                link.publish(take_up_to(pending, room))
            # Acks are told at most every TELL_INTERVAL: each tell wakes the center's reactor up.
            if link.pump(0 if pending and link.outstanding < link.window else TELL_INTERVAL if untold else IDLE_WAIT,
                         self._source):
                self._hear()
            through = link.delivered_through()
            if through is not None:
                untold[:] = [through]
            now = time.monotonic()
            if untold and now - told_at >= TELL_INTERVAL:
                self._tell("delivered", untold.pop())
                told_at = now
            self._summarise(link)

    def _summarise(self, link: Link, force: bool = False) -> None:
        """Messages the broker would not take: counted in one line a minute, not one per message."""
        if link.refused and (force or time.monotonic() - self._summary_at >= SUMMARY_INTERVAL):
            said = ", ".join(f"{count} {why}" for why, count in sorted(link.refused.items()))
            print(f"MQTT worker: messages not taken by {self._broker}: {said}", file=sys.stderr, flush=True)
            link.refused.clear()
            self._summary_at = time.monotonic()

    def _say_goodbye(self, link: Link) -> None:
        assert self._goodbye is not None
        with contextlib.suppress(Lost):
            link.publish([self._goodbye])
            deadline = time.monotonic() + STOP_WAIT
            while not link.settled() and time.monotonic() < deadline:
                link.pump(0.05)
        through = link.delivered_through()
        if through is not None:
            self._tell("delivered", through)
        self._summarise(link, force=True)
        link.close(goodbye=True)


def take_up_to(pending: deque[Row | NamedRun], room: int) -> list[Row | NamedRun]:
    """The oldest of ``pending``, ``room`` messages at most: a run that does not fit is split."""
    taken: list[Row | NamedRun] = []
    while pending and room > 0:
        size = size_of(pending[0])
        if size > room:
            run: NamedRun = pending[0]  # type: ignore[assignment]  # a row is one message: it fits
            head, pending[0] = split_run(run, room)
            taken.append(head)
            break
        taken.append(pending.popleft())
        room -= size
    return taken


def _refusal(accepted: packets.ConnAck, level: int) -> str:
    """The CONNACK's code, as MQTT names it."""
    names = _V5_REFUSALS if level == 5 else _V311_REFUSALS
    name = names.get(accepted.code, f"code {accepted.code}")
    return f"{name}: {accepted.reason}" if accepted.reason else name


_V311_REFUSALS = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorised",
}
_V5_REFUSALS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
    0x8C: "bad authentication method", 0x90: "topic name invalid", 0x95: "packet too large",
    0x97: "quota exceeded", 0x99: "payload format invalid", 0x9A: "retain not supported", 0x9B: "QoS not supported",
    0x9C: "use another server", 0x9D: "server moved", 0x9F: "connection rate exceeded",
}


def _die_with_parent() -> None:
    """Linux: be killed when the center's process dies, even if it could not close the pipe first."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # died before the wish was made
        os._exit(0)


def main() -> None:
    _die_with_parent()
    # The center stops the worker with a "stop" frame; a Ctrl-C in the terminal is for the center.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source, out = sys.stdin.fileno(), sys.stdout.fileno()
    reader = FrameReader()
    config: list[Any] = []
    while not config:
        data = os.read(source, READ_SIZE)
        if not data:
            return
        config = reader.feed(data)
    kind, settings, broker, last_will = config[0]
    assert kind == "config", kind
    worker = Worker(settings, broker, last_will, source, out, reader)
    worker.take(config[1:])
    worker.run()


if __name__ == "__main__":
    main()
