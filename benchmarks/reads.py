"""The reads scenario: charts and a fleet's latest values over HTTP, on a store as large as a month makes.

    python -m benchmarks.run --only reads --merge                       # SQLite
    python -m benchmarks.run --only reads --postgres URL --merge        # SQLite, then PostgreSQL (emptied)

Fills a store with a month of one-second uploads of one DTU (8 values each,
2.6 million rows), a month of one-second readings of one meter point (2.6
million more) and the polls of a fleet of 10,000 meters of 4 points each (one a
day through the month, then the last few a minute apart; one meter in a hundred
silent for three days), in bulk (executemany on SQLite, COPY on PostgreSQL, whose sample tables get
their day partitions first, as a center running for the month made them), runs
the roll-up job's steps to completion, then starts the real center on it and
times what a client sees over HTTP: the month charts through the API's bearer
token and through a console session's cookie (at the widest chart the console
asks for), and the latest values of the whole fleet in one request. The query
plans that make them fast are read from the filled store (EXPLAIN).
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import os
import sqlite3
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from benchmarks import cluster
from benchmarks.procs import Child, cpu_seconds, free_port, start_center, wait_listening
from dtucenter.store import meters, queries, retention
from dtucenter.store.accounts import first_admin_id
from dtucenter.store.db import open_engine
from dtucenter.store.models import Meter

HEADING = "## Reads at scale: month charts and a fleet's latest values (issue 14)"
TOKEN = "benchmark-reads-token"
PSN = 1
METER = "month-meter"
POINT = "power"
FLEET_POINTS = ("voltage", "current", "power", "energy")
#: How the Targets list's line of the scenario starts (``--merge`` replaces it).
TARGET_PREFIX = "- Month charts of a DTU and a meter point"
#: Every answer below this many seconds meets the target.
TARGET_SECONDS = 1.0
#: Rows per bulk insert.
CHUNK = 50_000
#: One fleet meter in this many has had no value for STALE_DAYS: its latest values are older partitions'.
STALE_EVERY = 100
STALE_DAYS = 3
#: Chart points of the API's requests (its default), and of the console's widest chart (its most).
API_POINTS = 1000
CONSOLE_POINTS = 4000


@attrs.frozen
class ReadsScale:
    #: Seconds of one-second data before now: a month at full scale.
    seconds: int
    fleet: int
    #: Polls stored per fleet meter (a minute apart, the last a few seconds ago).
    fleet_polls: int
    #: Times each request is made; the first is reported apart (cold caches).
    repeats: int
    #: A shorter range timed too, read from the raw rows (None: not at this scale).
    raw_range: int | None


FULL = ReadsScale(seconds=30 * 86400, fleet=10_000, fleet_polls=3, repeats=5, raw_range=7 * 86400)
#: Six hours of data at 10 chart points (36-minute buckets: from the roll-ups), 50 meters: seconds.
SMOKE = ReadsScale(seconds=6 * 3600, fleet=50, fleet_polls=2, repeats=1, raw_range=None)


# -- filling the store ------------------------------------------------------------------------------


def _sqlite_time(time: dt.datetime) -> str:
    """How SQLAlchemy stores a UTC datetime in SQLite."""
    return time.strftime("%Y-%m-%d %H:%M:%S.%f")


def _packed_values() -> list[bytes]:
    return [struct.pack(">8h", *(i % 1000 + k for k in range(8))) for i in range(1000)]


def _upload_rows(start: dt.datetime, seconds: int) -> Iterator[list[tuple[Any, ...]]]:
    """(psn, time, net_state, values) of a DTU's uploads, CHUNK at a time."""
    values = _packed_values()
    for first in range(0, seconds, CHUNK):
        yield [(PSN, start + dt.timedelta(seconds=s), 1, values[s % 1000])
               for s in range(first, min(first + CHUNK, seconds))]


def _meter_rows(start: dt.datetime, seconds: int, now: dt.datetime, scale: ReadsScale
                ) -> Iterator[list[tuple[Any, ...]]]:
    """(meter, point, time, value): the month meter's readings, then the fleet's last polls."""
    for first in range(0, seconds, CHUNK):
        yield [(METER, POINT, start + dt.timedelta(seconds=s), float(s % 977))
               for s in range(first, min(first + CHUNK, seconds))]
    # A poll a day of every fleet meter through the month, so that every day's partition holds them all as a
    # running fleet's would (PostgreSQL plans a lookup by the number of meters a partition holds), then
    # the last few polls, a minute apart; but a meter in STALE_EVERY has been silent for STALE_DAYS.
    days = max(1, scale.seconds // 86400)
    fleet: list[tuple[Any, ...]] = []
    for day in range(days):
        for n in range(scale.fleet):
            if _stale(n, scale) and day >= days - STALE_DAYS:
                continue
            time = start + dt.timedelta(days=day, seconds=n % 86400)
            fleet.extend((fleet_meter(n), point, time, float(n + k + day)) for k, point in enumerate(FLEET_POINTS))
            if len(fleet) >= CHUNK:
                yield fleet
                fleet = []
    for poll in range(scale.fleet_polls):
        time = now - dt.timedelta(seconds=5 + 60 * (scale.fleet_polls - 1 - poll))
        fleet.extend((fleet_meter(n), point, time, float(n + k + poll))
                     for n in range(scale.fleet) if not _stale(n, scale) for k, point in enumerate(FLEET_POINTS))
    for first in range(0, len(fleet), CHUNK):
        yield fleet[first:first + CHUNK]


def _stale(n: int, scale: ReadsScale) -> bool:
    """Whether fleet meter ``n`` stopped answering STALE_DAYS ago (only in a store of more days than that)."""
    return scale.seconds // 86400 > STALE_DAYS and n % STALE_EVERY == STALE_EVERY - 1


def fleet_meter(n: int) -> str:
    """Before METER by name: the first page of ``scale.fleet`` meters is the fleet's."""
    return f"meter-{n:05d}"


def _devices(engine: Engine, start: dt.datetime, scale: ReadsScale) -> None:
    """The DTU, the month meter and the fleet's meters (not polled: no definition), all the admin's."""
    with Session(engine) as session, session.begin():
        queries.upsert_dtu(session, PSN, {}, start)
        admin = first_admin_id(session)
        session.add(Meter(name=METER, account_id=admin, link="month-link", unit=1, interval=1.0,
                          points=json.dumps([{"name": POINT, "table": "holding", "address": 0}])))
        points = json.dumps([{"name": p, "table": "holding", "address": 2 * k, "type": "float32"}
                             for k, p in enumerate(FLEET_POINTS)])
        session.add_all(Meter(name=fleet_meter(n), account_id=admin, link=f"fleet-link-{n // 100:03d}",
                              unit=n % 100 + 1, interval=60.0, points=points) for n in range(scale.fleet))


def _fill_sqlite(path: Path, start: dt.datetime, now: dt.datetime, scale: ReadsScale) -> None:
    # One transaction per chunk through the driver itself: SQLAlchemy's per-row work would cost more than SQLite's.
    with sqlite3.connect(path) as connection:
        for rows in _upload_rows(start, scale.seconds):
            connection.executemany("INSERT INTO samples (psn, time, net_state, \"values\") VALUES (?, ?, ?, ?)",
                                   [(psn, _sqlite_time(t), net, v) for psn, t, net, v in rows])
            connection.commit()
        for rows in _meter_rows(start, scale.seconds, now, scale):
            connection.executemany("INSERT INTO meter_samples (meter, point, time, value) VALUES (?, ?, ?, ?)",
                                   [(m, p, _sqlite_time(t), v) for m, p, t, v in rows])
            connection.commit()


def _copy(cursor: Any, table: str, columns: str, rows: list[tuple[Any, ...]],
          text_of: Callable[[tuple[Any, ...]], str]) -> None:
    """COPY through psycopg2 or psycopg 3, whichever the URL names."""
    sql, data = f"COPY {table} ({columns}) FROM STDIN", "".join(map(text_of, rows))
    if hasattr(cursor, "copy_expert"):
        cursor.copy_expert(sql, io.StringIO(data))
    else:
        with cursor.copy(sql) as copy:
            copy.write(data)


def _fill_postgresql(engine: Engine, start: dt.datetime, now: dt.datetime, scale: ReadsScale) -> None:
    """COPY, into the day partitions a center running for the month would have made."""
    with Session(engine) as session, session.begin():
        for table in ("samples", "meter_samples"):
            if not retention.is_partitioned(session, table):
                continue
            made = retention.partitions(session, table)
            day = start.date()
            while day <= now.date() + dt.timedelta(days=retention.DAYS_AHEAD):
                if f"{table}_p{day:%Y%m%d}" not in made:
                    retention.add_partition(session, table, day)
                day += dt.timedelta(days=1)
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for rows in _upload_rows(start, scale.seconds):
            _copy(cursor, "samples", 'psn, "time", net_state, "values"', rows,
                  lambda r: f"{r[0]}\t{r[1].isoformat()}\t{r[2]}\t\\\\x{r[3].hex()}\n")
            connection.commit()
        for rows in _meter_rows(start, scale.seconds, now, scale):
            _copy(cursor, "meter_samples", 'meter, point, "time", value', rows,
                  lambda r: f"{r[0]}\t{r[1]}\t{r[2].isoformat()}\t{r[3]!r}\n")
            connection.commit()
        # What autovacuum does after a fill like this one; the planner needs the tables' sizes.
        connection.autocommit = True  # type: ignore[attr-defined]
        cursor.execute("ANALYZE")
    finally:
        connection.close()


def roll_up(engine: Engine, horizon: dt.datetime) -> int:
    """The roll-up job's steps, one transaction each, until it has read every row before ``horizon``."""
    rolled = 0
    for source in retention.SOURCES:
        while True:
            with Session(engine) as session, session.begin():
                done = retention.rollup_step(session, source, horizon, CHUNK)
            rolled += done
            if done < CHUNK:
                break
    return rolled


# -- the plans ---------------------------------------------------------------------------------------


def plans(engine: Engine, since: dt.datetime, until: dt.datetime) -> dict[str, str]:
    """EXPLAIN of the statements behind the answers: a DTU's and a meter point's hourly roll-ups of the
    month (``retention.read_series``), and the fleet's newest samples (``meters.newest_samples``)."""
    postgresql = engine.dialect.name == "postgresql"
    prefix = "EXPLAIN (COSTS OFF) " if postgresql else "EXPLAIN QUERY PLAN "
    times = {"since": since, "until": until} if postgresql else {
        "since": _sqlite_time(since), "until": _sqlite_time(until)}
    statements = {
        "DTU month chart, hourly roll-ups": (
            'SELECT * FROM sample_rollups WHERE psn = :psn AND period = 3600 AND start >= :since AND start < :until',
            {"psn": PSN, **times}),
        "meter point month chart, hourly roll-ups": (
            ("SELECT * FROM meter_sample_rollups WHERE meter = :meter AND point = :point AND period = 3600 "
             "AND start >= :since AND start < :until"), {"meter": METER, "point": POINT, **times}),
    }
    pairs = [(fleet_meter(0), FLEET_POINTS[0]), (fleet_meter(1), FLEET_POINTS[1])]
    if postgresql:
        statements["latest values of a fleet (per 5,000 points)"] = (str(meters._NEWEST_POSTGRESQL), {
            "meters": [m for m, _ in pairs], "points": [p for _, p in pairs], "recent": until - meters.RECENT})
    else:
        statements["latest values of a fleet (per 5,000 points)"] = (
            str(meters._NEWEST_SQLITE), {"pairs": json.dumps(pairs)})
    found = {}
    with engine.connect() as connection:
        for name, (sql, params) in statements.items():
            rows = connection.execute(text(prefix + sql), params).all()
            found[name] = "\n".join(str(row[-1]) if not postgresql else str(row[0]) for row in rows)
    return found


# -- timing over HTTP ---------------------------------------------------------------------------------


class Client:
    """GETs as the API's clients (a bearer token) or as the console (a session cookie) make them."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.headers = headers

    def get(self, path: str) -> tuple[float, Any]:
        """Seconds until the whole answer was read, and the answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            began = time.perf_counter()
            connection.request("GET", path, headers=self.headers)
            response = connection.getresponse()
            body = response.read()
            took = time.perf_counter() - began
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        return took, json.loads(body)


def console_session(port: int) -> Client:
    """Signed in as the console is: the token once, then the session's cookie alone."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/api/session", headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie") or ""
    finally:
        connection.close()
    if response.status not in (200, 201) or not cookie:
        raise RuntimeError(f"no console session: {response.status}")
    return Client(port, {"Cookie": cookie.split(";", 1)[0]})


def _chart_check(body: dict[str, Any]) -> str:
    return f"{body['samples']:,} samples as {len(body['time'])} points"


def _window(seconds: int, points: int, **extra: str) -> str:
    until = dt.datetime.now(dt.UTC)
    since = until - dt.timedelta(seconds=seconds)
    return urlencode({**extra, "since": since.isoformat(), "until": until.isoformat(), "points": points})


def _timed(center: Child, client: Client, path: Callable[[], str], repeats: int) -> tuple[list[float], float, Any]:
    """Seconds per request, the center's median CPU seconds per request, and the last answer."""
    times, cpu = [], []
    body: Any = None
    for _ in range(repeats):
        before = cpu_seconds(center.pid)
        took, body = client.get(path())
        cpu.append(cpu_seconds(center.pid) - before)
        times.append(took)
    return times, statistics.median(cpu), body


def _fleet_check(body: dict[str, Any]) -> str:
    return f"{len(body['meters']):,} meters, {sum(len(m['samples']) for m in body['meters']):,} values"


def time_requests(center: Child, api_port: int, scale: ReadsScale) -> list[dict[str, Any]]:
    api = Client(api_port, {"Authorization": f"Bearer {TOKEN}"})
    console = console_session(api_port)
    smoke = scale is SMOKE
    api_points, console_points = (10, 10) if smoke else (API_POINTS, CONSOLE_POINTS)
    dtu, meter = f"/api/dtus/{PSN}/chart?", f"/api/meters/{METER}/chart?"
    fleet = f"/api/latest?limit={scale.fleet}"
    requests: list[tuple[str, Client, Callable[[], str], Callable[[Any], str], bool]] = [
        ("API: DTU month chart", api, lambda: dtu + _window(scale.seconds, api_points), _chart_check, True),
        ("API: meter point month chart", api, lambda: meter + _window(scale.seconds, api_points, point=POINT),
         _chart_check, True),
        ("console: DTU month chart", console, lambda: dtu + _window(scale.seconds, console_points), _chart_check,
         True),
        ("console: meter point month chart", console,
         lambda: meter + _window(scale.seconds, console_points, point=POINT), _chart_check, True),
        (f"API: latest values of {scale.fleet:,} meters", api, lambda: fleet, _fleet_check, True),
        (f"console: latest values of {scale.fleet:,} meters", console, lambda: fleet, _fleet_check, True),
    ]
    if scale.raw_range:
        week = scale.raw_range
        requests += [
            ("API: DTU week chart (raw rows)", api, lambda: dtu + _window(week, API_POINTS), _chart_check, False),
            ("API: meter point week chart (raw rows)", api,
             lambda: meter + _window(week, API_POINTS, point=POINT), _chart_check, False),
        ]
    rows = []
    for name, client, path, check, target in requests:
        times, cpu, body = _timed(center, client, path, scale.repeats if target else max(2, scale.repeats // 2))
        rest = times[1:] or times
        rows.append({"request": name, "first": times[0], "median": statistics.median(rest), "max": max(rest),
                     "center_cpu": cpu, "answer": check(body), "target": target})
    return rows


# -- the scenario ---------------------------------------------------------------------------------------


def run_on(workdir: Path, database: str | None, scale: ReadsScale, log: Callable[[str], None]) -> dict[str, Any]:
    """The scenario on SQLite (``database`` None: a file in ``workdir``) or a scratch PostgreSQL database."""
    url = database or f"sqlite:///{workdir / 'center.db'}"
    if database:
        cluster.empty_database(database)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start = now - dt.timedelta(seconds=scale.seconds)
    engine = open_engine(url)
    try:
        began = time.monotonic()
        _devices(engine, start, scale)
        if database:
            _fill_postgresql(engine, start, now, scale)
        else:
            _fill_sqlite(workdir / "center.db", start, now, scale)
        filled = time.monotonic() - began
        log(f"  filled in {filled:.0f} s")
        began = time.monotonic()
        rolled = roll_up(engine, now)
        rolled_in = time.monotonic() - began
        log(f"  {rolled:,} rows rolled up in {rolled_in:.0f} s")
        explained = plans(engine, start, now)
    finally:
        engine.dispose()
    port, api_port = free_port(), free_port()
    center: Child = start_center(workdir, port, [
        *(["--db", database] if database else []),
        "--api", f"tcp:{api_port}:interface=127.0.0.1", "--api-token", TOKEN,
    ])
    try:
        wait_listening(api_port, center)
        load = os.getloadavg()[0]
        requests = time_requests(center, api_port, scale)
        load = max(load, os.getloadavg()[0])
    finally:
        center.stop()
    for row in requests:
        log(f"  {row_line(row)}")
    return {
        "database": "SQLite" if not database else f"PostgreSQL ({make_url(database).get_driver_name()})",
        "uploads": scale.seconds, "meter_readings": scale.seconds, "fleet": scale.fleet,
        "fleet_points": len(FLEET_POINTS), "fill_seconds": filled, "rolled_up": rolled, "rollup_seconds": rolled_in,
        "requests": requests, "plans": explained, "load": load, "cores": os.cpu_count(),
    }


def run_reads(workdir: Path, postgres: str | None, scale: ReadsScale, log: Callable[[str], None]
              ) -> list[dict[str, Any]]:
    runs = []
    for name, database in (("sqlite", None), ("postgresql", postgres)):
        if name == "postgresql" and not database:
            continue
        log(f"reads on {name}")
        run_dir = workdir / name
        run_dir.mkdir()
        runs.append(run_on(run_dir, database, scale, log))
    return runs


# -- the report ---------------------------------------------------------------------------------------


def row_line(row: dict[str, Any]) -> str:
    verdict = ("met" if row["max"] < TARGET_SECONDS and row["first"] < TARGET_SECONDS else "missed") \
        if row["target"] else "no target"
    return (f"{row['request']}: first {row['first']:.3f} s, then median {row['median']:.3f} s, "
            f"max {row['max']:.3f} s, center CPU {row['center_cpu']:.2f} s ({row['answer']}; {verdict})")


def met(runs: list[dict[str, Any]]) -> bool:
    return all(row["first"] < TARGET_SECONDS and row["max"] < TARGET_SECONDS
               for run in runs for row in run["requests"] if row["target"])


def target_line(runs: list[dict[str, Any]]) -> str:
    """The Targets list's line."""
    worst = max((max(row["first"], row["max"]), row["request"], run["database"])
                for run in runs for row in run["requests"] if row["target"])
    verdict = "**met**" if met(runs) else "**missed**"
    return (f"{TARGET_PREFIX} ({runs[0]['uploads']:,} rows each) and the latest values "
            f"of {runs[0]['fleet']:,} meters over HTTP in under 1 s, on {' and '.join(r['database'] for r in runs)}: "
            f"{verdict}: the slowest, {worst[1]} on {worst[2]}, {worst[0]:.3f} s")


def render(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        HEADING, "",
        ("`python -m benchmarks.run --only reads [--postgres URL] --merge` (`benchmarks/reads.py`): a store filled "
         "in bulk with a month of one-second uploads of one DTU (8 values each) and one-second readings of one "
         "meter point, plus a fleet of meters polled once a day through the month and a minute apart at its end "
         "(one in a hundred silent for three days), the roll-up job run to completion, then the real "
         "center asked over HTTP: with the API's bearer token at the API's default 1000 points, and with a "
         "console session's cookie at the widest chart the console draws (4000 points); the fleet's latest "
         "values in one `GET /api/latest`. Wall seconds until the whole answer was read; the first request "
         "apart (cold caches), then the median and the slowest of the others. Target: every answer, first ones "
         "included, under 1 s."), "",
        target_line(runs), "",
    ]
    for run in runs:
        lines += [
            f"### {run['database']}", "",
            (f"{run['uploads']:,} uploads and {run['meter_readings']:,} meter readings, {run['fleet']:,} meters of "
             f"{run['fleet_points']} points; filled in {run['fill_seconds']:.0f} s, {run['rolled_up']:,} rows "
             f"rolled up in {run['rollup_seconds']:.0f} s; load average up to {run['load']:.1f} on {run['cores']} "
             "cores while timing."), "",
            "| request | answer | first (s) | median (s) | slowest (s) | center CPU (s) | under 1 s |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in run["requests"]:
            ok = "-" if not row["target"] else "**met**" if max(row["first"], row["max"]) < TARGET_SECONDS \
                else "**missed**"
            lines.append(f"| {row['request']} | {row['answer']} | {row['first']:.3f} | {row['median']:.3f} | "
                         f"{row['max']:.3f} | {row['center_cpu']:.2f} | {ok} |")
        lines += ["", "The plans (EXPLAIN on the filled store):", ""]
        for name, plan in run["plans"].items():
            lines += [f"- {name}:", "", "```", *plan.splitlines(), "```", ""]
    return lines
