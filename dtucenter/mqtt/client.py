"""The connection to the broker, as the center sees it: a worker process that owns it.

Publishing costs CPU per message (encoding, socket writes, reading the
broker's acks); in a thread of the center that CPU is taken under the center's
GIL, from ingest. So the client runs in a child process (:mod:`dtucenter.mqtt.worker`), and the reactor only
writes frames to its stdin and reads frames from its stdout
(:mod:`dtucenter.mqtt.frames`): never a blocking call, one write per reactor
turn for every message handed over in it, and the acks come back as one
"delivered up to N" per chunk read.

Towards the publisher it is what the thread was: numbered messages in order,
"delivered up to N", the connection up and down with the reason. Each batch
carries the connection it was meant for (the one the publisher last heard was
up): the worker publishes it only on that connection, so what was handed over
before the publisher heard of a drop stays the publisher's to keep. When the
worker dies (killed, crashed), the publisher hears "down" and keeps what was
not confirmed, and a new worker is started after a backoff. The worker is in
the center's process group, reads its stdin to the end and asks the kernel to
kill it when the center dies: it never outlives the center.

What is in the pipe is bounded by the publisher's ``MAX_OUTSTANDING``: beyond
that many messages not yet delivered, the publisher keeps the rest in its
backlog instead of handing them over.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.mqtt.config import Broker, MqttSettings
from dtucenter.mqtt.frames import FrameError, FrameReader, encode
from dtucenter.mqtt.messages import Entry, Message
from dtucenter.mqtt.publisher import backlog_row

log = Logger()

#: Seconds before restarting a worker that died, doubling up to RESTART_MAX; back to the first once it connected.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: Seconds a stopping center gives the worker to say goodbye and end (its own wait for acks is 5 s).
STOP_TIMEOUT = 15.0
#: Bytes of a line of the worker's stderr kept at most before its newline (a longer line is logged in parts).
MAX_ERROR_LINE = 8192
#: The directory that holds the ``dtucenter`` package.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
#: DTUs' topic sets a worker process keeps at most (eight topics each at eight values an upload).
MAX_TOPIC_SETS = 100_000


class TopicSlots:
    """The DTUs' topic sets a worker process was told, each under a slot number that its runs carry.

    A run's topics are the same tuple from one upload of the DTU to the next (the composer keeps it), so
    they cross the pipe once per worker process and the worker keeps them as PUBLISH carries them:
    pickled with each upload they were most of its bytes, and most of the worker's work per message was
    finding them again. Slots are given out in turn: past ``size`` sets, the oldest slot is given anew.
    A run whose set the worker was not told carries ``(slot, topics)`` in place of its topics, so that the
    worker learns the set where it is used, in order, even if its slot is given anew later in a frame.
    """

    def __init__(self, size: int = MAX_TOPIC_SETS) -> None:
        self._size = size
        #: id(topics) -> (slot, topics): the tuple is held, so that its id is not another's while it is here.
        self._slots: dict[int, tuple[int, tuple[str, ...]]] = {}
        self._by_slot: list[int] = []  # the id held in each slot
        self._next = 0

    def numbered(self, entries: list[Entry]) -> list[Any]:
        """``entries`` with each run's topics replaced by their slot, or by ``(slot, topics)`` if not told yet."""
        slots = self._slots
        out: list[Any] = []
        for entry in entries:
            if len(entry) != 6:
                out.append(entry)
                continue
            topics = entry[1]
            known = slots.get(id(topics))
            out.append((entry[0], known[0] if known is not None else self._give(topics), *entry[2:]))
        return out

    def _give(self, topics: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
        slot = self._next
        self._next = (slot + 1) % self._size
        if slot < len(self._by_slot):
            del self._slots[self._by_slot[slot]]
            self._by_slot[slot] = id(topics)
        else:
            self._by_slot.append(id(topics))
        given = self._slots[id(topics)] = (slot, topics)
        return given


class _WorkerProtocol(ProcessProtocol):
    """One worker process: frames out on its stdin, frames in from its stdout, its stderr logged."""

    def __init__(self, connection: BrokerConnection) -> None:
        self._connection = connection
        self._reader = FrameReader()
        self._errors = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as e:
            log.error("MQTT worker: {error}; restarting it", error=e)
            self._connection.kill()
            return
        self._connection.heard(frames)

    def errReceived(self, data: bytes) -> None:
        *lines, self._errors = (self._errors + data).split(b"\n")
        if len(self._errors) > MAX_ERROR_LINE:
            lines.append(self._errors)
            self._errors = b""
        for line in lines:
            if line.strip():
                log.warn("MQTT worker: {line}", line=line.decode(errors="replace"))

    def processEnded(self, reason: Failure) -> None:
        self.errReceived(b"\n")
        self._connection.ended(self, reason)
        self.ended.callback(None)


class BrokerConnection:
    """Keeps a worker process connected to the broker; hands it numbered messages, tells what became of them."""

    def __init__(self, settings: MqttSettings, broker: Broker, reactor: Any,
                 center_status: Callable[[bool], Message], last_will: Message) -> None:
        """``center_status(online)`` is the center's retained status, said at each connection (birth)
        and when the center stops (goodbye); the broker says ``last_will`` when the center dies."""
        self._settings = settings
        self._broker = broker
        self._reactor = reactor
        self._center_status = center_status
        self._last_will = last_will
        #: Batches handed over, not yet written (a frame a reactor turn), each with the connection it was meant for.
        self._outbox: list[tuple[int, list[Entry]]] = []
        self._flush_call: IDelayedCall | None = None
        #: The worker's connection the publisher was last told is up; 0: none.
        self._told_up = 0
        self._worker: _WorkerProtocol | None = None
        self._topics = TopicSlots()
        self._transport: Any = None
        self._restart_call: IDelayedCall | None = None
        self._restart_delay = RESTART_FIRST
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        self._kill_call: IDelayedCall | None = None
        #: Workers started, the first included (for tests and the curious).
        self.starts = 0
        self._on_up: Callable[[], None] = lambda: None
        self._on_down: Callable[[str], None] = lambda reason: None
        self._on_delivered: Callable[[int], None] = lambda seq: None

    @property
    def pid(self) -> int | None:
        """The worker's process id, while one runs."""
        return self._transport.pid if self._transport is not None else None

    def start(self, on_up: Callable[[], None], on_down: Callable[[str], None],
              on_delivered: Callable[[int], None]) -> None:
        self._on_up, self._on_down, self._on_delivered = on_up, on_down, on_delivered
        self._spawn()

    def send(self, entries: list[Entry]) -> None:
        """Publish these after everything sent before; never blocks.

        A batch is published only on the connection the publisher last heard was up: one sent
        before the publisher heard of a drop is its to keep, even if the worker has reconnected since.
        """
        self._outbox.append((self._told_up, entries))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def stop(self) -> Deferred[None]:
        """Says goodbye (the retained offline status), disconnects; fires when the worker has ended."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = Deferred()
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        if self._transport is None:
            self._stopped.callback(None)
            return self._stopped
        self._flush()
        goodbye = self._center_status(False)
        self._write(("stop", backlog_row(0, goodbye)))
        self._kill_call = self._reactor.callLater(STOP_TIMEOUT, self.kill)
        return self._stopped

    def kill(self) -> None:
        """End the worker now (it is restarted unless the center is stopping)."""
        if self._transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self._transport.signalProcess("KILL")

    # -- the worker ----------------------------------------------------------------

    def _spawn(self) -> None:
        self._restart_call = None
        self.starts += 1
        worker = self._worker = _WorkerProtocol(self)
        self._topics = TopicSlots()  # a new worker knows none
        # The worker imports this package from where the center did, installed or not.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self._transport = self._reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "dtucenter.mqtt.worker"], env=env,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        # The settings (with the broker's password) go through the pipe, never on a command line.
        will = backlog_row(0, self._last_will)
        self._write(("config", self._settings, self._broker, will))

    def _write(self, frame: tuple[object, ...]) -> None:
        if self._transport is not None:
            self._transport.write(encode(frame))

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        outbox, self._outbox = self._outbox, []
        # What was meant for no connection (the publisher never hands that over) or a dead worker is dropped:
        # the publisher heard "down" and kept it.
        batches = [(connection, self._topics.numbered(entries)) for connection, entries in outbox if connection]
        if batches:
            self._write(("send", batches))

    def heard(self, frames: list[Any]) -> None:
        """The worker's news, in order; a run of "delivered" told once, with its last number."""
        delivered = 0
        for frame in frames:
            kind = frame[0]
            if kind == "delivered":
                delivered = frame[1]
                continue
            if delivered:
                self._on_delivered(delivered)
                delivered = 0
            if kind == "up":
                self._restart_delay = RESTART_FIRST
                self._flush()  # batches for an earlier connection, before the birth of this one
                self._told_up = frame[1]
                self._write(("birth", frame[1], backlog_row(0, self._center_status(True))))
                self._on_up()
            elif kind == "down":
                self._told_up = 0
                self._on_down(frame[1])
        if delivered:
            self._on_delivered(delivered)

    def ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        if worker is not self._worker:
            return
        self._worker = self._transport = None
        self._outbox.clear()
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if self._stopping:
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        why = "ended" if reason.check(ProcessDone) else str(reason.value)
        log.warn("MQTT: the worker process {why}; starting a new one in {delay:g} s", why=why,
                 delay=self._restart_delay)
        self._told_up = 0
        self._on_down(f"the MQTT worker process {why}")
        self._restart_call = self._reactor.callLater(self._restart_delay, self._spawn)
        self._restart_delay = min(self._restart_delay * 2, RESTART_MAX)

