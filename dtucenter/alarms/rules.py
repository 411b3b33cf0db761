"""Alarm rules: what is watched, and when an alarm is raised and cleared.

A rule watches one device: a meter (``meter = NAME``), a DTU (``dtu = PSN``) or a
Modbus link (``link = NAME``). It is either a *point* rule, a limit on one of the
device's values::

    [[alarm]]
    name = "pump-hot"
    meter = "pump-1"
    point = "temperature"   # a meter point's name; for a DTU its position (0, 1, ...) or "dev-addr"
    above = 80              # or below = ...
    hysteresis = 5          # cleared once at or below 75
    delay = 30              # seconds the value must stay above 80 before the alarm is raised
    clear_delay = 10        # seconds it must stay at or below 75 before it is cleared

or a *device* rule: ``offline = SECONDS`` (a DTU or link without a connection that
long), ``failed_polls = N`` or ``failing_for = SECONDS`` (a meter whose polls fail N
times in a row, or for that long). ``webhook = URL`` also POSTs the rule's alarms
there. The same keys come in the file's ``[[alarm]]`` tables and the API's bodies,
read here with the one-line messages of every other table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from dtucenter.setting import (
    MAX_NAME,
    Place,
    build,
    check_unique,
    describe,
    integer,
    number,
    place_of,
    read_keys,
    read_tables,
    setting,
    text,
)

#: Longest time a rule may wait (a week): timers past that are a typo, not a plan.
MAX_SECONDS = 7 * 24 * 3600.0
DEVICE_KINDS = ("meter", "dtu", "link")


def _name(value: Any) -> str:
    name = text(value)
    if len(name) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters, got {len(name)}")
    return name


def _point(value: Any) -> str:
    # A DTU position may be written as a number.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return _name(value)


def _limit(value: Any) -> float:
    return number(-1e300, 1e300)(value)


def webhook_url(value: Any) -> str:
    """An http(s) URL to POST alarms to."""
    url = text(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {describe(value)}")
    if len(url) > 1000:
        raise ValueError(f"at most 1000 characters, got {len(url)}")
    return url


def _seconds(low: float) -> Any:
    return number(low, MAX_SECONDS)


@attrs.frozen
class AlarmRule:
    """One ``[[alarm]]`` table, checked; :meth:`definition` gives its keys back."""

    name: str = attrs.field(metadata=setting(_name, "The rule's name, unique per account."))
    meter: str | None = attrs.field(default=None, metadata=setting(_name, "The meter watched."))
    dtu: int | None = attrs.field(default=None, metadata=setting(integer(0, 2**32 - 1), "The DTU watched (PSN)."))
    link: str | None = attrs.field(default=None, metadata=setting(_name, "The Modbus link watched."))
    point: str | None = attrs.field(
        default=None, metadata=setting(_point, "A meter point's name, or a DTU position or dev-addr.")
    )
    above: float | None = attrs.field(default=None, metadata=setting(_limit, "Raised when the value is above."))
    below: float | None = attrs.field(default=None, metadata=setting(_limit, "Raised when the value is below."))
    hysteresis: float = attrs.field(
        default=0.0, metadata=setting(number(0, 1e300), "How far back past the limit the value must go to clear.")
    )
    delay: float = attrs.field(
        default=0.0, metadata=setting(_seconds(0), "Seconds the condition holds before raising.")
    )
    clear_delay: float = attrs.field(
        default=0.0, metadata=setting(_seconds(0), "Seconds the condition is gone before clearing.")
    )
    offline: float | None = attrs.field(
        default=None, metadata=setting(_seconds(0.001), "A DTU or link offline this many seconds.")
    )
    failed_polls: int | None = attrs.field(
        default=None, metadata=setting(integer(1, 1_000_000), "A meter's polls failing this many times in a row.")
    )
    failing_for: float | None = attrs.field(
        default=None, metadata=setting(_seconds(0.001), "A meter's polls failing for this many seconds.")
    )
    webhook: str | None = attrs.field(
        default=None, metadata=setting(webhook_url, "URL the rule's alarms are POSTed to.")
    )

    @property
    def device_kind(self) -> str:
        return "meter" if self.meter is not None else "dtu" if self.dtu is not None else "link"

    @property
    def device(self) -> str:
        return self.meter if self.meter is not None else str(self.dtu) if self.dtu is not None else str(self.link)

    @property
    def limit(self) -> float | None:
        return self.above if self.above is not None else self.below

    def definition(self) -> dict[str, Any]:
        """The rule's keys as the file and the API give them (defaults left out)."""
        return {
            field.name: value
            for field in attrs.fields(AlarmRule)
            if (value := getattr(self, field.name)) != field.default
        }


def read_alarm_rule(table: Mapping[str, Any], place: Place) -> AlarmRule:
    """One rule from its table; ``ConfigError`` naming the key for what is wrong."""
    (values,) = read_keys(table, place, AlarmRule)
    devices = [kind for kind in DEVICE_KINDS if kind in values]
    if not devices:
        raise place.error(None, "needs the device it watches: meter, dtu or link")
    if len(devices) > 1:
        raise place.error(devices[1], f"cannot be combined with {devices[0]}; a rule watches one device")
    device = devices[0]
    if "point" in values:
        _check_point_rule(values, device, place)
    else:
        _check_device_rule(values, device, place)
    return build(AlarmRule, values, place)


_POINT_KEYS = ("above", "below", "hysteresis", "delay", "clear_delay")
_DEVICE_KEYS = ("offline", "failed_polls", "failing_for")


def _check_point_rule(values: Mapping[str, Any], device: str, place: Place) -> None:
    if device == "link":
        raise place.error("point", "a link has no points; watch its meters, or give offline")
    for key in _DEVICE_KEYS:
        if key in values:
            raise place.error(key, "cannot be combined with point; a rule watches a point or the device")
    limits = [key for key in ("above", "below") if key in values]
    if not limits:
        raise place.error(None, "a point rule needs above or below")
    if len(limits) > 1:
        raise place.error("below", "cannot be combined with above; make two rules")
    if device == "dtu":
        point = values["point"]
        dev, dash, addr = point.partition("-")
        if not (point.isdigit() or (dash and dev.isdigit() and addr.isdigit())):
            raise place.error("point", f"a DTU point is a position (0, 1, ...) or dev-addr (1-40001), got {point!r}")


def _check_device_rule(values: Mapping[str, Any], device: str, place: Place) -> None:
    for key in _POINT_KEYS:
        if key in values:
            raise place.error(key, "needs point (a device rule has no limit)")
    allowed = ("offline",) if device in ("dtu", "link") else ("failed_polls", "failing_for")
    given = [key for key in _DEVICE_KEYS if key in values]
    for key in given:
        if key not in allowed:
            raise place.error(key, f"does not apply to a {device}; give {' or '.join(allowed)}")
    if not given:
        raise place.error(None, f"needs point (with above or below) or {' or '.join(allowed)}")


def read_alarm_rules(tables: object, file: Place) -> tuple[AlarmRule, ...]:
    """The file's ``[[alarm]]`` tables; names are unique among them."""
    rules = tuple(
        read_alarm_rule(table, place_of(table, file, "alarm", index))
        for index, table in read_tables(tables, file, "alarm")
    )
    check_unique([rule.name for rule in rules], file, "alarm")
    return rules
