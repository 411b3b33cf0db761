"""The Modbus bridge's sink: poll results into the store, never blocking the reactor.

Values go to the store's row queue, so the values of every meter polled
while a commit runs share the next transaction: a thousand meters a second
cost a few commits a second, not a thousand. What changes on every poll but
only matters as its latest value (a meter's last poll, last error, whether
it is failing) is kept in memory and written every ``state_interval``
seconds, and at shutdown, one UPDATE per meter that changed.

Failures are stored as streaks, not per poll: consecutive failed polls of a
meter with the same reason are one row with the first and last time and a
count. A successful poll or another reason ends the streak.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.isotime import utc_from_seconds as utc
from dtucenter.isotime import utc_now
from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings
from dtucenter.modbus.points import Point, Value
from dtucenter.store import links as device_links
from dtucenter.store import meters
from dtucenter.store.facade import METER_SAMPLES, Store

log = Logger()


def point_spec(point: Point) -> dict[str, Any]:
    """A point as the meters table and the API show it."""
    spec: dict[str, Any] = {
        "name": point.name, "table": point.table.value, "address": point.address, "type": point.type.value,
    }
    if point.type.registers > 1:
        spec["word_order"] = point.word_order.value
    spec["scale"] = point.scale
    spec["unit"] = point.unit
    spec["writable"] = point.table.writable
    return spec


def meter_spec(meter: MeterSettings) -> dict[str, Any]:
    """A configured meter as ``meters.sync_meters`` takes it."""
    return {"name": meter.name, "link": meter.link, "unit": meter.unit, "interval": meter.interval,
            "points": [point_spec(p) for p in meter.points], "definition": json.dumps(meter.table())}


def link_spec(link: LinkSettings) -> dict[str, Any]:
    """A configured link as ``links.sync_links`` takes it."""
    return {"name": link.name, "definition": json.dumps(link.table()), "registration": link.registration}


def sync_file_devices(
    session: Session, link_specs: list[dict[str, Any]], meter_specs: list[dict[str, Any]], now: dt.datetime,
) -> tuple[int, int, int, int]:
    """Import the file's links and meters, marked file-managed, in one transaction: at start, and
    at each reload. The API's meters on a link the file dropped stop with it, as when the API
    deletes a link. Returns how many links were added and removed, meters added and retired."""
    links_added, links_removed = device_links.sync_links(session, link_specs, now)
    added, retired = meters.sync_meters(session, meter_specs, now)
    for link in links_removed:
        meters.retire_link_meters(session, link)
    return links_added, len(links_removed), added, retired


@attrs.define(eq=False)
class _Streak:
    meter: str
    reason: str
    first: float
    last: float
    count: int = 1
    #: Its row is inserted, or its insert is queued: later changes are updates.
    stored: bool = False

    def row(self) -> dict[str, Any]:
        return {"meter": self.meter, "reason": self.reason, "first": utc(self.first), "last": utc(self.last),
                "count": self.count}


@attrs.define
class _MeterState:
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    failing: bool = False
    streak: _Streak | None = None

    def row(self, name: str) -> dict[str, Any]:
        def when(seconds: float | None) -> dt.datetime | None:
            return None if seconds is None else utc(seconds)

        return {"name": name, "last_poll": when(self.last_poll), "last_success": when(self.last_success),
                "last_error": self.last_error, "last_error_time": when(self.last_error_time),
                "failing": self.failing}


class MeterRecorder(Service):
    """A :class:`~dtucenter.modbus.poller.MeterSink` writing to a :class:`Store`."""

    def __init__(
        self, store: Store, clock: IReactorTime, settings: ModbusSettings, state_interval: float,
        stats: Counter[str] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.state_interval = state_interval
        self._specs = [meter_spec(m) for m in settings.meters]
        #: The configured links as ``links.sync_links`` takes them.
        self._link_specs = [link_spec(link) for link in settings.links]
        self._states: dict[str, _MeterState] = {}
        self._dirty_meters: dict[str, None] = {}  # ordered sets
        self._dirty_streaks: dict[_Streak, None] = {}
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._synced = False
        self._sync_waiters: list[Deferred[None]] = []
        #: Shared with the center's counters, so that GET /api/status shows these too.
        self.stats: Counter[str] = stats if stats is not None else Counter()

    # -- lifecycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        sync = partial(sync_file_devices, link_specs=self._link_specs, meter_specs=self._specs, now=utc_now(self.clock))
        d = self.store.write(sync)
        d.addCallbacks(
            self._sync_done,
            lambda f: log.failure("Could not sync the configured links and meters into the database", f),
        )
        d.addBoth(self._release_waiters)
        self._flusher.start(self.state_interval, now=False)

    def resync(self, settings: ModbusSettings) -> Deferred[tuple[int, int, int, int]]:
        """Import the links and meters of the file read again (a reload), as at start; fires with
        the counts of :func:`sync_file_devices`, or fails, the database unchanged."""
        link_specs, specs = [link_spec(link) for link in settings.links], [meter_spec(m) for m in settings.meters]
        d: Deferred[tuple[int, int, int, int]] = self.store.write(
            partial(sync_file_devices, link_specs=link_specs, meter_specs=specs, now=utc_now(self.clock))
        )
        return d

    def _sync_done(self, counts: tuple[int, int, int, int]) -> None:
        links_added, links_removed, added, retired = counts
        if links_added or links_removed:
            log.info(
                "Links in the database: {added} added, {removed} removed from the file",
                added=links_added, removed=links_removed,
            )
        if added or retired:
            log.info(
                "Meters in the database: {added} added, {retired} no longer configured", added=added, retired=retired
            )

    def _release_waiters(self, _: object) -> None:
        self._synced = True
        waiting, self._sync_waiters = self._sync_waiters, []
        for d in waiting:
            d.callback(None)

    def synced(self) -> Deferred[None]:
        """Fires once the start-up sync of the meters table has been tried, so reads see the config."""
        if self._synced:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._sync_waiters.append(d)
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._flusher.running:
            self._flusher.stop()
        return self.flush()

    # -- MeterSink ------------------------------------------------------------------------------

    def record_values(self, meter: str, time: float, values: Mapping[str, Value]) -> None:
        rows = meters.sample_rows(meter, utc(time), values)
        d = self.store.add_rows(METER_SAMPLES, rows)
        d.addCallbacks(
            self._stored,
            lambda f: log.failure("Could not store {count} values of meter {meter}", f, count=len(rows), meter=meter),
            callbackArgs=(len(rows),),
        )
        state = self._state(meter, time)
        state.last_success = time
        state.failing = False

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        state = self._state(meter, time)
        streak = state.streak
        # Values of this same poll (some blocks read) do not end a streak; a clean poll since its last failure does.
        recovered = state.last_success is not None and streak is not None and streak.last < state.last_success < time
        if streak is not None and streak.reason == reason and not recovered:
            streak.last = time
            streak.count += 1
        else:
            streak = state.streak = _Streak(meter, reason, time, time)
        self._dirty_streaks[streak] = None
        state.last_error, state.last_error_time, state.failing = reason, time, True
        self.stats["meter_failures"] += 1

    def _state(self, meter: str, time: float) -> _MeterState:
        state = self._states.get(meter)
        if state is None:  # not setdefault: that would build a state on every poll to throw it away
            state = self._states[meter] = _MeterState()
        state.last_poll = time if state.last_poll is None else max(state.last_poll, time)
        self._dirty_meters[meter] = None
        return state

    def _stored(self, _: None, count: int) -> None:
        self.stats["meter_values_stored"] += count

    # -- the batched state writes -----------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Write what changed since the last flush; fires once it is committed (errors are logged)."""
        if not self._dirty_meters and not self._dirty_streaks:
            return succeed(None)
        names, self._dirty_meters = list(self._dirty_meters), {}
        streaks, self._dirty_streaks = list(self._dirty_streaks), {}
        states = [self._states[name].row(name) for name in names]
        started = [s for s in streaks if not s.stored]
        started_rows = [s.row() for s in started]
        extended_rows = [s.row() for s in streaks if s.stored]
        # Marked before the commit: the store runs writes in order, so a later
        # flush's update of these rows always comes after this insert.
        for streak in started:
            streak.stored = True

        def job(session: Session) -> None:
            meters.record_meter_states(session, states)
            meters.record_failure_streaks(session, started_rows, extended_rows)

        def failed(failure: Failure) -> None:
            log.failure("Could not write the poll state of {count} meters; will try again", failure, count=len(names))
            for streak in started:
                streak.stored = False
            for name in names:
                self._dirty_meters[name] = None
            for streak in streaks:
                self._dirty_streaks[streak] = None

        return self.store.write(job).addCallbacks(lambda _: None, failed)
