"""The MQTT worker process: the paho-mqtt client, off the center's process and its GIL.

Started by :class:`dtucenter.mqtt.client.BrokerConnection` as
``python -m dtucenter.mqtt.worker``; it speaks :mod:`dtucenter.mqtt.frames`
on its stdin (from the center) and stdout (to it), and writes only unexpected
trouble to stderr, which the center logs.

From the center: first ``("config", settings, broker, last_will)``, then
``("send", [(connection, rows), ...])`` (numbered messages, each batch with
the connection it was meant for), ``("birth", connection, row)`` (the
center's status, said first on a new connection) and ``("stop", row)`` (the
goodbye: said, its ack and the last messages' acks awaited, then the worker
disconnects and exits). A row is ``(seq, topic, payload, qos, retain)``.

To the center: ``("up", connection)``, ``("down", reason)`` and
``("delivered", seq)``: every message up to ``seq`` was delivered (PUBACK for
QoS 1, written to the socket for QoS 0).

A new paho client is made for each connection, so a message is never re-sent
by paho behind the center's back: what was not delivered when the connection
dropped is the center's to keep, in order, and a batch handed over for one
connection is never published on the next. The worker ends when its stdin
ends (the center is gone) without saying goodbye, so that the broker says the
center's last will; on Linux the kernel also kills it when the center dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import sys
import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from dtucenter.mqtt.config import Broker, MqttSettings
from dtucenter.mqtt.frames import FrameError, FrameReader, encode

#: Seconds before reconnecting after a failure, doubling up to RETRY_MAX.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0
#: Seconds the network loop waits for the socket when there is nothing to send.
IDLE_WAIT = 0.05
#: Seconds between "delivered" tells at most, so that acks cost the center a wake-up per batch, not per message.
TELL_INTERVAL = 0.01
#: Seconds a connection attempt has to be answered (CONNACK).
CONNECT_TIMEOUT = 10.0
#: QoS 1 messages on their way at once; paho queues more and sends them as acks come.
MAX_INFLIGHT = 1000
#: Seconds a stopping center waits for its last messages' acks.
STOP_WAIT = 5.0
#: Bytes read from the center's pipe at a time.
READ_SIZE = 1 << 20

#: A message as the center hands it over: (seq, topic, payload, qos, retain).
Row = tuple[int, str, bytes, int, bool]


class Worker:
    """Keeps a connection to the broker, publishes what the center sends, tells what became of it."""

    def __init__(self, settings: MqttSettings, broker: Broker, last_will: Row, out: int) -> None:
        self._settings = settings
        self._broker = broker
        self._last_will = last_will
        self._out = out
        #: What the center sent, appended by the reading thread: ("send", connection, rows) or
        #: ("birth", connection, row).
        self._inbox: deque[tuple[str, int, Any]] = deque()
        self._goodbye: Row | None = None
        self._stopping = threading.Event()
        #: The connection being served, counted from 1.
        self._connection = 0
        # Per connection.
        self._connack: ReasonCode | None = None
        self._connected = False
        self._waiting: dict[int, int] = {}  # mid -> seq, not yet delivered
        self._order: deque[int] = deque()  # seqs in the order published
        self._done: set[int] = set()  # seqs delivered out of order, ahead of an older one

    # -- the reading thread ------------------------------------------------------

    def read(self, source: int, reader: FrameReader) -> None:
        """Takes the center's frames until it says stop; exits the process when the center is gone."""
        while True:
            data = os.read(source, READ_SIZE)
            if not data:
                # The center is gone without a goodbye: no DISCONNECT, so that the broker says the last will.
                os._exit(0)
            try:
                frames = reader.feed(data)
            except FrameError as e:
                print(f"MQTT worker: {e}", file=sys.stderr, flush=True)
                os._exit(2)
            if not self.take(frames):
                return

    def take(self, frames: list[Any]) -> bool:
        """Hands the center's frames to the network loop; False once it said stop."""
        for frame in frames:
            if frame[0] == "send":
                for connection, rows in frame[1]:
                    self._inbox.append(("send", connection, rows))
            elif frame[0] == "birth":
                self._inbox.append(("birth", frame[1], frame[2]))
            elif frame[0] == "stop":
                self._goodbye = frame[1]
                self._stopping.set()
                return False
        return True

    # -- the network loop (the main thread) --------------------------------------

    def _tell(self, *frame: object) -> None:
        data = encode(frame)
        while data:
            data = data[os.write(self._out, data):]

    def _client(self) -> paho.Client:
        settings = self._settings
        if settings.version == "5":
            client = paho.Client(CallbackAPIVersion.VERSION2, settings.client_id, protocol=paho.MQTTv5)
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, settings.client_id, clean_session=True, protocol=paho.MQTTv311
            )
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        if self._broker.tls:
            client.tls_set(ca_certs=settings.ca, certfile=settings.cert, keyfile=settings.key)
        _, topic, payload, qos, retain = self._last_will
        client.will_set(topic, payload, qos, retain)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._connected_cb
        client.on_disconnect = self._disconnected_cb
        client.on_publish = self._published_cb
        return client

    def _connected_cb(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                      properties: Any) -> None:
        self._connack = reason

    def _disconnected_cb(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                         properties: Any) -> None:
        self._connected = False

    def _published_cb(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                      properties: Any) -> None:
        seq = self._waiting.pop(mid, None)
        if seq is not None:
            self._done.add(seq)

    def _answer(self) -> ReasonCode | None:
        """The CONNACK's reason, once the client's callback has it."""
        return self._connack

    def _delivered_through(self) -> int | None:
        """The seq through which everything published on this connection was delivered, if it moved."""
        through = None
        order, done = self._order, self._done
        while order and order[0] in done:
            through = order.popleft()
            done.discard(through)
        return through

    def run(self) -> None:
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            reason = self._connect_and_serve()
            if self._stopping.is_set():
                break
            self._tell("down", reason)
            self._stopping.wait(delay)
            delay = min(delay * 2, RETRY_MAX)
            if reason == "":
                delay = RETRY_FIRST

    def _connect_and_serve(self) -> str:
        """One connection, from connecting to its end; returns why it ended ("" once it had served)."""
        client = self._client()
        self._connack = None
        self._connected = False
        self._waiting.clear()
        self._order.clear()
        self._done.clear()
        try:
            client.connect(self._broker.host, self._broker.port, self._settings.keepalive)
            waited = 0.0
            while self._answer() is None and waited < CONNECT_TIMEOUT and not self._stopping.is_set():
                if client.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                waited += 0.1
        except (OSError, ssl.SSLError, ValueError) as e:
            _close(client)
            return f"cannot connect to {self._broker}: {e}"
        answer = self._answer()
        if answer is None or answer.is_failure:
            refused = f"refused ({answer})" if answer is not None else "no answer"
            _close(client)
            return f"{self._broker}: {refused}"
        self._connected = True
        self._connection += 1
        self._tell("up", self._connection)
        lost = self._serve(client)
        if self._stopping.is_set():
            self._say_goodbye(client)
            return ""
        _close(client)
        return lost

    def _serve(self, client: paho.Client) -> str:
        untold: list[int] = []  # delivered through, not yet told
        try:
            return self._publish_what_comes(client, untold)
        finally:
            if untold:  # before the center hears the connection is gone, and keeps what was not delivered
                self._tell("delivered", untold[-1])

    def _publish_what_comes(self, client: paho.Client, untold: list[int]) -> str:
        inbox, pending = self._inbox, deque[Row]()
        told_at = 0.0
        while self._connected and not self._stopping.is_set():
            while inbox:
                kind, connection, rows = inbox.popleft()
                if connection != self._connection:
                    continue  # meant for an earlier connection: the center kept it
                if kind == "birth":  # the center's status, before anything it sends after hearing "up"
                    _, topic, payload, qos, retain = rows
                    client.publish(topic, payload, qos, retain)
                else:
                    pending.extend(rows)
            while pending and len(self._waiting) < MAX_INFLIGHT:  # else read the acks before paho's queue grows
                seq, topic, payload, qos, retain = pending.popleft()
                info = client.publish(topic, payload, qos, retain)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return f"{self._broker}: publishing failed: {paho.error_string(info.rc)}"
                self._waiting[info.mid] = seq
                self._order.append(seq)
            # Acks are told at most every TELL_INTERVAL: each tell wakes the center's reactor up.
            rc = client.loop(0 if pending or inbox else TELL_INTERVAL if untold else IDLE_WAIT)
            through = self._delivered_through()
            if through is not None:
                untold[:] = [through]
            if untold and time.monotonic() - told_at >= TELL_INTERVAL:
                self._tell("delivered", untold.pop())
                told_at = time.monotonic()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return f"{self._broker}: connection lost: {paho.error_string(rc)}"
        return f"{self._broker}: connection lost"

    def _say_goodbye(self, client: paho.Client) -> None:
        assert self._goodbye is not None
        _, topic, payload, qos, retain = self._goodbye
        info = client.publish(topic, payload, qos, retain)
        waited = 0.0
        while (self._waiting or not info.is_published()) and waited < STOP_WAIT and self._connected:
            client.loop(0.05)
            waited += 0.05
        through = self._delivered_through()
        if through is not None:
            self._tell("delivered", through)
        client.disconnect()
        client.loop(0.1)


def _close(client: paho.Client) -> None:
    with contextlib.suppress(OSError):
        client.disconnect()


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
    worker = Worker(settings, broker, last_will, out)
    if worker.take(config[1:]):  # else told to stop before it started
        threading.Thread(target=worker.read, args=(source, reader), name="mqtt-read", daemon=True).start()
    worker.run()


if __name__ == "__main__":
    main()
