"""Long ranges of samples reduced to about one point per pixel: min, max and mean per time bucket, gaps kept.

A chart of a month of one-second samples would need millions of points;
the browser gets ``buckets`` points per series instead, each the min, max
and mean of the samples in its slice of [since, until). Where no sample
came for longer than the gap threshold (the DTU was offline, the meter
failed) a point of nulls is put between the two buckets, so the chart
shows a gap rather than a line drawn across it.

Samples arrive oldest first (the store reads them along the (key, time)
index), so one bucket is open at a time: memory is one entry per bucket
and series, whatever the range holds. The sums, minima and maxima of a
whole upload are taken with ``map`` over the open bucket's lists, which
keeps the per-value work in C.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

#: The gap threshold is this many times the mean interval between samples, unless given.
GAP_INTERVALS = 3.0

Number = float | int


@attrs.define
class _Bucket:
    index: int
    first: float
    last: float
    mins: list[Number | None]
    maxs: list[Number | None]
    sums: list[Number]
    counts: list[int]


def _min(a: Number | None, b: Number | None) -> Number | None:
    if a is None:
        return b
    return a if b is None or a <= b else b


def _max(a: Number | None, b: Number | None) -> Number | None:
    if a is None:
        return b
    return a if b is None or a >= b else b


class Downsampler:
    """Feeds of (time in seconds, values) in time order in; ``result()`` out."""

    def __init__(self, since: float, until: float, buckets: int, gap: float | None = None) -> None:
        if not until > since or buckets < 1:
            raise ValueError("need since < until and at least one bucket")
        self.since = since
        self.until = until
        self.width = (until - since) / buckets
        self.gap = gap
        self.samples = 0
        self._first: float | None = None
        self._last: float | None = None
        self._open: _Bucket | None = None
        self._closed: list[_Bucket] = []
        self._series = 0

    def _bucket_for(self, time: float) -> _Bucket:
        index = int((time - self.since) // self.width)
        bucket = self._open
        if bucket is None or bucket.index != index:
            if bucket is not None:
                self._closed.append(bucket)
            n = self._series
            bucket = self._open = _Bucket(index, time, time, [None] * n, [None] * n, [0] * n, [0] * n)
        bucket.last = time
        if self._first is None:
            self._first = time
        self._last = time
        return bucket

    def _widen(self, bucket: _Bucket, series: int) -> None:
        if series > self._series:
            self._series = series
        grow = series - len(bucket.sums)
        if grow > 0:
            bucket.mins.extend([None] * grow)
            bucket.maxs.extend([None] * grow)
            bucket.sums.extend([0] * grow)
            bucket.counts.extend([0] * grow)

    def add_row(self, time: float, values: Sequence[Number]) -> None:
        """One upload: a value for each series 0..len(values)-1."""
        self.samples += 1
        bucket = self._bucket_for(time)
        if len(values) > len(bucket.sums):
            self._widen(bucket, len(values))
        n = len(values)
        head = slice(0, n)
        bucket.mins[head] = map(_min, bucket.mins[head], values)
        bucket.maxs[head] = map(_max, bucket.maxs[head], values)
        bucket.sums[head] = map(float.__add__, map(float, bucket.sums[head]), values)
        bucket.counts[head] = [c + 1 for c in bucket.counts[head]]

    def add(self, time: float, series: int, value: Number | None) -> None:
        """One value of one series (a meter point); None (a NaN read) only marks the time."""
        self.samples += 1
        bucket = self._bucket_for(time)
        if series >= len(bucket.sums):
            self._widen(bucket, series + 1)
        if value is None:
            return
        bucket.mins[series] = _min(bucket.mins[series], value)
        bucket.maxs[series] = _max(bucket.maxs[series], value)
        bucket.sums[series] += value
        bucket.counts[series] += 1

    def gap_threshold(self) -> float | None:
        """Seconds without a sample that make a gap: the one given, or GAP_INTERVALS mean intervals."""
        if self.gap is not None:
            return self.gap
        if self._first is None or self._last is None or self.samples < 2:
            return None
        return GAP_INTERVALS * (self._last - self._first) / (self.samples - 1)

    def result(self) -> dict[str, Any]:
        """Column-wise, as uPlot draws: ``time`` and, per series, ``mean``, ``min`` and ``max`` (null in gaps)."""
        buckets = [*self._closed, *([self._open] if self._open is not None else [])]
        threshold = self.gap_threshold()
        n = self._series
        times: list[float] = []
        means: list[list[float | None]] = [[] for _ in range(n)]
        mins: list[list[Number | None]] = [[] for _ in range(n)]
        maxs: list[list[Number | None]] = [[] for _ in range(n)]
        gaps = 0
        previous: _Bucket | None = None
        for bucket in buckets:
            if previous is not None and threshold is not None and bucket.first - previous.last > max(
                threshold, self.width
            ):
                gaps += 1
                times.append((previous.last + bucket.first) / 2)
                for column in (*means, *mins, *maxs):
                    column.append(None)
            previous = bucket
            times.append(round((bucket.first + bucket.last) / 2, 3))
            for i in range(n):
                count = bucket.counts[i] if i < len(bucket.counts) else 0
                means[i].append(bucket.sums[i] / count if count else None)
                mins[i].append(bucket.mins[i] if count else None)
                maxs[i].append(bucket.maxs[i] if count else None)
        return {
            "bucket_s": self.width,
            "gap_s": threshold,
            "samples": self.samples,
            "gaps": gaps,
            "time": times,
            "mean": means,
            "min": mins,
            "max": maxs,
        }


def downsample_rows(
    rows: Iterable[tuple[float, Sequence[Number]]], since: float, until: float, buckets: int, gap: float | None,
) -> Downsampler:
    """A Downsampler fed with whole rows (a DTU's uploads)."""
    sampler = Downsampler(since, until, buckets, gap)
    for time, values in rows:
        sampler.add_row(time, values)
    return sampler
