"""The ``features`` scenario of ``python -m benchmarks.run``: ingest with every integration on, and off.

Issue 14's "features priced": with MQTT publishing, alarm evaluation and
metrics on, the CPU per upload rises by at most 25% over the same run with
them off. The same ingest steps run twice against a fresh center:

- *off*: the center as the ingest scenario runs it;
- *on*: ``[mqtt]`` to a local Mosquitto with the default payload (a QoS 1,
  retained message per value), two alarm rules per DTU (a limit on one of its
  values, never crossed, and an offline rule), and ``--metrics`` on a port of its
  own, scraped every second (Prometheus' default is every 15 s).

The CPU compared is the center's processes': the center and its MQTT worker
process. Mosquitto and the simulator share the machine but are not the center.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.metrics_cost import Scraper
from benchmarks.procs import free_port
from benchmarks.run import Scale, _fresh, repeated_steps, run_ingest, start_mosquitto

#: The PSN of the ingest scenario's first DTU (run_ingest_step's simulator).
FIRST_PSN = 2_000_000
#: Seconds between scrapes of /metrics.
SCRAPE_INTERVAL = 1.0
#: The highest rate offered: about the sustained ingest rate of docs/performance.md.
TOP_RATE = 11_000


def features_config(broker_port: int, dtus: int) -> str:
    parts = [f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\n']
    for n in range(dtus):
        psn = FIRST_PSN + n
        parts.append(f'\n[[alarm]]\nname = "hot-{psn}"\ndtu = {psn}\npoint = "{n % 8}"\nabove = 1000000\n')
        parts.append(f'\n[[alarm]]\nname = "silent-{psn}"\ndtu = {psn}\noffline = 300\n')
    return "".join(parts)


@contextlib.contextmanager
def features_center(on: bool, run_dir: Path, dtus: int, scrapes: list[int] | None = None) -> Iterator[list[str]]:
    """The center's arguments with every integration ``on`` (a local Mosquitto and a scraper meanwhile), or off;
    how many scrapes answered is appended to ``scrapes``."""
    if not on:
        yield []
        return
    broker, port = start_mosquitto(run_dir)
    config = run_dir / "center.toml"
    config.write_text(features_config(port, dtus))
    metrics_port = free_port()
    scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics", SCRAPE_INTERVAL, tolerant=True)
    scraper.start()
    try:
        yield ["--config", str(config), "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"]
    finally:
        with contextlib.suppress(Exception):
            scraper.stop()
        broker.stop()
        if scrapes is not None:
            scrapes.append(len(scraper.durations))


def run_features(workdir: Path, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """The ingest steps off and on; then fresh runs of each in turn at the highest rate both kept up with."""
    rates = tuple(rate for rate in scale.ingest_rates if rate <= TOP_RATE)
    runs: dict[str, Any] = {}
    for label in ("off", "on"):
        run_dir = _fresh(workdir, label)
        log(f"features: {label}")
        scrapes: list[int] = []
        with features_center(label == "on", run_dir, scale.ingest_dtus, scrapes) as args:
            runs[label] = run_ingest(run_dir, scale, f"features-{label}", log, center_args=args, rates=rates)
        if scrapes:
            runs[label]["scrapes"] = scrapes[0]
    common = ({step["offered"] for step in runs["off"]["steps"] if step["kept_up"]}
              & {step["offered"] for step in runs["on"]["steps"] if step["kept_up"]})
    if common:
        rate = max(common)
        runs["repeated"] = {"rate": rate, "steps": repeated_steps(
            _fresh(workdir, "repeated"), scale, rate,
            [(label, functools.partial(features_center, label == "on", dtus=scale.ingest_dtus))
             for label in ("off", "on")],
            "features", log,
        )}
    return runs
