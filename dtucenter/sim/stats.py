"""Counters and latencies of a simulator run, for the progress line, the summary and the benchmark.

Latencies go into a log-scale histogram (2 % wide buckets) rather than a
list: a run at 15,000 acks a second for minutes would otherwise keep
millions of floats, and the benchmark only needs percentiles of windows,
which it gets by subtracting two cumulative snapshots.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping

import attrs

_BUCKET_BASE = 1.02
_LOG_BASE = math.log(_BUCKET_BASE)
#: Latencies below a microsecond all land in bucket 0.
_SMALLEST = 1e-6


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


#: Counters shown on the progress line, in order, with their labels: DTU-protocol devices ...
PROGRESS_FIELDS = (
    ("connected", "connected"),
    ("logged_in", "logged in"),
    ("acked", "acked"),
    ("resent", "resent"),
    ("errors", "errors"),
)
#: ... and transparent (Modbus) devices, whose "logged in" is "registration sent".
PACKET_PROGRESS_FIELDS = (
    ("connected", "connected"),
    ("logged_in", "registered"),
    ("polls", "polls answered"),
    ("heartbeats", "heartbeats"),
    ("errors", "errors"),
)


@attrs.define
class SimStats:
    """Shared by every virtual device of one process."""

    #: Current levels (go up and down).
    connected: int = 0
    logged_in: int = 0
    #: Running totals.
    counts: Counter[str] = attrs.Factory(Counter)
    latency: Counter[int] = attrs.Factory(Counter)

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount

    def error(self, kind: str) -> None:
        self.counts["errors"] += 1
        self.counts[f"error_{kind}"] += 1

    def record_latency(self, kind: str, seconds: float) -> None:
        self.latency[bucket_of(seconds)] += 1
        self.counts[kind] += 1

    def value(self, name: str) -> int:
        if name in ("connected", "logged_in"):
            return int(getattr(self, name))
        return self.counts[name]

    def line(self, elapsed: float, rates: Mapping[str, float] | None = None,
             fields: tuple[tuple[str, str], ...] = PROGRESS_FIELDS) -> str:
        parts = [f"{elapsed:7.1f}s"]
        for name, label in fields:
            text = f"{label} {self.value(name)}"
            if rates and name in rates:
                text += f" ({rates[name]:.0f}/s)"
            parts.append(text)
        p50, p99 = percentile(self.latency, 0.5), percentile(self.latency, 0.99)
        if p50 is not None and p99 is not None:
            parts.append(f"ack p50 {p50 * 1000:.1f}ms p99 {p99 * 1000:.1f}ms")
        return " | ".join(parts)

    def snapshot(self, elapsed: float) -> dict[str, Any]:
        return {
            "elapsed": round(elapsed, 3),
            "connected": self.connected,
            "logged_in": self.logged_in,
            "counts": dict(self.counts),
            "latency": {str(k): v for k, v in self.latency.items()},
        }


def merge_counts(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several processes' snapshots as one (the benchmark runs more than one simulator)."""
    merged: dict[str, Any] = {"connected": 0, "logged_in": 0, "counts": Counter(), "latency": Counter()}
    for snap in snapshots:
        merged["connected"] += snap["connected"]
        merged["logged_in"] += snap["logged_in"]
        merged["counts"].update(snap["counts"])
        merged["latency"].update({int(k): v for k, v in snap["latency"].items()})
    return merged
