"""``python -m benchmarks.charts``: what a chart of a long range costs the center.

Fills a scratch SQLite database with DAYS of one-second uploads of one DTU
(8 values each) and one-second readings of one meter point, then times the
chart endpoints' work (``web/charts.py``: read the range along the index and
reduce it to 1000 points) and prints the numbers docs/console.md quotes: first
from the raw rows alone, then again once the roll-up job has summarised them
(as a running center's job does in the background), when charts whose buckets
hold whole hours are drawn from the hourly roll-ups.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

from dtucenter.store import queries, retention
from dtucenter.store.accounts import first_admin_id
from dtucenter.store.db import open_engine
from dtucenter.store.models import Meter, MeterSample, Sample
from dtucenter.web.charts import reduce_dtu_samples, reduce_meter_samples
from dtucenter.web.downsample import Downsampler

START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
PSN = 1
CHUNK = 50_000


def fill(engine: object, seconds: int) -> None:
    values = [struct.pack(">8h", *(i % 1000 + k for k in range(8))) for i in range(1000)]
    with Session(engine) as session, session.begin():  # type: ignore[call-overload]
        queries.upsert_dtu(session, PSN, {}, START)
        session.add(Meter(name="m", account_id=first_admin_id(session), link="l", unit=1, interval=1.0,
                          points=json.dumps([{"name": "power", "table": "holding", "address": 0}])))
    for first in range(0, seconds, CHUNK):
        span = range(first, min(first + CHUNK, seconds))
        with Session(engine) as session, session.begin():  # type: ignore[call-overload]
            session.execute(insert(Sample), [
                {"psn": PSN, "time": START + dt.timedelta(seconds=s), "net_state": 1, "values": values[s % 1000],
                 "registers": None} for s in span
            ])
            session.execute(insert(MeterSample), [
                {"meter": "m", "point": "power", "time": START + dt.timedelta(seconds=s), "value": float(s % 977)}
                for s in span
            ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.charts", description=__doc__)
    parser.add_argument("--days", type=float, default=30.0)
    args = parser.parse_args()
    seconds = int(args.days * 86400)
    with tempfile.TemporaryDirectory() as scratch:
        engine = open_engine(f"sqlite:///{Path(scratch) / 'charts.db'}")
        began = time.perf_counter()
        fill(engine, seconds)
        print(f"filled {seconds} uploads and {seconds} meter readings in {time.perf_counter() - began:.0f} s")
        until = START + dt.timedelta(seconds=seconds)
        measure(engine, until, (1, 7, args.days), "raw rows only")
        began = time.perf_counter()
        roll_up(engine, until)
        print(f"rolled up in {time.perf_counter() - began:.0f} s")
        measure(engine, until, (1, 7, args.days), "after the roll-up job")
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        engine.dispose()


def roll_up(engine: object, until: dt.datetime) -> None:
    """What the center's roll-up job does in the background, all at once."""
    for source in (retention.DTU_SAMPLES, retention.METER_SAMPLES):
        while True:
            with Session(engine) as session, session.begin():  # type: ignore[call-overload]
                if not retention.rollup_step(session, source, until, CHUNK):
                    break


def measure(engine: object, until: dt.datetime, ranges: tuple[float, ...], what: str) -> None:
    print(f"-- {what}")
    for days in ranges:
        since = until - dt.timedelta(days=days)
        sampler = Downsampler(since.timestamp(), until.timestamp(), 1000)
        began, cpu = time.perf_counter(), time.process_time()
        with Session(engine) as session:
            reduce_dtu_samples(session, PSN, None, sampler, since, until)
        dtu_took, dtu_cpu = time.perf_counter() - began, time.process_time() - cpu
        points = len(sampler.result()["time"])
        sampler = Downsampler(since.timestamp(), until.timestamp(), 1000)
        began, cpu = time.perf_counter(), time.process_time()
        with Session(engine) as session:
            reduce_meter_samples(session, "m", "power", None, sampler, since, until)
        meter_took, meter_cpu = time.perf_counter() - began, time.process_time() - cpu
        # CPU seconds beside wall seconds: on a shared machine the wall clock counts the others' work too.
        print(f"{days:g} days: DTU chart ({int(days * 86400)} uploads x 8 values -> {points} points) "
              f"{dtu_took:.2f} s ({dtu_cpu:.2f} s CPU); meter point chart {meter_took:.2f} s "
              f"({meter_cpu:.2f} s CPU)")


if __name__ == "__main__":
    main()
