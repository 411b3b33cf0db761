"""Alarm evaluation: the center's events in, alarms raised and cleared out.

The engine listens on the :class:`~dtucenter.events.EventHub` while it has rules (so a
center without any builds no event for it). Its rules are indexed by device: an upload
of a DTU that no rule watches costs a dict lookup, one that a rule watches a comparison
per rule. Each rule has one :class:`_Watch`, its state: raised or not, and at most one
timer, counting down toward the other state (the delay before raising, before clearing,
the seconds offline); whatever makes the condition steady again cancels it. Timers are
the clock's, so tests drive them with ``task.Clock``.

A raise or a clear is written to the store first (:class:`AlarmSink`); once it is
committed it is published on the hub as :class:`~dtucenter.events.AlarmRaised` /
:class:`~dtucenter.events.AlarmCleared`, for MQTT, the console and the webhooks, in the
order it happened. The store keeps at most one active alarm per rule and answers a
second raise with None: a restart reads the active alarms back (:meth:`AlarmEngine.start`)
and never raises them again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dtucenter.alarms.rules import AlarmRule
from dtucenter.events import (
    AlarmCleared,
    AlarmRaised,
    DtuOffline,
    DtuOnline,
    Event,
    EventHub,
    LinkDown,
    LinkUp,
    MeterFailed,
    MeterRead,
    UploadStored,
)

log = Logger()

#: A DTU's register list: (dev, addr) by position.
Registers = Sequence[tuple[int, int]]


@attrs.frozen
class OwnedRule:
    """A rule and the account it belongs to (the file's rules: the first admin account's)."""

    account_id: int
    account: str
    rule: AlarmRule
    #: From the config file (read-only to the API), else made through the API.
    from_file: bool = False

    @property
    def key(self) -> tuple[int, str]:
        return self.account_id, self.rule.name


@attrs.frozen
class ActiveAlarm:
    """An alarm the store holds as active, read back at start."""

    account_id: int
    account: str
    rule: str
    device_kind: str
    device: str
    point: str | None


class AlarmSink(Protocol):
    """Where raised and cleared alarms are written: each Deferred fires once committed, with the
    alarm's id, or None when there was nothing to do (raised already, or nothing to clear)."""

    def raised(
        self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime
    ) -> Deferred[int | None]: ...

    def cleared(
        self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime
    ) -> Deferred[int | None]: ...


#: Is this device connected now: ("dtu", "12345") or ("link", "site-a").
OnlineCheck = Callable[[str, str], bool]
#: A DTU's register list, from the store; None when it has none.
RegisterLookup = Callable[[int], Deferred[Registers | None]]
#: Told of each alarm once published, with its rule (the webhooks).
Delivery = Callable[[AlarmRaised | AlarmCleared, OwnedRule], None]


@attrs.define(eq=False)
class _Watch:
    """One rule's state."""

    owned: OwnedRule
    #: For a DTU point rule: the upload position read; None until a dev-addr is found in the register list.
    position: int | None = None
    raised: bool = False
    #: Counting down toward the other state.
    pending: IDelayedCall | None = None
    #: The latest value seen (point rules).
    value: float | None = None
    #: Polls failed in a row (meter device rules), and the last reason.
    failures: int = 0
    reason: str = ""

    @property
    def rule(self) -> AlarmRule:
        return self.owned.rule

    def cancel(self) -> None:
        if self.pending is not None:
            if self.pending.active():
                self.pending.cancel()
            self.pending = None


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


class AlarmEngine:
    """Evaluates the rules on the hub's events; see the module's text."""

    def __init__(
        self, hub: EventHub, sink: AlarmSink, clock: IReactorTime, now: Callable[[], dt.datetime],
        online: OnlineCheck, registers: RegisterLookup | None = None,
    ) -> None:
        self._hub = hub
        self._sink = sink
        self._clock = clock
        self._now = now
        self._online = online
        self._registers = registers
        self._delivery: list[Delivery] = []
        self._file_rules: tuple[OwnedRule, ...] = ()
        self._api_rules: dict[tuple[int, str], OwnedRule] = {}
        self._watches: dict[tuple[int, str], _Watch] = {}
        self._by_dtu: dict[int, list[_Watch]] = {}
        self._by_meter: dict[str, list[_Watch]] = {}
        self._by_link: dict[str, list[_Watch]] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False
        self._handlers: dict[type, Callable[[Event], None]] = {
            UploadStored: self._upload,  # type: ignore[dict-item]  # each handler takes its own event type
            MeterRead: self._meter_read,  # type: ignore[dict-item]
            MeterFailed: self._meter_failed,  # type: ignore[dict-item]
            DtuOnline: self._dtu_online,  # type: ignore[dict-item]
            DtuOffline: self._dtu_offline,  # type: ignore[dict-item]
            LinkUp: self._link_up,  # type: ignore[dict-item]
            LinkDown: self._link_down,  # type: ignore[dict-item]
        }

    # -- rules ------------------------------------------------------------------------------------

    def on_alarm(self, delivery: Delivery) -> None:
        """Call ``delivery`` with each alarm raised or cleared, after the hub heard it."""
        self._delivery.append(delivery)

    def start(self, file_rules: Iterable[OwnedRule], api_rules: Iterable[OwnedRule],
              active: Iterable[ActiveAlarm]) -> None:
        """Begin with these rules, the alarms the store holds as active being raised already.
        An active alarm whose rule is gone is cleared."""
        self._file_rules = tuple(file_rules)
        self._api_rules = {owned.key: owned for owned in api_rules}
        rules = self._rules()
        for alarm in active:
            key = (alarm.account_id, alarm.rule)
            owned = rules.get(key)
            if owned is None:
                self._clear_orphan(alarm)
                continue
            self._watches[key] = self._new_watch(owned, raised=True)
        self._started = True
        self._apply()

    def rules(self) -> list[OwnedRule]:
        """Every rule, the file's first, then by account and name."""
        return list(self._rules().values())

    def rule(self, account_id: int, name: str) -> OwnedRule | None:
        return self._rules().get((account_id, name))

    def is_raised(self, account_id: int, name: str) -> bool:
        watch = self._watches.get((account_id, name))
        return watch is not None and watch.raised

    def set_file_rules(self, rules: Iterable[OwnedRule]) -> None:
        """The config file's rules, read again (a reload)."""
        self._file_rules = tuple(rules)
        self._apply()

    def put_rule(self, owned: OwnedRule) -> None:
        """Add or replace an API rule."""
        self._api_rules[owned.key] = owned
        self._apply()

    def remove_rule(self, account_id: int, name: str) -> None:
        self._api_rules.pop((account_id, name), None)
        self._apply()

    def stop(self) -> None:
        """Cancel every timer and stop listening (the center stops)."""
        for watch in self._watches.values():
            watch.cancel()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._started = False

    def _rules(self) -> dict[tuple[int, str], OwnedRule]:
        rules = {owned.key: owned for owned in self._file_rules}
        for key, owned in sorted(self._api_rules.items(), key=lambda item: (item[1].account, item[0][1])):
            rules.setdefault(key, owned)  # a file rule's name wins; the API refuses to take it
        return rules

    def _apply(self) -> None:
        """Bring the watches in line with the rules: a changed or removed rule's alarm is cleared."""
        if not self._started:
            return
        rules = self._rules()
        for key, watch in list(self._watches.items()):
            owned = rules.get(key)
            if owned is not None and owned.rule == watch.rule:
                if owned != watch.owned:
                    watch.owned = owned
                continue
            watch.cancel()
            del self._watches[key]
            if watch.raised:
                self._record_clear(watch, None, "rule changed" if owned is not None else "rule removed")
        for key, owned in rules.items():
            if key not in self._watches:
                self._watches[key] = self._new_watch(owned)
        self._index()

    def _new_watch(self, owned: OwnedRule, raised: bool = False) -> _Watch:
        watch = _Watch(owned, raised=raised)
        rule = owned.rule
        if rule.dtu is not None and rule.point is not None:
            if rule.point.isdigit():
                watch.position = int(rule.point)
            else:
                self._find_position(watch)
        if rule.offline is not None and not self._online(rule.device_kind, rule.device):
            self._toward(watch, True, rule.offline)
        return watch

    def _find_position(self, watch: _Watch) -> None:
        """A dev-addr point's position in its DTU's register list, read from the store."""
        rule = watch.rule
        if self._registers is None or rule.dtu is None or rule.point is None:
            return
        dev, _, addr = rule.point.partition("-")
        wanted = (int(dev), int(addr))

        def found(registers: Registers | None) -> None:
            positions = [i for i, entry in enumerate(registers or ()) if tuple(entry) == wanted]
            watch.position = positions[0] if positions else None

        self._registers(rule.dtu).addCallbacks(
            found, lambda f: log.failure("Could not read the register list of DTU {psn}", f, psn=rule.dtu)
        )

    def _index(self) -> None:
        by_dtu: dict[int, list[_Watch]] = {}
        by_meter: dict[str, list[_Watch]] = {}
        by_link: dict[str, list[_Watch]] = {}
        for watch in self._watches.values():
            rule = watch.rule
            if rule.dtu is not None:
                by_dtu.setdefault(rule.dtu, []).append(watch)
            elif rule.meter is not None:
                by_meter.setdefault(rule.meter, []).append(watch)
            elif rule.link is not None:
                by_link.setdefault(rule.link, []).append(watch)
        self._by_dtu, self._by_meter, self._by_link = by_dtu, by_meter, by_link
        if self._watches and self._unsubscribe is None:
            self._unsubscribe = self._hub.subscribe(self._heard)
        elif not self._watches and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- events -----------------------------------------------------------------------------------

    def _heard(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _upload(self, event: UploadStored) -> None:
        watches = self._by_dtu.get(event.psn)
        if watches is None:
            return
        values = event.values
        for watch in watches:
            position = watch.position
            if position is not None and position < len(values):
                self._point_value(watch, float(values[position]))

    def _meter_read(self, event: MeterRead) -> None:
        watches = self._by_meter.get(event.meter)
        if watches is None:
            return
        for watch in watches:
            point = watch.rule.point
            if point is None:
                watch.failures = 0
                self._toward(watch, False, 0.0)
                continue
            value = event.values.get(point)
            if value is not None:
                self._point_value(watch, float(value))

    def _meter_failed(self, event: MeterFailed) -> None:
        for watch in self._by_meter.get(event.meter, ()):
            rule = watch.rule
            if rule.point is not None:
                continue
            watch.failures += 1
            watch.reason = event.reason
            if rule.failed_polls is not None and watch.failures >= rule.failed_polls:
                self._toward(watch, True, 0.0)
            elif rule.failing_for is not None and watch.pending is None:
                self._toward(watch, True, rule.failing_for)

    def _dtu_online(self, event: DtuOnline) -> None:
        for watch in self._by_dtu.get(event.psn, ()):
            if watch.rule.offline is not None:
                self._toward(watch, False, 0.0)
            elif watch.rule.point is not None and not watch.rule.point.isdigit():
                self._find_position(watch)  # its setup may have changed the register list

    def _dtu_offline(self, event: DtuOffline) -> None:
        self._went_offline(self._by_dtu.get(event.psn, ()))

    def _link_up(self, event: LinkUp) -> None:
        for watch in self._by_link.get(event.link, ()):
            self._toward(watch, False, 0.0)

    def _link_down(self, event: LinkDown) -> None:
        self._went_offline(self._by_link.get(event.link, ()))

    def _went_offline(self, watches: Iterable[_Watch]) -> None:
        for watch in watches:
            offline = watch.rule.offline
            if offline is not None and watch.pending is None:
                self._toward(watch, True, offline)

    def _point_value(self, watch: _Watch, value: float) -> None:
        rule = watch.rule
        watch.value = value
        if rule.above is not None:
            limit = rule.above
            want = True if value > limit else False if value <= limit - rule.hysteresis else watch.raised
        else:
            limit = rule.below  # type: ignore[assignment]  # a point rule has one of the two
            want = True if value < limit else False if value >= limit + rule.hysteresis else watch.raised
        self._toward(watch, want, rule.delay if want else rule.clear_delay)

    # -- raising and clearing ---------------------------------------------------------------------

    def _toward(self, watch: _Watch, want: bool, delay: float) -> None:
        """The condition says ``want``: steady if the watch is so already (a countdown toward the
        other state is cancelled), else flip now, or once ``delay`` has passed without this changing."""
        if want == watch.raised:
            watch.cancel()
            return
        if delay <= 0:
            watch.cancel()
            self._flip(watch)
        elif watch.pending is None:
            watch.pending = self._clock.callLater(delay, self._flip, watch)

    def _flip(self, watch: _Watch) -> None:
        watch.pending = None
        if self._watches.get(watch.owned.key) is not watch:
            return  # its rule went away meanwhile
        rule = watch.rule
        if not watch.raised:
            watch.raised = True
            self._record_raise(watch, watch.value if rule.point is not None else None, self._raise_message(watch))
        else:
            watch.raised = False
            value = watch.value if rule.point is not None else None
            self._record_clear(watch, value, self._clear_message(watch))

    def _raise_message(self, watch: _Watch) -> str:
        rule = watch.rule
        what = f"{rule.device_kind} {rule.device}"
        if rule.point is not None:
            side, limit = ("above", rule.above) if rule.above is not None else ("below", rule.below)
            return f"{what} {rule.point} = {_shown(watch.value)}, {side} {_shown(limit)}"
        if rule.offline is not None:
            return f"{what} offline for {rule.offline:g} s"
        return f"{what}: {watch.failures} polls failed in a row (last: {watch.reason})"

    def _clear_message(self, watch: _Watch) -> str:
        rule = watch.rule
        what = f"{rule.device_kind} {rule.device}"
        if rule.point is not None:
            return f"{what} {rule.point} = {_shown(watch.value)}, back within the limit"
        if rule.offline is not None:
            return f"{what} online again"
        return f"{what} polled again"

    def _record_raise(self, watch: _Watch, value: float | None, message: str) -> None:
        owned, rule, time = watch.owned, watch.rule, self._now()

        def committed(alarm: int | None) -> None:
            if alarm is None:
                return  # the store has it active already (a restart): nothing new to tell
            self._publish(AlarmRaised(
                alarm, owned.account, rule.name, rule.device_kind, rule.device, rule.point, value, rule.limit,
                message, time,
            ), owned)

        self._sink.raised(owned, value, message, time).addCallbacks(
            committed, lambda f: log.failure("Could not store alarm {rule}", f, rule=rule.name)
        )

    def _record_clear(self, watch: _Watch, value: float | None, message: str) -> None:
        owned, rule, time = watch.owned, watch.rule, self._now()

        def committed(alarm: int | None) -> None:
            if alarm is None:
                return
            self._publish(AlarmCleared(
                alarm, owned.account, rule.name, rule.device_kind, rule.device, rule.point, value, message, time,
            ), owned)

        self._sink.cleared(owned, value, message, time).addCallbacks(
            committed, lambda f: log.failure("Could not store the clearing of alarm {rule}", f, rule=rule.name)
        )

    def _clear_orphan(self, alarm: ActiveAlarm) -> None:
        """An active alarm whose rule is no more (removed from the file while the center was down)."""
        device: dict[str, str | int] = {
            alarm.device_kind: int(alarm.device) if alarm.device_kind == "dtu" else alarm.device
        }
        as_it_was = AlarmRule(name=alarm.rule, point=alarm.point, **device)  # type: ignore[arg-type]  # one device key
        self._record_clear(_Watch(OwnedRule(alarm.account_id, alarm.account, as_it_was), raised=True), None,
                           "rule removed")

    def _publish(self, event: AlarmRaised | AlarmCleared, owned: OwnedRule) -> None:
        self._hub.publish(event)
        for delivery in self._delivery:
            try:
                delivery(event, owned)
            except Exception:
                log.failure("Delivering alarm {rule} failed", rule=event.rule)
