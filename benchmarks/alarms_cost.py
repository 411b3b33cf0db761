"""What alarm evaluation costs the reactor thread per stored upload, without a center around it.

    python -m benchmarks.alarms_cost [--uploads 200000] [--rate 11900]

Each case publishes DTU uploads of 8 values on an event hub the alarm engine listens
on, as the DTU half does once an upload is stored (the event built only while someone
listens), and times it: no rule at all (the engine does not listen: only the check
remains), many rules none of which watches the uploading DTUs (a dict lookup), one
rule per DTU, and eight per DTU (a comparison each). ``--rate`` (uploads a second,
docs/performance.md's sustained ingest) turns the time into the share of one core it
would take. Limits are never crossed: raising writes to the store, which is the
store's cost, and happens at the rate alarms happen, not the ingest rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from dtucenter.alarms.engine import AlarmEngine, OwnedRule
from dtucenter.alarms.rules import AlarmRule
from dtucenter.events import EventHub, UploadStored

VALUES = (1, 2, 3, 4, 5, 6, 7, 8)


class _NoStore:
    def raised(self, *_: object) -> Deferred[int | None]:
        return succeed(None)

    def cleared(self, *_: object) -> Deferred[int | None]:
        return succeed(None)


def microseconds_per_upload(rules: Sequence[AlarmRule], psns: Sequence[int], uploads: int) -> float:
    clock = Clock()
    hub = EventHub()
    now = dt.datetime.now(dt.UTC)
    engine = AlarmEngine(hub, _NoStore(), clock, lambda: now, lambda kind, name: True)
    engine.start((), [OwnedRule(1, "bench", rule) for rule in rules], ())
    started = time.perf_counter()
    for i in range(uploads):
        if hub.listening:  # as the DTU half publishes
            hub.publish(UploadStored(psns[i % len(psns)], now, VALUES))
    elapsed = time.perf_counter() - started
    engine.stop()
    return elapsed / uploads * 1e6


def cases() -> list[tuple[str, list[AlarmRule], list[int]]]:
    fleet = list(range(1, 10_001))
    return [
        ("no rules", [], fleet),
        ("10,000 rules on other DTUs", [AlarmRule(name=f"r{i}", dtu=100_000 + i, point="3", above=1e9) for i in fleet],
         fleet),
        ("1 rule per DTU (10,000 DTUs)", [AlarmRule(name=f"r{i}", dtu=i, point=str(i % 8), above=1e9) for i in fleet],
         fleet),
        ("8 rules per DTU (2,000 DTUs)",
         [AlarmRule(name=f"r{i}-{j}", dtu=i, point=str(j), above=1e9) for i in range(1, 2001) for j in range(8)],
         list(range(1, 2001))),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alarms_cost", description=__doc__)
    parser.add_argument("--uploads", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=11_900, help="uploads a second to price it at")
    args = parser.parse_args(argv)
    print(f"| case | µs per upload | share of a core at {args.rate:g} uploads/s |")
    print("| --- | --- | --- |")
    for name, rules, psns in cases():
        cost = microseconds_per_upload(rules, psns, args.uploads)
        print(f"| {name} | {cost:.2f} | {cost * args.rate / 1e4:.1f}% |")


if __name__ == "__main__":
    main()
