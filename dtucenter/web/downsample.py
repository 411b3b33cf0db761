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
whole upload are taken with ``map`` of the builtins over the open bucket's
lists, which keeps the per-value work in C. A database that can reduce
the samples itself hands over whole buckets (``add_bucket``).
"""

from __future__ import annotations

import operator
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
    #: Whole rows only (``add_row``): series 0..filled-1 have a value. -1: fed value by value, no such promise.
    filled: int = 0


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
        #: Samples per series, for the mean interval between samples (several points of one poll share a time);
        #: whole rows count for every series of theirs at once.
        self._per_series: list[int] = []
        self._rows = 0
        self._first: float | None = None
        self._last: float | None = None
        self._open: _Bucket | None = None
        self._closed: list[_Bucket] = []
        self._series = 0

    def _open_bucket(self, index: int, first: float) -> _Bucket:
        bucket = self._open
        if bucket is None or bucket.index != index:
            if bucket is not None:
                self._closed.append(bucket)
            n = self._series
            bucket = self._open = _Bucket(index, first, first, [None] * n, [None] * n, [0] * n, [0] * n)
        return bucket

    def _bucket_for(self, time: float) -> _Bucket:
        bucket = self._open_bucket(int((time - self.since) // self.width), time)
        bucket.last = time
        if self._first is None:
            self._first = time
        self._last = time
        return bucket

    def _widen(self, bucket: _Bucket, series: int) -> None:
        if series > self._series:
            self._series = series
            self._per_series.extend([0] * (series - len(self._per_series)))
        grow = series - len(bucket.sums)
        if grow > 0:
            bucket.mins.extend([None] * grow)
            bucket.maxs.extend([None] * grow)
            bucket.sums.extend([0] * grow)
            bucket.counts.extend([0] * grow)

    def add_row(self, time: float, values: Sequence[Number]) -> None:
        """One upload: a value for each series 0..len(values)-1."""
        self.samples += 1
        self._rows += 1
        bucket = self._bucket_for(time)
        n = len(values)
        if n > len(bucket.sums):
            self._widen(bucket, n)
        done = min(n, bucket.filled)
        if bucket.filled < 0:  # fed value by value before: the careful way
            done = 0
            head = slice(0, n)
            bucket.mins[head] = map(_min, bucket.mins[head], values)
            bucket.maxs[head] = map(_max, bucket.maxs[head], values)
            bucket.sums[head] = map(operator.add, bucket.sums[head], values)
            bucket.counts[head] = [c + 1 for c in bucket.counts[head]]
            return
        if done:
            # The series the bucket has values of already: min, max and sums in C.
            head = slice(0, done)
            bucket.mins[head] = map(min, bucket.mins[head], values[:done])  # type: ignore[arg-type]
            bucket.maxs[head] = map(max, bucket.maxs[head], values[:done])  # type: ignore[arg-type]
            bucket.sums[head] = map(operator.add, bucket.sums[head], values[:done])
            bucket.counts[head] = [c + 1 for c in bucket.counts[head]]
        if n > done:  # the first values of these series in the bucket
            tail = slice(done, n)
            bucket.mins[tail] = bucket.maxs[tail] = bucket.sums[tail] = values[done:]
            bucket.counts[tail] = [1] * (n - done)
            bucket.filled = n

    def add_rows(self, rows: Iterable[tuple[float, Sequence[Number]]]) -> None:
        """Uploads in time order, each a value for series 0..len(values)-1: ``add_row`` for each, but a
        bucket's rows are gathered first and reduced column by column with the builtins, in C."""
        since, width = self.since, self.width
        batch: list[Sequence[Number]] = []
        index, first, last = -1, 0.0, 0.0
        for time, values in rows:
            at = int((time - since) // width)
            if at != index:
                if batch:
                    self._add_batch(index, first, last, batch)
                batch, index, first = [], at, time
            batch.append(values)
            last = time
        if batch:
            self._add_batch(index, first, last, batch)

    def _add_batch(self, index: int, first: float, last: float, batch: list[Sequence[Number]]) -> None:
        n = len(batch[0])
        if any(len(values) != n for values in batch) or (self._open is not None and self._open.index == index):
            for values in batch:  # rows of different lengths: one by one (their times within the bucket are moot)
                self.add_row(first, values)
            self._last = last
            if self._open is not None:
                self._open.last = last
            return
        columns = list(zip(*batch, strict=True))
        self._series = max(self._series, n)
        if len(self._per_series) < self._series:
            self._per_series.extend([0] * (self._series - len(self._per_series)))
        missing = self._series - n
        bucket = _Bucket(
            index, first, last, [*map(min, columns), *[None] * missing], [*map(max, columns), *[None] * missing],
            [*map(sum, columns), *[0] * missing], [len(batch)] * n + [0] * missing, filled=n,
        )
        if self._open is not None:
            self._closed.append(self._open)
        self._open = bucket
        self.samples += len(batch)
        self._rows += len(batch)
        if self._first is None:
            self._first = first
        self._last = last

    def add(self, time: float, series: int, value: Number | None) -> None:
        """One value of one series (a meter point); None (a NaN read) only marks the time."""
        self.samples += 1
        bucket = self._bucket_for(time)
        if series >= len(bucket.sums):
            self._widen(bucket, series + 1)
        self._per_series[series] += 1
        bucket.filled = -1
        if value is None:
            return
        bucket.mins[series] = _min(bucket.mins[series], value)
        bucket.maxs[series] = _max(bucket.maxs[series], value)
        bucket.sums[series] += value
        bucket.counts[series] += 1

    def add_bucket(
        self, index: int, first: float, last: float, series: int, samples: int, count: int,
        low: Number | None, high: Number | None, total: Number | None,
    ) -> None:
        """One series' bucket as the database reduced it (``samples`` rows, ``count`` of them with a value),
        in bucket order."""
        self.samples += samples
        bucket = self._open_bucket(index, first)
        bucket.first = min(bucket.first, first)
        bucket.last = max(bucket.last, last)
        self._first = first if self._first is None else min(self._first, first)
        self._last = last if self._last is None else max(self._last, last)
        if series >= len(bucket.sums):
            self._widen(bucket, series + 1)
        self._per_series[series] += samples
        bucket.filled = -1
        if count:
            bucket.mins[series] = _min(bucket.mins[series], low)
            bucket.maxs[series] = _max(bucket.maxs[series], high)
            bucket.sums[series] += total or 0
            bucket.counts[series] += count

    def gap_threshold(self) -> float | None:
        """Seconds without a sample that make a gap: the one given, or GAP_INTERVALS mean intervals."""
        if self.gap is not None:
            return self.gap
        most = max(self._rows, *self._per_series)
        if self._first is None or self._last is None or most < 2:
            return None
        return GAP_INTERVALS * (self._last - self._first) / (most - 1)

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
