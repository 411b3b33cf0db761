"""The connection to the broker: a paho-mqtt client owned by a thread of its own.

The reactor thread never touches the client nor waits for the broker: it
appends numbered messages to :meth:`BrokerConnection.send`'s inbox (a deque,
appended to without a lock) and hears back through ``callFromThread``: the
connection came up, went down (and why), and the number of the last message
that every message up to was delivered (PUBACK for QoS 1, written to the
socket for QoS 0). The thread runs the client's network loop itself and makes
a new client for each connection, so a message is never re-sent by paho
behind the publisher's back: what was not delivered when the connection
dropped is the publisher's to keep, in order, and a batch handed over for
one connection is never published on the next.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dtucenter.mqtt.config import Broker, MqttSettings
from dtucenter.mqtt.messages import Message

log = Logger()

#: Seconds before reconnecting after a failure, doubling up to RETRY_MAX.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0
#: Seconds the network loop waits for the socket when there is nothing to send.
IDLE_WAIT = 0.05
#: Seconds a connection attempt has to be answered (CONNACK).
CONNECT_TIMEOUT = 10.0
#: QoS 1 messages on their way at once; paho queues more and sends them as acks come.
MAX_INFLIGHT = 1000
#: Seconds a stopping center waits for its last messages' acks.
STOP_WAIT = 5.0

Numbered = tuple[int, Message]


class BrokerConnection:
    """Keeps a connection to the broker, publishes what it is given, tells what became of it."""

    def __init__(self, settings: MqttSettings, broker: Broker, reactor: Any,
                 center_status: Callable[[bool], Message], last_will: Message) -> None:
        """``center_status(online)`` is the center's retained status, said at each connection (birth)
        and when the center stops (goodbye); the broker says ``last_will`` when the center dies."""
        self._settings = settings
        self._broker = broker
        self._reactor = reactor
        self._center_status = center_status
        self._last_will = last_will
        #: Batches to publish, each with the connection it was meant for (see :meth:`send`).
        self._inbox: deque[tuple[int, list[Numbered]]] = deque()
        #: The connection the publisher was last told is up (reactor thread); 0: none.
        self._told_up = 0
        #: The connection being served (network thread), counted from 1.
        self._connection = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        # Set by start(): the publisher's ears, called in the reactor thread.
        self._on_up: Callable[[], None] = lambda: None
        self._on_down: Callable[[str], None] = lambda reason: None
        self._on_delivered: Callable[[int], None] = lambda seq: None
        # The network thread's own state, per connection.
        self._connack: ReasonCode | None = None
        self._connected = False
        self._waiting: dict[int, int] = {}  # mid -> seq, not yet delivered
        self._order: deque[int] = deque()  # seqs in the order published
        self._done: set[int] = set()  # seqs delivered out of order, ahead of an older one

    # -- the reactor thread ------------------------------------------------------

    def start(self, on_up: Callable[[], None], on_down: Callable[[str], None],
              on_delivered: Callable[[int], None]) -> None:
        self._on_up, self._on_down, self._on_delivered = on_up, on_down, on_delivered
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def send(self, messages: list[Numbered]) -> None:
        """Publish these after everything sent before; never blocks.

        A batch is published only on the connection the publisher last heard was up: one sent
        before the publisher heard of a drop is its to keep, even if the thread has reconnected since.
        """
        self._inbox.append((self._told_up, messages))

    def _up(self, connection: int) -> None:
        self._told_up = connection
        self._on_up()

    def _down(self, reason: str) -> None:
        self._told_up = 0
        self._on_down(reason)

    def stop(self) -> Deferred[None]:
        """Says goodbye (the retained offline status), disconnects; fires when the thread has ended."""
        if self._stopped is None:
            self._stopped = Deferred()
            self._stopping.set()
            if self._thread is None:
                self._stopped.callback(None)
        return self._stopped

    # -- the network thread ------------------------------------------------------

    def _tell(self, call: Callable[..., None], *args: object) -> None:
        self._reactor.callFromThread(call, *args)

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
        will = self._last_will
        client.will_set(will.topic, will.payload, will.qos, will.retain)
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

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stopping.is_set():
            reason = self._connect_and_serve()
            if self._stopping.is_set():
                break
            self._tell(self._down, reason)
            self._stopping.wait(delay)
            delay = min(delay * 2, RETRY_MAX)
            if reason == "":
                delay = RETRY_FIRST
        if self._stopped is not None:
            self._tell(self._stopped.callback, None)

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
        birth = self._center_status(True)
        client.publish(birth.topic, birth.payload, birth.qos, birth.retain)
        self._connection += 1
        self._tell(self._up, self._connection)
        lost = self._serve(client)
        if self._stopping.is_set():
            self._say_goodbye(client)
            return ""
        _close(client)
        return lost

    def _serve(self, client: paho.Client) -> str:
        inbox, pending = self._inbox, deque[Numbered]()
        while self._connected and not self._stopping.is_set():
            while inbox:
                connection, batch = inbox.popleft()
                if connection == self._connection:  # else meant for an earlier connection: the publisher kept it
                    pending.extend(batch)
            while pending and len(self._waiting) < MAX_INFLIGHT:  # else read the acks before paho's queue grows
                seq, message = pending.popleft()
                info = client.publish(message.topic, message.payload, message.qos, message.retain)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return f"{self._broker}: publishing failed: {paho.error_string(info.rc)}"
                self._waiting[info.mid] = seq
                self._order.append(seq)
            rc = client.loop(0 if pending or inbox else IDLE_WAIT)
            through = self._delivered_through()
            if through is not None:
                self._tell(self._on_delivered, through)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return f"{self._broker}: connection lost: {paho.error_string(rc)}"
        return f"{self._broker}: connection lost"

    def _say_goodbye(self, client: paho.Client) -> None:
        goodbye = self._center_status(False)
        info = client.publish(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain)
        waited = 0.0
        while (self._waiting or not info.is_published()) and waited < STOP_WAIT and self._connected:
            client.loop(0.05)
            waited += 0.05
        through = self._delivered_through()
        if through is not None:
            self._tell(self._on_delivered, through)
        client.disconnect()
        client.loop(0.1)


def _close(client: paho.Client) -> None:
    with contextlib.suppress(OSError):
        client.disconnect()
