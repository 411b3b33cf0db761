"""What is published for each event: topics and JSON payloads, without any I/O.

The publisher hands events here with what it knows of the devices (a
:class:`Directory`); out come :class:`Message` records. A device the directory
does not know yet is told by :meth:`Composer.device_of`, so that the publisher
can look it up before composing, and keep the order of what it publishes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import attrs

from dtucenter.events import (
    AlarmCleared,
    AlarmRaised,
    DtuOffline,
    DtuOnline,
    Event,
    LinkUp,
    MeterFailed,
    MeterRead,
    MeterValue,
    UploadStored,
)
from dtucenter.mqtt.config import MqttSettings

#: A device as the directory knows it: its kind and its key (a PSN, a meter's or a link's name).
DeviceKey = tuple[str, int | str]
#: The account name of a device the database does not know (any more): it is still published.
UNKNOWN_ACCOUNT = "-"
#: What a placeholder's value may not bring into a topic: levels and wildcards.
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})


class Message(NamedTuple):
    """A message to publish. A tuple: at a message per value, ingest makes tens of thousands a second."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


#: A numbered message, as the backlog keeps it and the worker process takes it: (seq, topic, payload, qos, retain).
Row = tuple[int, str, bytes, int, bool]


class ValueRun(NamedTuple):
    """The messages of a DTU upload with payload = value, one per value, as one record.

    At ingest rates these are most of what is published: the center hands the worker process one record
    per upload, and each value's payload (``head``, the value, :data:`VALUE_TAIL`) is made there, off the
    center's interpreter lock. Its messages are numbered from the run's first number, in the order of
    ``values``. ``topics`` is the same tuple from one upload of a DTU to the next (:class:`_DtuNames`): it
    crosses the pipe to the worker once, then the runs name it by a number (:mod:`dtucenter.mqtt.client`).
    """

    topics: tuple[str, ...]
    head: bytes
    values: tuple[int, ...]
    qos: int
    retain: bool


#: What an event is published as: messages, and runs of them.
Published = Message | ValueRun
#: A ValueRun numbered: (first seq, topics, head, values, qos, retain).
RunRow = tuple[int, tuple[str, ...], bytes, tuple[int, ...], int, bool]
#: What goes to the worker process: a row, or a run of rows.
Entry = Row | RunRow


def size_of(entry: tuple[Any, ...]) -> int:
    """How many messages an entry (of the center or of the worker process) holds."""
    return len(entry[3]) if len(entry) == 6 else 1


#: What follows the value in a run's payloads: ``head``, the value in decimal, this.
VALUE_TAIL = b"}"


def payloads_of(head: bytes, values: tuple[int, ...]) -> list[bytes]:
    """A run's payloads, a JSON object per value."""
    return [b"%s%d%s" % (head, value, VALUE_TAIL) for value in values]


def rows_of(entry: Entry) -> list[Row]:
    """An entry's messages, each a row; a run's payloads made here."""
    if len(entry) != 6:
        return [entry]
    first, topics, head, values, qos, retain = entry
    return [(seq, topic, payload, qos, retain) for seq, topic, payload
            in zip(range(first, first + len(values)), topics, payloads_of(head, values), strict=True)]


_Named = TypeVar("_Named", str, bytes)


def split_run(run: tuple[int, tuple[_Named, ...], bytes, tuple[int, ...], int, bool], count: int
              ) -> tuple[tuple[int, tuple[_Named, ...], bytes, tuple[int, ...], int, bool],
                         tuple[int, tuple[_Named, ...], bytes, tuple[int, ...], int, bool]]:
    """A run's first ``count`` messages, and the rest (its topics as the center or the worker keeps them)."""
    first, topics, head, values, qos, retain = run
    return ((first, topics[:count], head, values[:count], qos, retain),
            (first + count, topics[count:], head, values[count:], qos, retain))


@attrs.frozen
class _DtuNames:
    """What a DTU's values are published under, while its account, register list and value count hold."""

    account: str
    registers: tuple[tuple[int, int], ...] | None
    #: The topic of each value (payload = value).
    topics: tuple[str, ...]
    #: ``"name":`` of each value, for JSON objects (payload = batch).
    keys: tuple[str, ...]


@attrs.frozen
class Extra:
    """A message that is no event of the hub (an alarm raised or cleared), published in order with them.

    ``template`` takes the same placeholders as the value topic; ``body`` is sent as JSON.
    """

    device: DeviceKey
    template: str
    body: Mapping[str, object]
    point: str = ""
    retain: bool = False
    qos: int = 1


@attrs.define
class Directory:
    """Whose each device is, and the DTUs' register lists (``(dev, addr)`` per position)."""

    accounts: dict[DeviceKey, str] = attrs.Factory(dict)
    registers: dict[int, tuple[tuple[int, int], ...]] = attrs.Factory(dict)

    def knows(self, key: DeviceKey) -> bool:
        return key in self.accounts


def topic_part(value: object) -> str:
    """A name made safe for one topic level."""
    return str(value).translate(_TOPIC_UNSAFE) or "_"


def _json_value(value: MeterValue) -> float | int | bool | None:
    # JSON has no NaN or infinity: such a reading is published as null, as the API shows it.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Composer:
    """Events to messages, after the settings' templates, QoS and payload shape."""

    def __init__(self, settings: MqttSettings) -> None:
        self._settings = settings
        self._qos = settings.qos
        self._retain = settings.retain
        #: Meters whose latest poll failed: their status is published when it changes, not per poll.
        self._failing: set[str] = set()
        self._batching = settings.payload == "batch"
        #: With payload = batch: each account's uploads and polls since the last :meth:`flush`, in order.
        self._batches: dict[str, list[str]] = {}
        #: Each DTU's topics and JSON keys as last composed: formatting a template per value shows at ingest rates.
        self._names: dict[int, _DtuNames] = {}

    def device_of(self, event: Event | Extra) -> DeviceKey | None:
        """The device whose account the directory must know to publish ``event``; None when the
        event names its account itself (alarms)."""
        if isinstance(event, UploadStored):  # first: at ingest rates nearly every event is one
            return ("dtu", event.psn)
        if isinstance(event, Extra):
            return event.device
        if isinstance(event, AlarmRaised | AlarmCleared):
            return None
        if isinstance(event, DtuOnline | DtuOffline):
            return ("dtu", event.psn)
        if isinstance(event, MeterRead | MeterFailed):
            return ("meter", event.meter)
        return ("link", event.link)

    def _topic(self, template: str, account: str, kind: str, device: object, point: object = "", rule: str = "") -> str:
        return template.format(
            account=topic_part(account), kind=kind, device=topic_part(device), point=topic_part(point),
            rule=topic_part(rule),
        )

    def center_status(self, online: bool, time: str | None) -> Message:
        """The center's own retained status: the birth message, or (without a time) its last will."""
        body: dict[str, object] = {"online": online}
        if time is not None:
            body["time"] = time
        topic = self._topic(self._settings.center_topic, "", "center", "center")
        return Message(topic, json.dumps(body).encode(), 1, True)

    def messages(self, event: Event | Extra, directory: Directory) -> list[Published]:
        """The messages of ``event``; with payload = batch, values wait for :meth:`flush` instead."""
        if isinstance(event, UploadStored) and not self._batching:  # the hot path, first
            return self._upload(event, directory.accounts.get(("dtu", event.psn), UNKNOWN_ACCOUNT),
                                directory.registers.get(event.psn))
        if isinstance(event, AlarmRaised | AlarmCleared):
            # A state, like a device's: whatever was batched before it goes first.
            return [*self.flush(), self._alarm(event)]
        key = self.device_of(event)
        assert key is not None
        account = directory.accounts.get(key, UNKNOWN_ACCOUNT)
        if self._batching:
            if isinstance(event, UploadStored | MeterRead):
                published: list[Published] = []
                if isinstance(event, MeterRead) and event.meter in self._failing:
                    self._failing.discard(event.meter)
                    published = [*self.flush(), *self._status(key, account, event.time.isoformat(), state="ok")]
                self._batch(event, account, directory)
                return published
            # Whatever comes after the values batched so far is published after them.
            return [*self.flush(), *self._messages(event, key, account, directory)]
        return self._messages(event, key, account, directory)

    def flush(self) -> list[Published]:
        """With payload = batch, a message per account with what was batched since the last flush."""
        if not self._batches:
            return []
        batches, self._batches = self._batches, {}
        return [
            Message(
                self._topic(self._settings.batch_topic, account, "", ""),
                f"[{','.join(entries)}]".encode(),
                self._qos,
                False,  # a batch is no "last value": nothing for a new subscriber to take
            )
            for account, entries in batches.items()
        ]

    def _batch(self, event: UploadStored | MeterRead, account: str, directory: Directory) -> None:
        entries = self._batches.get(account)
        if entries is None:
            entries = self._batches[account] = []
        time = event.time.isoformat()
        if isinstance(event, UploadStored):
            # Encoded by hand: at ingest rates json.dumps of a dict per upload shows in the profile.
            keys = self._dtu_names(event.psn, account, len(event.values), directory.registers.get(event.psn)).keys
            values = ",".join([f"{key}{value}" for key, value in zip(keys, event.values, strict=True)])
            entries.append(f'{{"kind":"dtu","device":"{event.psn}","time":"{time}","values":{{{values}}}}}')
        else:
            entries.append(json.dumps(
                {"kind": "meter", "device": event.meter, "time": time,
                 "values": {name: _json_value(v) for name, v in event.values.items()}},
                separators=(",", ":"),
            ))

    def _dtu_names(self, psn: int, account: str, count: int,
                   registers: tuple[tuple[int, int], ...] | None) -> _DtuNames:
        known = self._names.get(psn)
        if known is None or known.account != account or known.registers is not registers or len(known.keys) != count:
            points = self._points(tuple(range(count)), registers)
            known = self._names[psn] = _DtuNames(
                account, registers,
                topics=tuple(self._topic(self._settings.topic, account, "dtu", psn, point) for point in points),
                keys=tuple(json.dumps(point) + ":" for point in points),
            )
        return known

    @staticmethod
    def _points(values: tuple[int, ...], registers: tuple[tuple[int, int], ...] | None) -> list[str]:
        """A DTU upload's point names: ``dev-addr`` when its register list is known and fits, else positions."""
        if registers is not None and len(registers) == len(values):
            return [f"{dev}-{addr}" for dev, addr in registers]
        return [str(position) for position in range(len(values))]

    def _messages(self, event: Event | Extra, key: DeviceKey, account: str, directory: Directory
                  ) -> list[Published]:
        if isinstance(event, Extra):
            topic = self._topic(event.template, account, key[0], key[1], event.point)
            return [Message(topic, json.dumps(event.body).encode(), event.qos, event.retain)]
        if isinstance(event, UploadStored):
            return self._upload(event, account, directory.registers.get(event.psn))
        if isinstance(event, MeterRead):
            return self._poll(event, account)
        if isinstance(event, MeterFailed):
            return self._status(key, account, event.time.isoformat(), state="failing", reason=event.reason)
        if isinstance(event, DtuOnline):
            return self._status(key, account, event.time.isoformat(), online=True, peer=event.peer)
        if isinstance(event, DtuOffline):
            return self._status(key, account, event.time.isoformat(), online=False, peer=event.peer)
        if isinstance(event, LinkUp):
            return self._status(key, account, event.time.isoformat(), online=True, remote=event.remote)
        return self._status(key, account, event.time.isoformat(), online=False)

    def _alarm(self, event: AlarmRaised | AlarmCleared) -> Message:
        raised = isinstance(event, AlarmRaised)
        body: dict[str, object] = {
            "time": event.time.isoformat(), "state": "raised" if raised else "cleared", "alarm": event.alarm,
            "rule": event.rule, "kind": event.device_kind, "device": event.device, "point": event.point,
            "value": _json_value(event.value) if event.value is not None else None,
        }
        if isinstance(event, AlarmRaised):
            body["limit"] = event.limit
        body["message"] = event.message
        topic = self._topic(
            self._settings.alarm_topic, event.account, event.device_kind, event.device, event.point or "", event.rule
        )
        # Retained: the topic holds the rule's current state on that device for who subscribes later.
        return Message(topic, json.dumps(body).encode(), 1, True)

    def _upload(
        self, event: UploadStored, account: str, registers: tuple[tuple[int, int], ...] | None
    ) -> list[Published]:
        time = event.time.isoformat()
        values = event.values
        if self._settings.payload == "device":
            points = self._points(values, registers)
            body = json.dumps({"time": time, "values": dict(zip(points, values, strict=True))})
            topic = self._topic(self._settings.topic, account, "dtu", event.psn, "values")
            return [Message(topic, body.encode(), self._qos, self._retain)]
        # The hot path at ingest rates: topics kept per DTU, the payloads made by the worker (see ValueRun).
        topics = self._dtu_names(event.psn, account, len(values), registers).topics
        return [ValueRun(topics, f'{{"time":"{time}","value":'.encode(), values, self._qos, self._retain)]

    def _poll(self, event: MeterRead, account: str) -> list[Published]:
        time = event.time.isoformat()
        published: list[Published] = []
        if event.meter in self._failing:
            self._failing.discard(event.meter)
            published += self._status(("meter", event.meter), account, time, state="ok")
        values: Mapping[str, MeterValue] = event.values
        if self._settings.payload == "device":
            body = json.dumps({"time": time, "values": {name: _json_value(v) for name, v in values.items()}})
            topic = self._topic(self._settings.topic, account, "meter", event.meter, "values")
            return [*published, Message(topic, body.encode(), self._qos, self._retain)]
        for name, value in values.items():
            published.append(Message(
                self._topic(self._settings.topic, account, "meter", event.meter, name),
                json.dumps({"time": time, "value": _json_value(value)}).encode(),
                self._qos,
                self._retain,
            ))
        return published

    def _status(self, key: DeviceKey, account: str, time: str, **fields: object) -> list[Published]:
        kind, device = key
        if kind == "meter":
            failing = fields.get("state") == "failing"
            if failing and device in self._failing:
                return []  # still failing: told once per streak
            if failing:
                self._failing.add(str(device))
        topic = self._topic(self._settings.status_topic, account, kind, device)
        # Status is state, not a stream: always retained and at least once.
        return [Message(topic, json.dumps({"time": time, **fields}).encode(), 1, True)]
