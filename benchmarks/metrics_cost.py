"""What the Prometheus metrics cost the ingest path: the ingest steps of benchmarks.run, with and without.

    python -m benchmarks.metrics_cost --without /tmp/dtucenter-before    # a source tree without the metrics
    python -m benchmarks.metrics_cost --rates 11000,12500 --rounds 3 --scrape-interval 1

"with": this tree's center with ``--metrics`` on a port of its own, scraped every
``--scrape-interval`` seconds for the whole step (Prometheus' default is 15 s:
once a second is the pessimistic case). "without": the center of the ``--without``
source tree (for example ``git archive`` of the commit before the metrics), run
with ``PYTHONPATH`` pointing at it, not scraped; or, without ``--without``, this
tree's center not scraped (what only the always-on counting costs, nothing else).
The variants alternate within each round, so that a busy neighbour on the machine
slows both alike; the center's CPU per acked frame is the figure to compare when the
machine, not the center, limits the rate. The result is a Markdown table on stdout (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.procs import PATIENCE, VENV_BIN, free_port, raise_file_limit, start_center
from benchmarks.run import FULL, run_ingest_step


class Scraper(threading.Thread):
    """GETs /metrics every ``interval`` seconds until stopped; keeps how long each scrape took."""

    def __init__(self, url: str, interval: float, tolerant: bool = False) -> None:
        """``tolerant``: a scrape that finds nobody listening (the center not up yet, or gone) is skipped."""
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.interval = interval
        self.tolerant = tolerant
        self.durations: list[float] = []
        self.sizes: list[int] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=PATIENCE) as response:
                    self.sizes.append(len(response.read()))
            except OSError:  # urllib's URLError too
                if not self.tolerant:
                    raise
                continue
            self.durations.append(time.monotonic() - started)

    def stop(self) -> None:
        self._stopping.set()
        self.join(PATIENCE)


def run_variant(workroot: Path, name: str, rate: int, without: Path | None, scrape: float | None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{rate}-", dir=workroot))
    port, metrics_port = free_port(), free_port()
    twistd: Sequence[str] = (str(VENV_BIN / "twistd"),)
    extra: list[str] = []
    if without is not None:
        twistd = ("env", f"PYTHONPATH={without}", *twistd)
    if scrape is not None:
        extra = ["--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"]
    center = start_center(workdir, port, extra, twistd)
    scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics", scrape) if scrape is not None else None
    try:
        if scraper is not None:
            scraper.start()
        step = run_ingest_step(workdir, FULL, center, port, rate, name, workdir / "center.db")
    finally:
        try:
            if scraper is not None:
                scraper.stop()
        finally:
            center.stop()
    if scraper is not None and scraper.durations:
        step["scrape_ms"] = 1000 * statistics.median(scraper.durations)
        step["scrape_bytes"] = scraper.sizes[-1]
    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.metrics_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="8000,11000,12500", help="offered frames/s, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--without", type=Path, default=None, help="a source tree of the center without metrics")
    args = parser.parse_args(argv)
    raise_file_limit()
    rates = [int(rate) for rate in args.rates.split(",")]
    variants = [("without", args.without, None), ("with", None, args.scrape_interval)]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="dtucenter-metrics-cost-") as root:
        for round_ in range(args.rounds):
            for rate in rates:
                for name, without, scrape in variants if round_ % 2 == 0 else reversed(variants):
                    step = run_variant(Path(root), name, rate, without, scrape)
                    results.setdefault((name, rate), []).append(step)
                    print(f"round {round_ + 1} {name} {rate}/s: {step['frames_per_s']:.0f} frames/s, "
                          f"p99 {1000 * (step['p99'] or 0):.1f} ms, CPU {100 * step['cpu']:.0f}%", file=sys.stderr)
    print("| offered frames/s | metrics | acked frames/s | ack p50 (ms) | ack p99 (ms) | center CPU "
          "| center CPU per frame (us) | scrape (ms) |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    for rate in rates:
        for name, _, scrape in variants:
            steps = results[name, rate]
            scrape_ms = statistics.median(s["scrape_ms"] for s in steps) if scrape is not None else None
            print(
                f"| {rate:,} | {name} | {statistics.median(s['frames_per_s'] for s in steps):,.0f} "
                f"| {1000 * statistics.median(s['p50'] or 0 for s in steps):.1f} "
                f"| {1000 * statistics.median(s['p99'] or 0 for s in steps):.1f} "
                f"| {100 * statistics.median(s['cpu'] for s in steps):.0f}% "
                f"| {1e6 * statistics.median(s['cpu'] / s['frames_per_s'] for s in steps):.1f} "
                f"| {'-' if scrape_ms is None else f'{scrape_ms:.1f}'} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
