"""What happened in the center, told to whoever listens: the console's live view, MQTT, alarms, metrics.

The DTU and Modbus halves publish plain records here as things happen; the
integrations subscribe. It is a leaf module, like :mod:`dtucenter.isotime`:
the protocol packages import it and nothing of theirs is imported here, so
listeners depend on the event records, never on the code that made them.

Publishing is on the hot path (an :class:`UploadStored` per acknowledged
upload), so a publisher asks :attr:`EventHub.listening` first and builds no
record when nobody listens. Listeners are called synchronously in the
reactor thread, in subscription order: they must be quick and must not
block (queue the work, batch it, hand it to a thread). One that raises is
logged and the others still hear the event; the publisher never sees the
error.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping

import attrs
from twisted.logger import Logger

log = Logger()

#: A value as the Modbus poller scales it.
MeterValue = float | int | bool


@attrs.frozen
class DtuOnline:
    """A binary-protocol DTU logged in."""

    psn: int
    peer: str
    time: dt.datetime


@attrs.frozen
class DtuOffline:
    """A logged-in DTU's connection went away (or was replaced: then ``DtuOnline`` came first)."""

    psn: int
    peer: str
    time: dt.datetime


@attrs.frozen
class UploadStored:
    """A DTU upload committed to the store (and so acknowledged): its values in upload order."""

    psn: int
    time: dt.datetime
    values: tuple[int, ...]


@attrs.frozen
class MeterRead:
    """A poll of a meter read these points (scaled values, by point name)."""

    meter: str
    time: dt.datetime
    values: Mapping[str, MeterValue]


@attrs.frozen
class MeterFailed:
    """A poll of a meter failed, wholly or for some of its blocks."""

    meter: str
    time: dt.datetime
    reason: str


@attrs.frozen
class LinkUp:
    """A Modbus link got a connection (``remote`` is its peer, or its serial device)."""

    link: str
    remote: str
    time: dt.datetime


@attrs.frozen
class LinkDown:
    link: str
    time: dt.datetime


@attrs.frozen
class AlarmRaised:
    """An alarm rule's condition held (for its delay): stored, then published here.

    ``device_kind`` is ``dtu``, ``meter`` or ``link``; ``device`` its name (a DTU's PSN as
    text); ``point`` the meter point's name or the DTU's position (or ``dev-addr``), None for
    a device rule (offline, failing polls). ``value`` is what crossed ``limit`` (None for a
    device rule); ``alarm`` the stored alarm's id.
    """

    alarm: int
    account: str
    rule: str
    device_kind: str
    device: str
    point: str | None
    value: float | None
    limit: float | None
    message: str
    time: dt.datetime


@attrs.frozen
class AlarmCleared:
    """A raised alarm's condition ended (for its clearing delay), or its rule went away."""

    alarm: int
    account: str
    rule: str
    device_kind: str
    device: str
    point: str | None
    value: float | None
    message: str
    time: dt.datetime


Event = (
    DtuOnline | DtuOffline | UploadStored | MeterRead | MeterFailed | LinkUp | LinkDown | AlarmRaised | AlarmCleared
)
Listener = Callable[[Event], None]


class EventHub:
    """Fans each published event out to the listeners of the moment."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()

    @property
    def listening(self) -> bool:
        """Whether anyone listens: a publisher builds no event otherwise."""
        return bool(self._listeners)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Hear every event from now on; returns the call that stops it (safe to call twice)."""
        self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            self._listeners = tuple(known for known in self._listeners if known is not listener)

        return unsubscribe

    def publish(self, event: Event) -> None:
        # A tuple replaced, never changed in place: a listener may (un)subscribe while hearing.
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.failure("A listener failed on {event_type}", event_type=type(event).__name__)
