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
    """ISO 8601; a time without an offset is taken as UTC. ValueError says what was wrong."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
