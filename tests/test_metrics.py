"""The metrics' pieces: every counter the center keeps is exported, histograms convert right, docs list every metric."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dtucenter.latency import Histogram
from dtucenter.web.metrics import DROPPED_PREFIX, STATS_METRICS

ROOT = Path(__file__).resolve().parents[1]
#: ``stats["name"]`` and ``stats[f"prefix{...}"]`` wherever the center counts into its Counter.
STATS_KEY = re.compile(r"""stats\[(f?)["']([a-z_]+)(\{?)""")
#: Keys handed to the one method that counts a key it is given (``self.stats[kind] += 1``).
CLOSED_KEY = re.compile(r"""_close_for_junk\(\s*["']([a-z_]+)""")


def counted_keys() -> tuple[set[str], set[str]]:
    """The literal keys and the prefixes of computed keys counted into ``stats`` by the center's code."""
    keys: set[str] = set()
    prefixes: set[str] = set()
    for path in (ROOT / "dtucenter").rglob("*.py"):
        if "sim" in path.relative_to(ROOT).parts:
            continue  # the simulator keeps its own statistics
        source = path.read_text()
        for is_f, key, computed in STATS_KEY.findall(source):
            (prefixes if is_f and computed else keys).add(key)
        keys.update(CLOSED_KEY.findall(source))
    return keys, prefixes


def test_every_counter_the_center_keeps_is_a_metric() -> None:
    keys, prefixes = counted_keys()
    assert "uploads_stored" in keys and "logins" in keys, "the pattern finds the center's counters"
    assert prefixes == {DROPPED_PREFIX}
    missing = keys - set(STATS_METRICS)
    assert not missing, f"add these to dtucenter/web/metrics.py STATS_METRICS and docs/integrations.md: {missing}"
    assert not set(STATS_METRICS) - keys, "a metric for a counter nobody counts any more"


def test_a_histogram_turns_into_cumulative_buckets() -> None:
    histogram = Histogram()
    for seconds in (0.0004, 0.002, 0.002, 0.3, 20.0):
        histogram.record(seconds)
    assert histogram.count == 5 and histogram.total == pytest.approx(20.3044)
    assert histogram.cumulative((0.001, 0.01, 1.0, 10.0)) == [(0.001, 1), (0.01, 3), (1.0, 4), (10.0, 4), (math.inf, 5)]
    assert Histogram().cumulative((1.0,)) == [(1.0, 0), (math.inf, 0)]


def test_a_duration_just_under_a_bound_may_land_above_it_but_never_below() -> None:
    histogram = Histogram()
    histogram.record(0.0099)  # its 2 % bucket reaches past 0.01
    histogram.record(0.0101)
    (_, under), (_, everything) = histogram.cumulative((0.01,))
    assert under <= 1 and everything == 2
