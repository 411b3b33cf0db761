"""Counters and latencies of a simulator run, for the progress line, the summary and the benchmark.

Latencies go into a :mod:`dtucenter.latency` histogram; the benchmark takes
percentiles of windows by subtracting two cumulative snapshots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from dtucenter.latency import bucket_of, percentile

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
