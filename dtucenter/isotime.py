"""Times, in one place: reactor seconds to aware UTC datetimes, and ISO 8601 from people.

Everything the center stores or shows is an aware UTC datetime; the reactor
and the protocols count in clock seconds (``IReactorTime.seconds()``, which
tests drive with ``task.Clock``). The conversions between the two live here,
as does the parsing of times given by people and scripts (CLI options, API
query parameters).
"""

from __future__ import annotations

import datetime as dt

from twisted.internet.interfaces import IReactorTime

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def utc_from_seconds(seconds: float) -> dt.datetime:
    """A reactor time (seconds since the epoch) as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def utc_now(clock: IReactorTime) -> dt.datetime:
    """The clock's present time: what every record of "now" uses, so tests can drive it."""
    return utc_from_seconds(clock.seconds())


def utc_from_millisecond(millisecond: int) -> dt.datetime:
    """A whole number of milliseconds since the epoch, exactly (no float rounding)."""
    return EPOCH + dt.timedelta(milliseconds=millisecond)


def parse_iso_time(text: str) -> dt.datetime:
    """ISO 8601 as an aware UTC datetime; a time without an offset is taken as UTC.

    ValueError says what was wrong, including a time that parses but has no
    UTC equivalent (``0001-01-01T00:00:00+14:00`` is in the year 0), which
    would otherwise overflow wherever it is first compared or stored.
    """
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.UTC)
    try:
        return when.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1..9999 in UTC") from None
