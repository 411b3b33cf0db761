"""Polls every meter on its interval and hands the values to a sink.

Polls sit on a fixed grid, ``start + k * interval``, so they do not drift
however long each one takes; a slot that comes while the meter's previous
poll still runs is skipped. A unit that keeps timing out costs its bus
``(retries + 1) * timeout`` per poll, so after ``n`` timed-out polls in a
row it is polled only every ``2**n`` slots (at most every ``max_backoff``
seconds) until it answers again.

:meth:`Poller.read_now` reads a meter (all its points or some) at once, in
turn with the polls on the link's queue; its values go to the sink as a
poll's do, and it leaves the schedule, the backoff and the poll statistics alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import attrs
from pymodbus.pdu import ModbusPDU
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.latency import BUCKET_RULE, Histogram, percentile
from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.errors import (
    LinkDisconnected,
    LinkOffline,
    ModbusError,
    ModbusTimeout,
)
from dtucenter.modbus.points import (
    Point,
    ReadBlock,
    Value,
    check_write_response,
    plan_reads,
    write_request,
)

log = Logger()

_Result = TypeVar("_Result")  # what a sink method takes: values or a reason


class MeterSink(Protocol):
    """Where poll results go (the store). Called in the reactor thread; must not block."""

    def record_values(self, meter: str, time: float, values: Mapping[str, Value]) -> None:
        """Scaled values of the points read in the poll that started at ``time``."""

    def record_failure(self, meter: str, time: float, reason: str) -> None:
        """The poll that started at ``time`` failed, wholly or for some blocks."""


class Channel(Protocol):
    """Something that carries Modbus requests: a :class:`~dtucenter.modbus.links.Link`."""

    def request(self, pdu: ModbusPDU) -> defer.Deferred[ModbusPDU]: ...


class UnknownMeter(LookupError):
    pass


class UnknownPoint(LookupError):
    pass


@attrs.frozen
class Reading:
    """What :meth:`Poller.read_now` read: the values, and what failed, of a read started at ``time``."""

    time: float
    values: Mapping[str, Value]
    errors: tuple[str, ...]
    #: The timeout, offline or disconnected link that cut the read short, if one did.
    stopped_by: ModbusError | None


@attrs.frozen
class MeterStatus:
    name: str
    link: str
    unit: int
    interval: float
    last_poll: float | None
    last_success: float | None
    last_error: str | None  # the most recent error, kept after the meter recovers
    last_error_time: float | None
    failing: bool  # the latest poll had an error
    timeouts_in_a_row: int
    next_poll: float | None
    polls: int
    failures: int

    def as_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.define
class PollStats:
    """Every finished poll of every meter since the start: outcomes and how long each took."""

    polls: int = 0
    failed: int = 0  # had an error (timeout, exception response, link offline...)
    timed_out: int = 0  # ended because a unit did not answer
    #: Slots that came while the meter's previous poll still ran: the poller (or the bus) is behind.
    skipped: int = 0
    durations: Histogram = attrs.Factory(Histogram)

    def record(self, seconds: float, failed: bool, timed_out: bool) -> None:
        self.polls += 1
        self.failed += failed
        self.timed_out += timed_out
        self.durations.record(seconds)

    def as_json(self) -> dict[str, object]:
        return {
            "polls": self.polls,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "skipped": self.skipped,
            "duration_p50_s": percentile(self.durations.buckets, 0.5),
            "duration_p99_s": percentile(self.durations.buckets, 0.99),
            "duration_histogram": {str(bucket): count for bucket, count in sorted(self.durations.buckets.items())},
            "duration_buckets": BUCKET_RULE,
        }


@attrs.define(eq=False)
class _Meter:
    settings: MeterSettings
    blocks: list[ReadBlock]
    #: Each block's read request, built once: every poll sends the same ones.
    requests: list[ModbusPDU]
    points: dict[str, Point]
    slot: int = 0
    resume_slot: int = 0
    polling: bool = False
    call: IDelayedCall | None = None
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    failing: bool = False
    timeouts_in_a_row: int = 0
    polls: int = 0
    failures: int = 0
    #: Point name -> its value and the start of the read it came from, for each point whose
    #: latest read succeeded; a point whose latest read failed has none.
    latest: dict[str, tuple[Value, float]] = attrs.Factory(dict)


def _new_meter(settings: MeterSettings) -> _Meter:
    blocks = plan_reads(settings.points, settings.limits)
    return _Meter(settings, blocks, _requests(blocks, settings.unit), {p.name: p for p in settings.points})


def _requests(blocks: Sequence[ReadBlock], unit: int) -> list[ModbusPDU]:
    return [block.request(unit) for block in blocks]


class _BlockRead:
    """One read of a meter's blocks, a request at a time, in callbacks.

    What a poll learns: the values read, the errors, whether the unit answered at all, and
    the timeout, offline or disconnected link that cut the read short. (A coroutine per poll
    cost more than the poll's own bookkeeping: the poller runs thousands a second.)
    """

    __slots__ = (
        "_blocks",
        "_channels",
        "_done",
        "_index",
        "_requests",
        "_settings",
        "answered",
        "errors",
        "stopped_by",
        "values",
    )

    def __init__(
        self, channels: Mapping[str, Channel], settings: MeterSettings, blocks: Sequence[ReadBlock],
        requests: Sequence[ModbusPDU], done: Callable[[_BlockRead], None],
    ) -> None:
        self._channels = channels
        self._settings = settings
        self._blocks = blocks
        self._requests = requests
        self._done = done
        self._index = 0
        self.values: dict[str, Value] = {}
        self.errors: list[str] = []
        self.answered = False
        self.stopped_by: ModbusError | None = None

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        if self._index >= len(self._blocks):
            self._done(self)
            return
        try:
            d = self._channels[self._settings.link].request(self._requests[self._index])
        except Exception:
            self._crashed(Failure())
            return
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, response: ModbusPDU) -> None:
        block = self._blocks[self._index]
        self.answered = True
        try:
            self.values.update(block.decode(response))
        except ModbusError as exc:
            self.errors.append(f"{block.describe()}: {exc}")
        except Exception:
            self._crashed(Failure())
            return
        self._index += 1
        self._next()

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ModbusTimeout | LinkOffline | LinkDisconnected):
            # The unit or the link is gone: the other blocks would only wait too.
            self.stopped_by = error
            self.errors.append(str(error))
            self._done(self)
        elif isinstance(error, ModbusError):
            self.answered = True
            self.errors.append(f"{self._blocks[self._index].describe()}: {error}")
            self._index += 1
            self._next()
        else:
            self._crashed(failure)

    def _crashed(self, failure: Failure) -> None:
        block = self._blocks[self._index].describe()
        log.failure("Meter {meter}: reading {block} crashed", failure, meter=self._settings.name, block=block)
        self.errors.append(f"{block}: internal error (see the log)")
        self._done(self)


class Poller(Service):
    def __init__(
        self,
        meters: Sequence[MeterSettings],
        channels: Mapping[str, Channel],
        sink: MeterSink,
        clock: IReactorTime,
        *,
        max_backoff: float = 300.0,
    ) -> None:
        self._channels = channels
        self._sink = sink
        self._clock = clock
        self._max_backoff = max_backoff
        self._meters = {m.name: _new_meter(m) for m in meters}
        self._start = 0.0
        self.stats = PollStats()
        #: Links whose meters are not polled here: another node of the cluster runs them.
        self.paused_links: set[str] = set()
        #: The same, by the name of the link polled (a link's entry goes when the link does).
        self.link_stats: dict[str, PollStats] = {}

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._start = self._clock.seconds()
        for meter in self._meters.values():
            meter.slot = 0
            meter.call = self._clock.callLater(0, self._tick, meter)

    def stopService(self) -> None:
        super().stopService()
        for meter in self._meters.values():
            if meter.call is not None and meter.call.active():
                meter.call.cancel()
            meter.call = None

    # -- meters changed while running ------------------------------------------

    def set_meter(self, settings: MeterSettings) -> None:
        """Add a meter, or change one in place.

        A changed meter keeps its schedule and its failure streak: a poll under way finishes
        with the points it started with, the next slot reads the new ones. A new interval
        takes effect from the next slot of the new period; a new meter is polled at once.
        """
        meter = self._meters.get(settings.name)
        if meter is None:
            meter = self._meters[settings.name] = _new_meter(settings)
            if self.running:
                meter.call = self._clock.callLater(0, self._tick, meter)
            return
        old_interval, old_points = meter.settings.interval, meter.points
        meter.settings = settings
        meter.blocks = plan_reads(settings.points, settings.limits)
        meter.requests = _requests(meter.blocks, settings.unit)
        meter.points = {p.name: p for p in settings.points}
        # A value read under another definition of its point would be encoded wrongly.
        meter.latest = {
            name: entry for name, entry in meter.latest.items() if old_points.get(name) == meter.points.get(name)
        }
        if settings.interval != old_interval:
            meter.resume_slot = 0  # a back-off counted in slots of the old length
            if meter.call is not None and meter.call.active():
                meter.call.cancel()
                now = self._clock.seconds()
                meter.slot = math.floor((now - self._start) / settings.interval)
                self._schedule_next(meter)

    def remove_meter(self, name: str) -> None:
        """Stop polling a meter; a poll under way is not reported. Raises :class:`UnknownMeter`."""
        meter = self._meters.pop(name, None)
        if meter is None:
            raise UnknownMeter(f"no meter named {name!r}")
        if meter.call is not None and meter.call.active():
            meter.call.cancel()
        meter.call = None

    # -- status and writes ----------------------------------------------------

    def meter_names(self) -> list[str]:
        return list(self._meters)

    def meter_count(self) -> int:
        return len(self._meters)

    def failing_count(self) -> int:
        """Meters whose latest poll had an error."""
        return sum(meter.failing for meter in self._meters.values())

    def meter_settings(self) -> list[MeterSettings]:
        return [meter.settings for meter in self._meters.values()]

    def settings_of(self, name: str) -> MeterSettings:
        """Raises :class:`UnknownMeter`."""
        return self._meter(name).settings

    def status(self, name: str) -> MeterStatus:
        meter = self._meter(name)
        settings = meter.settings
        next_poll = None
        if meter.call is not None and meter.call.active():
            next_poll = self._slot_time(meter, max(meter.slot, meter.resume_slot))
        return MeterStatus(
            name=settings.name, link=settings.link, unit=settings.unit, interval=settings.interval,
            last_poll=meter.last_poll, last_success=meter.last_success, last_error=meter.last_error,
            last_error_time=meter.last_error_time, failing=meter.failing, timeouts_in_a_row=meter.timeouts_in_a_row,
            next_poll=next_poll, polls=meter.polls, failures=meter.failures,
        )

    def latest_values(self, name: str) -> Mapping[str, tuple[Value, float]]:
        """Point name -> (value, start of the read it came from), for each point of the meter
        whose latest read succeeded. Raises :class:`UnknownMeter`."""
        return self._meter(name).latest

    def write(self, meter_name: str, point_name: str, value: object) -> defer.Deferred[None]:
        """Write ``value`` (in the point's scaled unit) to a point.

        Raises :class:`UnknownMeter`, :class:`UnknownPoint` or
        :class:`~dtucenter.modbus.points.PointValueError` at once for bad input;
        the Deferred fails with a :class:`~dtucenter.modbus.errors.ModbusError`
        when the meter cannot be written.
        """
        meter = self._meter(meter_name)
        point = meter.points.get(point_name)
        if point is None:
            raise UnknownPoint(f"meter {meter_name} has no point {point_name!r}")
        request = write_request(point, value, meter.settings.unit)
        d = self._channels[meter.settings.link].request(request)
        return d.addCallback(lambda response: check_write_response(request, response))

    def read_now(self, meter_name: str, point_names: Sequence[str] | None = None) -> defer.Deferred[Reading]:
        """Read the meter's points (or the named ones) now; the values are stored as a poll's.

        Raises :class:`UnknownMeter` or :class:`UnknownPoint` at once; the Deferred fires with
        a :class:`Reading` whatever the meter answers (its failures are in ``errors``).
        """
        meter = self._meter(meter_name)
        if point_names is None:
            blocks, requests = meter.blocks, meter.requests
        else:
            unknown = [name for name in point_names if name not in meter.points]
            if unknown:
                raise UnknownPoint(f"meter {meter_name} has no point {unknown[0]!r}")
            chosen = [meter.points[name] for name in dict.fromkeys(point_names)]
            blocks = plan_reads(chosen, meter.settings.limits)
            requests = _requests(blocks, meter.settings.unit)
        started = self._clock.seconds()
        reading: defer.Deferred[Reading] = defer.Deferred()

        def done(read: _BlockRead) -> None:
            try:
                if self._meters.get(meter.settings.name) is meter:
                    self._remember(meter, blocks, read.values, started)
                if read.values:
                    self._to_sink(self._sink.record_values, meter.settings.name, started, read.values)
                result = Reading(started, read.values, tuple(read.errors), read.stopped_by)
            except Exception:
                reading.errback()
            else:
                reading.callback(result)

        _BlockRead(self._channels, meter.settings, blocks, requests, done).start()
        return reading

    def _meter(self, name: str) -> _Meter:
        meter = self._meters.get(name)
        if meter is None:
            raise UnknownMeter(f"no meter named {name!r}")
        return meter

    # -- scheduling -----------------------------------------------------------

    def _slot_time(self, meter: _Meter, slot: int) -> float:
        return self._start + slot * meter.settings.interval

    def _tick(self, meter: _Meter) -> None:
        slot = meter.slot
        self._schedule_next(meter)
        if meter.settings.link in self.paused_links:
            return  # polled by the node that holds its link
        if meter.polling:
            # Counted, not logged: when the poller falls behind, a line per meter and slot would only
            # make it fall further behind.
            self.stats.skipped += 1
        elif slot >= meter.resume_slot:
            self._poll(meter, slot)

    def _schedule_next(self, meter: _Meter) -> None:
        now = self._clock.seconds()
        meter.slot += 1
        if self._slot_time(meter, meter.slot) <= now:  # the reactor was late: skip missed slots
            meter.slot = math.floor((now - self._start) / meter.settings.interval) + 1
        meter.call = self._clock.callLater(self._slot_time(meter, meter.slot) - now, self._tick, meter)

    # -- one poll -------------------------------------------------------------

    def _poll(self, meter: _Meter, slot: int) -> None:
        settings = meter.settings
        meter.polling = True
        started = self._clock.seconds()
        meter.last_poll = started
        meter.polls += 1
        blocks = meter.blocks

        def done(read: _BlockRead) -> None:
            meter.polling = False
            try:
                self._polled(meter, settings, blocks, slot, started, read)
            except Exception:
                log.failure("Meter {meter}: poll crashed", meter=settings.name)

        _BlockRead(self._channels, settings, blocks, meter.requests, done).start()

    def _polled(
        self, meter: _Meter, settings: MeterSettings, blocks: Sequence[ReadBlock], slot: int, started: float,
        read: _BlockRead,
    ) -> None:
        values, errors, answered = read.values, read.errors, read.answered
        timed_out = isinstance(read.stopped_by, ModbusTimeout)
        if not self.running:
            return  # shutting down: links dropping their connections is no news
        if self._meters.get(settings.name) is not meter:
            return  # removed while it was polled: no news of a meter that is gone
        seconds = self._clock.seconds() - started
        self.stats.record(seconds, bool(errors), timed_out)
        link_stats = self.link_stats.get(settings.link)
        if link_stats is None:
            link_stats = self.link_stats[settings.link] = PollStats()
        link_stats.record(seconds, bool(errors), timed_out)
        self._remember(meter, blocks, values, started)
        self._backoff(meter, slot, answered, timed_out)
        self._report(meter, started, values, errors)

    @staticmethod
    def _remember(meter: _Meter, blocks: Sequence[ReadBlock], values: Mapping[str, Value], started: float) -> None:
        """Keep each value read as its point's latest, and forget the latest of each point the read
        failed for; a read older than what is kept (a poll and a read-now overlapped) changes nothing."""
        latest = meter.latest
        for block in blocks:
            for point in block.points:
                current = meter.points.get(point.name)
                if current is not point and current != point:
                    continue  # the point was redefined while it was read
                kept = latest.get(point.name)
                if kept is not None and kept[1] > started:
                    continue
                if point.name in values:
                    latest[point.name] = (values[point.name], started)
                else:
                    latest.pop(point.name, None)

    def _backoff(self, meter: _Meter, slot: int, answered: bool, timed_out: bool) -> None:
        if answered:
            meter.timeouts_in_a_row = 0
            meter.resume_slot = 0
        elif timed_out:
            meter.timeouts_in_a_row += 1
            longest = max(1, math.floor(self._max_backoff / meter.settings.interval))
            meter.resume_slot = slot + min(2 ** meter.timeouts_in_a_row, longest)

    def _report(self, meter: _Meter, started: float, values: dict[str, Value], errors: list[str]) -> None:
        name = meter.settings.name
        if values:
            meter.last_success = started
            self._to_sink(self._sink.record_values, name, started, values)
        if not errors:
            if meter.failing:
                log.info("Meter {meter} answers again", meter=name)
            meter.failing = False
            return
        reason = "; ".join(errors)
        meter.failures += 1
        # Log a change, not every poll of a meter that stays dead.
        if not meter.failing or reason != meter.last_error:
            log.warn("Meter {meter}: {reason}", meter=name, reason=reason)
        meter.failing = True
        meter.last_error, meter.last_error_time = reason, started
        self._to_sink(self._sink.record_failure, name, started, reason)

    def _to_sink(self, record: Callable[[str, float, _Result], None], name: str, started: float, what: _Result) -> None:
        try:
            record(name, started, what)
        except Exception:
            log.failure("Meter {meter}: the sink refused a poll result", meter=name)
