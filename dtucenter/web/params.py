"""Reading request values the same way on every endpoint: body keys, limits, times."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from dtucenter.isotime import parse_iso_time
from dtucenter.store.retention import RESOLUTIONS, Resolution, Series
from dtucenter.web.router import ApiError

#: Samples an answer holds unless ``limit`` says otherwise, and at most.
DEFAULT_SAMPLES = 1000
MAX_SAMPLES = 100_000


def check_keys(body: dict[str, Any], name: str, required: set[str], optional: frozenset[str] = frozenset()) -> None:
    """400 naming what is missing or unknown in a JSON object."""
    missing = required - body.keys()
    unknown = body.keys() - required - optional
    if missing:
        raise ApiError(400, f"{name} needs {', '.join(sorted(missing))}")
    if unknown:
        raise ApiError(400, f"{name}: unknown field {', '.join(sorted(unknown))}")


def limit_param(params: dict[str, str], default: int, most: int) -> int:
    text = params.get("limit")
    if text is None:
        return default
    try:
        limit = int(text, 10)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit must be a whole number 1..{most}, got {text!r}")
    return limit


def time_param(params: dict[str, str], name: str) -> dt.datetime | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        return parse_iso_time(text)
    except ValueError as e:
        raise ApiError(400, f"{name}: {e}") from None


def newest_first_param(params: dict[str, str]) -> bool:
    """``order=asc`` (the default: oldest first) or ``order=desc`` (newest first)."""
    text = params.get("order", "asc")
    if text not in ("asc", "desc"):
        raise ApiError(400, f"order must be asc or desc, got {text!r}")
    return text == "desc"


def resolution_param(params: dict[str, str]) -> Resolution | Literal["auto"] | None:
    """``resolution=raw|hour|day|auto`` (auto: by the range's length); None when not asked for."""
    text = params.get("resolution")
    if text is None:
        return None
    if text == "auto":
        return "auto"
    for resolution in RESOLUTIONS:
        if text == resolution:
            return resolution
    raise ApiError(400, f"resolution must be raw, hour, day or auto, got {text!r}")


def rollups_answer(series: Series, key_name: str, limit: int) -> dict[str, Any]:
    """The answer of a samples endpoint asked for roll-ups (``series`` read with ``limit + 1``)."""
    return {
        "resolution": series.resolution,
        "rollups": [point.to_json(key_name) for point in series.points[:limit]],
        "more": len(series.points) > limit,
    }
