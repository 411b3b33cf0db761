"""Latency histograms: log-scale buckets 2 % wide, cheap to fill and to subtract.

Used by the simulator (ack latencies), the DTU half (ack latencies), the store
(commit durations) and the Modbus bridge (poll durations); /metrics turns them
into Prometheus histograms at scrape time (:meth:`Histogram.cumulative`).
A histogram rather than a list of samples: a run at thousands of events a
second for hours would otherwise keep millions of floats, and percentiles of
a window come from subtracting two cumulative snapshots.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
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


class Histogram:
    """Durations in :func:`bucket_of` buckets, and their exact sum: what a Prometheus histogram needs.

    Filling one costs a logarithm and a dict update, so it may sit on a hot path
    (an ack per upload); the Prometheus buckets are made from it only when scraped.
    """

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        #: Seconds, summed over every duration recorded.
        self.total = 0.0

    def record(self, seconds: float, count: int = 1) -> None:
        """``count`` durations of ``seconds`` each (a batch acknowledged at once)."""
        self.buckets[bucket_of(seconds)] += count
        self.total += seconds * count

    @property
    def count(self) -> int:
        return self.buckets.total()

    def cumulative(self, bounds: Iterable[float]) -> list[tuple[float, int]]:
        """For each of the ascending ``bounds``, how many durations were at most it (and ``inf``: all).

        A 2 % bucket that straddles a bound is counted above it: a count may miss durations
        that were within 2 % below its bound.
        """
        ordered = sorted(self.buckets.items())
        counts: list[tuple[float, int]] = []
        seen = 0
        index = 0
        for bound in bounds:
            while index < len(ordered) and bucket_upper_bound(ordered[index][0]) <= bound * (1 + 1e-9):
                seen += ordered[index][1]
                index += 1
            counts.append((bound, seen))
        counts.append((math.inf, seen + sum(count for _, count in ordered[index:])))
        return counts
