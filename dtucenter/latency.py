"""Latency histograms: log-scale buckets 2 % wide, cheap to fill and to subtract.

Used by the simulator (ack latencies) and the Modbus bridge (poll durations).
A histogram rather than a list of samples: a run at thousands of events a
second for hours would otherwise keep millions of floats, and percentiles of
a window come from subtracting two cumulative snapshots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_BUCKET_BASE = 1.02
_LOG_BASE = math.log(_BUCKET_BASE)
#: Latencies below a microsecond all land in bucket 0.
_SMALLEST = 1e-6
#: How a bucket number turns into seconds, for readers of a JSON histogram.
BUCKET_RULE = "bucket k holds durations up to 1e-6 * 1.02**k seconds"


def bucket_of(seconds: float) -> int:
    if seconds <= _SMALLEST:
        return 0
    return int(math.log(seconds / _SMALLEST) / _LOG_BASE) + 1


def bucket_upper_bound(bucket: int) -> float:
    return _SMALLEST * _BUCKET_BASE**bucket


def percentile(histogram: Mapping[int, int], fraction: float) -> float | None:
    """The upper bound of the bucket holding the ``fraction`` quantile (None when empty)."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_upper_bound(bucket)
    return bucket_upper_bound(max(histogram))  # pragma: no cover - rank <= total always stops above


def histogram_difference(later: Mapping[Any, int], earlier: Mapping[Any, int]) -> dict[int, int]:
    """Counts that arrived between two cumulative snapshots (JSON turns keys into text; undo that)."""
    diff: dict[int, int] = {}
    for key, count in later.items():
        delta = count - earlier.get(key, 0)
        if delta:
            diff[int(key)] = delta
    return diff
