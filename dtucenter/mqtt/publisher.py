"""The MQTT publisher: hears the event hub, keeps order, and keeps what the broker cannot take yet.

Events are composed into messages FLUSH_INTERVAL (5 ms) at most after they are
heard, all of them at once (one hand-over for every upload of those 5 ms, not
one per value or per reactor turn). Each message gets the next sequence number
and goes one of two ways:

- *direct*: the broker is up and nothing waits in the backlog: to the
  connection (:mod:`dtucenter.mqtt.client`, a worker process), remembered as
  outstanding until the connection says it was delivered;
- *backlog*: the broker is down, or messages still wait in the database, or
  too many are outstanding: appended to the persistent backlog
  (:class:`Backlog`, the store's ``mqtt_backlog`` table), which is drained
  in sequence order once the broker is back, a batch at a time, each batch
  deleted only once delivered. The publisher returns to *direct* when a
  drain finds the backlog empty with nothing appended since.

When the connection drops, the outstanding messages that are not already in
the backlog are appended to it: they are older than anything appended after,
and the backlog is read in sequence order, so nothing is lost and the order
holds (a message delivered just before the drop may be sent twice: QoS 1 is
at least once). The backlog is bounded: once full, newer messages are
dropped, counted, and summarised in the log once a minute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.events import Event, EventHub
from dtucenter.mqtt.config import MqttSettings
from dtucenter.mqtt.messages import (
    UNKNOWN_ACCOUNT,
    Composer,
    DeviceKey,
    Directory,
    Entry,
    Extra,
    Message,
    Published,
    Row,
    ValueRun,
    rows_of,
    size_of,
)

log = Logger()

#: A message as the backlog keeps it: (seq, topic, payload, qos, retain).
BacklogRow = Row
#: Devices' account names and DTUs' register lists, as the database tells them.
Found = tuple[dict[DeviceKey, str], dict[int, tuple[tuple[int, int], ...]]]
#: Devices looked up in one read at most (a database's limit on a statement's parameters is far above).
LOOK_UP_BATCH = 1000
#: Seconds before looking devices up again after the database failed to answer.
LOOK_UP_RETRY = 1.0
#: Messages handed to the connection and not yet delivered, at most; more go to the backlog.
MAX_OUTSTANDING = 50_000
#: Messages read from the backlog at a time when draining it.
DRAIN_BATCH = 2_000
#: Seconds between the log lines that say how many messages the full backlog dropped.
SUMMARY_INTERVAL = 60.0
#: Seconds what is heard waits at most before it is composed and handed over. At a few thousand uploads a
#: second a turn of the event loop carries one or two, and each hand-over costs a composition, a frame, a
#: write to the worker's pipe and a wake-up of the worker: a hand-over per turn made MQTT cost the center
#: half again as much per upload at 2,000 a second as at 8,000 (docs/performance.md, "MQTT").
FLUSH_INTERVAL = 0.005


class Backlog(Protocol):
    """What the publisher needs from the database (implemented by ``store/outbox.py``'s ``MqttOutbox``).

    Appends, reads and removals are run in the order they are asked for.
    """

    def state(self) -> Deferred[tuple[int, int]]:
        """How many messages wait, and the highest sequence number ever kept (0 if none)."""

    def append(self, rows: list[BacklogRow]) -> Deferred[None]: ...

    def oldest(self, limit: int) -> Deferred[list[BacklogRow]]:
        """The ``limit`` lowest-numbered waiting messages, after every append asked for before."""

    def remove_through(self, seq: int) -> Deferred[int]:
        """Forget the messages numbered up to ``seq``; fires with how many there were."""

    def directory(self) -> Deferred[Found]:
        """Every DTU's, meter's and link's account name, and the DTUs' register lists."""

    def devices(self, keys: list[DeviceKey]) -> Deferred[Found]:
        """As :meth:`directory`, for these devices only (those the database does not know are left out)."""


class Connection(Protocol):
    """What the publisher needs from the broker's connection (``client.BrokerConnection``)."""

    def start(self, on_up: Callable[[], None], on_down: Callable[[str], None],
              on_delivered: Callable[[int], None]) -> None: ...

    def send(self, entries: list[Entry]) -> None:
        """Publish these numbered messages (rows, and runs of rows) after everything sent before."""

    def stop(self) -> Deferred[None]: ...


@attrs.define
class PublisherStats:
    published: int = 0
    delivered: int = 0
    backlogged: int = 0
    dropped: int = 0
    connections: int = 0


class MqttPublisher(Service):
    """Subscribes to the hub once started; see the module's docstring for the ways a message goes."""

    def __init__(self, settings: MqttSettings, events: EventHub, backlog: Backlog, connection: Connection,
                 composer: Composer, clock: IReactorTime, devices_known: Callable[[], Deferred[Any]] | None = None,
                 ) -> None:
        """``devices_known``: fires once the database holds the devices of the config file (they are
        imported at start), so that the first events are published under their accounts."""
        self._settings = settings
        self._hub = events
        self._backlog = backlog
        self._connection = connection
        self._clock = clock
        self._devices_known = devices_known
        self.composer = composer
        self.directory = Directory()
        self.stats = PublisherStats()
        self._heard: deque[Event | Extra] = deque()
        self._flush_call: IDelayedCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._ready = False
        self._next_seq = 1
        self._waiting = 0  # messages in the backlog, as far as this process knows
        self._direct = False
        self._broker_up = False
        #: Messages handed to the connection, not yet delivered, in order: rows, and runs of rows.
        self._outstanding: deque[Entry] = deque()
        #: How many messages those are, and the number through which the connection said all were delivered.
        self._outstanding_messages = 0
        self._through = 0
        #: Whether those are in the backlog already (being drained), so not appended again when the connection
        #: drops. Never a mix: a drain starts only when nothing is outstanding, and direct publishing only once a
        #: drain found the backlog empty.
        self._outstanding_kept = False
        self._draining = False
        self._drain_through = 0
        self._appends = 0  # appends asked for, to tell whether one came after a drain's read
        self._looking_up: Deferred[Any] | None = None  # a look-up of devices not in the directory
        self._look_up_retry: IDelayedCall | None = None  # the next attempt after a look-up failed
        self._refresh = LoopingCall(self._reload)
        self._refresh.clock = clock
        self._dropped_unreported = 0
        self._summary_call: IDelayedCall | None = None
        #: Whether the broker's absence was logged: once per outage, and once before the first connection.
        self._absence_logged = False
        #: Why the broker is away (refused, unreachable, connection lost), or None while connected.
        self.problem: str | None = None

    @property
    def connection(self) -> Connection:
        """The broker's connection it publishes through."""
        return self._connection

    @property
    def connected(self) -> bool:
        """Whether the broker is connected, as the connection last told."""
        return self._broker_up

    @property
    def waiting(self) -> int:
        """Messages in the backlog, as far as this process knows (appended, not yet delivered and removed)."""
        return self._waiting

    @property
    def outstanding(self) -> int:
        """Messages handed to the connection whose delivery it has not told yet."""
        return self._outstanding_messages

    # -- life --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Heard from now on, composed once the backlog's state and the directory are read.
        self._unsubscribe = self._hub.subscribe(self._hear)
        known = self._devices_known() if self._devices_known is not None else succeed(None)
        # A failed import is logged by its owner; the directory is read anyway.
        known.addErrback(lambda _: None).addCallback(lambda _: self._backlog.state()).addCallbacks(
            self._started, self._start_failed
        )

    def _started(self, state: tuple[int, int]) -> None:
        if not self.running:
            return  # stopped before the database answered
        self._waiting, highest = state
        self._next_seq = highest + 1
        if self._waiting:
            log.info("MQTT: {count} messages wait in the backlog from before", count=self._waiting)
        self._refresh.start(self._settings.refresh, now=True)
        self._connection.start(self._came_up, self._went_down, self._delivered)

    def _start_failed(self, failure: Failure) -> None:
        log.failure("MQTT: could not read the backlog's state; not publishing", failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._refresh.running:
            self._refresh.stop()
        for call in (self._flush_call, self._summary_call, self._look_up_retry):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._summary_call = self._look_up_retry = None
        self._report_dropped()
        # Kept now, while the store (stopped after this service) still takes writes: what was heard, and
        # what was handed over without word of its delivery (sent again at the next start if it was).
        if self._ready:
            self._compose()
        self._keep_outstanding()
        return self._connection.stop()

    # -- hearing and composing ---------------------------------------------------

    def publish_extra(self, extra: Extra) -> None:
        """Publish what is no event of the hub (alarms raised and cleared), in order with the events,
        through the same backlog. Call it in the reactor thread; it never blocks."""
        if self.running:
            self._hear(extra)

    def _hear(self, event: Event | Extra) -> None:
        self._heard.append(event)
        if self._flush_call is None and self._ready:
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        self._compose()

    def _compose(self) -> None:
        heard, composer, directory = self._heard, self.composer, self.directory
        messages: list[Published] = []
        while heard:
            event = heard[0]
            key = composer.device_of(event)
            if key is not None and not directory.knows(key):
                # Published in order: this one, and all after it, wait for the look-up.
                self._look_up(key)
                break
            heard.popleft()
            messages += composer.messages(event, directory)
        messages += composer.flush()
        if messages:
            self._route(messages)

    def _route(self, messages: list[Published]) -> None:
        entries: list[Entry] = []
        seq = first = self._next_seq
        for message in messages:
            entries.append((seq, *message))  # a Message numbered is a row, a ValueRun a run of them
            seq += len(message.values) if isinstance(message, ValueRun) else 1
        count = seq - first
        self._next_seq = seq
        self.stats.published += count
        if self._direct and self._outstanding_messages + count <= MAX_OUTSTANDING:
            self._outstanding.extend(entries)
            self._outstanding_messages += count
            self._outstanding_kept = False
            self._connection.send(entries)
            return
        self._direct = False
        self._keep([row for entry in entries for row in rows_of(entry)])

    # -- the directory -----------------------------------------------------------

    def _look_up(self, key: DeviceKey) -> None:
        """Look up every device waiting events name that the directory does not know, in one read:
        a fleet enrolling at once costs a few reads, not one per DTU (nor a whole directory each)."""
        if self._looking_up is not None:
            return
        device_of, knows = self.composer.device_of, self.directory.knows
        others = {device for device in map(device_of, self._heard) if device is not None and not knows(device)} - {key}
        unknown = {key, *sorted(others, key=repr)[: LOOK_UP_BATCH - 1]}
        # Set before the callbacks are added: they may run at once, and they clear it.
        looking_up = self._looking_up = self._backlog.devices(sorted(unknown, key=repr))
        looking_up.addCallbacks(self._looked_up, self._look_up_failed, (unknown,))

    def _looked_up(self, found: Found, unknown: set[DeviceKey]) -> None:
        self._looking_up = None
        accounts, registers = found
        self.directory.accounts.update(accounts)
        self.directory.registers.update(registers)
        for key in unknown - accounts.keys():
            # Gone from the database (deleted meanwhile): published under the unknown account.
            self.directory.accounts[key] = UNKNOWN_ACCOUNT
        self._compose()

    def _look_up_failed(self, failure: Failure) -> None:
        self._looking_up = None
        log.failure("MQTT: could not look up devices' accounts; trying again in {delay:g} s", failure,
                    delay=LOOK_UP_RETRY)
        self._look_up_retry = self._clock.callLater(LOOK_UP_RETRY, self._retry_look_up)

    def _retry_look_up(self) -> None:
        self._look_up_retry = None
        self._compose()

    def _reload(self) -> Deferred[None]:
        def loaded(found: Found) -> None:
            self.directory = Directory(*found)
            if not self._ready:
                self._ready = True
                self._compose()

        def failed(failure: Failure) -> None:
            log.failure("MQTT: could not read the devices' accounts", failure)

        return self._backlog.directory().addCallbacks(loaded, failed)

    # -- the backlog -------------------------------------------------------------

    def _keep(self, rows: list[BacklogRow]) -> None:
        room = self._settings.backlog - self._waiting
        if len(rows) > room:
            dropped = len(rows) - max(room, 0)
            rows = rows[: max(room, 0)]
            self._dropped(dropped)
        if not rows:
            return
        self._waiting += len(rows)
        self._appends += 1
        self.stats.backlogged += len(rows)
        self._backlog.append(rows).addErrback(
            lambda f: log.failure("MQTT: could not keep {count} messages in the backlog", f, count=len(rows))
        )
        self._drain()

    def _dropped(self, count: int) -> None:
        self.stats.dropped += count
        if self._summary_call is None:
            log.warn(
                "MQTT: the backlog is full ({limit} messages): dropped {count}; more drops are summarised"
                " every {interval:g} s",
                limit=self._settings.backlog, count=count, interval=SUMMARY_INTERVAL,
            )
            self._summary_call = self._clock.callLater(SUMMARY_INTERVAL, self._summarise)
        else:
            self._dropped_unreported += count

    def _summarise(self) -> None:
        self._summary_call = None
        if self._report_dropped():
            self._summary_call = self._clock.callLater(SUMMARY_INTERVAL, self._summarise)

    def _report_dropped(self) -> bool:
        count, self._dropped_unreported = self._dropped_unreported, 0
        if count:
            log.warn(
                "MQTT: the backlog is full: dropped {count} more messages ({total} since start)",
                count=count, total=self.stats.dropped,
            )
        return bool(count)

    def _drain(self) -> None:
        """Read the next batch of the backlog, unless one is on its way or older messages are outstanding."""
        if self._direct or self._draining or not self._broker_up or self._outstanding or not self.running:
            return
        self._draining = True
        appends = self._appends
        self._backlog.oldest(DRAIN_BATCH).addCallbacks(self._read_batch, self._drain_failed, (appends,))

    def _read_batch(self, rows: list[BacklogRow], appends: int) -> None:
        if not self._broker_up or not self.running:
            self._draining = False
            return
        if not rows:
            self._draining = False
            if appends == self._appends:
                self._waiting = 0
                self._direct = True
            else:
                self._drain()
            return
        self._drain_through = rows[-1][0]
        self._outstanding.extend(rows)
        self._outstanding_messages += len(rows)
        self._outstanding_kept = True
        self._connection.send(list(rows))

    def _drain_failed(self, failure: Failure) -> None:
        self._draining = False
        log.failure("MQTT: could not read the backlog", failure)

    # -- the connection's news (in the reactor thread) ---------------------------

    def _came_up(self) -> None:
        self.stats.connections += 1
        self._absence_logged = False
        self.problem = None
        log.info("MQTT: connected to the broker; {count} messages wait in the backlog", count=self._waiting)
        self._broker_up = True
        self._drain()

    def _went_down(self, reason: str) -> None:
        self.problem = reason
        if not self._absence_logged:
            log.warn("MQTT: {reason}; keeping messages in the backlog until the broker is back", reason=reason)
            self._absence_logged = True
        self._broker_up = False
        self._direct = False
        self._draining = False
        self._keep_outstanding()

    def _keep_outstanding(self) -> None:
        """What was handed over without word of its delivery goes to the backlog, unless it is there already."""
        left, self._outstanding = self._outstanding, deque()
        self._outstanding_messages = 0
        if left and not self._outstanding_kept:
            # A run may have been delivered in part.
            self._keep([row for entry in left for row in rows_of(entry) if row[0] > self._through])

    def _delivered(self, seq: int) -> None:
        outstanding, through = self._outstanding, self._through
        count = 0
        while outstanding:
            entry = outstanding[0]
            # The entry's messages not counted before (a run may have been delivered in part), through seq.
            first, last = max(entry[0], through + 1), entry[0] + size_of(entry) - 1
            if last > seq:  # a run delivered in part, or not yet delivered
                count += max(seq - first + 1, 0)
                break
            count += max(last - first + 1, 0)
            outstanding.popleft()
        self._through = max(through, seq)
        self._outstanding_messages -= count
        self.stats.delivered += count
        if self._draining and seq >= self._drain_through:
            self._draining = False
            self._backlog.remove_through(self._drain_through).addCallbacks(self._removed, self._remove_failed)
            self._drain()
        elif not outstanding and not self._direct:
            self._drain()

    def _removed(self, count: int) -> None:
        self._waiting = max(self._waiting - count, 0)

    def _remove_failed(self, failure: Failure) -> None:
        log.failure("MQTT: could not remove delivered messages from the backlog", failure)


def backlog_row(seq: int, message: Message) -> BacklogRow:
    """A numbered message as the backlog keeps it (and the worker process gets it)."""
    return (seq, message.topic, message.payload, message.qos, message.retain)


