"""ISO 8601 times from people and scripts (CLI options, API query parameters)."""

from __future__ import annotations

import datetime as dt


def parse_iso_time(text: str) -> dt.datetime:
    """ISO 8601; a time without an offset is taken as UTC. ValueError says what was wrong."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def utc_from_seconds(seconds: float) -> dt.datetime:
    """A reactor time (seconds since the epoch) as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
