"""The load benchmark: the real center (twistd, SQLite in a temp dir) against dtucenter-sim.

    python -m benchmarks.run                 # full scale, rewrites docs/performance.md (about 10 minutes)
    python -m benchmarks.run --smoke --out /tmp/perf.md   # seconds, every scenario at a tiny scale; the tests run this
    python -m benchmarks.run --only storm --merge      # one scenario, its section replaced in docs/performance.md
    python -m benchmarks.run --only junk --merge       # likewise the junk flood (also --only storm,junk)
    python -m benchmarks.run --only databases --merge --db sqlite,postgresql+psycopg://u:p@host/scratch
                                             # ingest on each database, compared (PostgreSQL: a scratch database)
    python -m benchmarks.run --only cluster --postgres URL --merge   # nodes behind HAProxy (empties that database)
    python -m benchmarks.run --only upload_cpu --merge   # CPU per acked upload, center against the baseline
    python -m benchmarks.run --only reads [--postgres URL] --merge   # month charts, a fleet's latest values

Every server and simulator is a separate process, so the center's own CPU
(from /proc/PID/stat, all threads) is measured apart from the load
generator's, which shares the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import sqlalchemy
import sqlalchemy.pool

from benchmarks import cluster, junk_flood, modbus_scale, reads, report, upload_cpu
from benchmarks.procs import (
    PATIENCE,
    ApiClient,
    Child,
    ReportReader,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    raise_file_limit,
    rss_bytes,
    start_baseline,
    start_center,
    start_sim,
    wait_listening,
)
from dtucenter.latency import histogram_difference, percentile
from dtucenter.store.models import Base

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "performance.md"


@attrs.frozen
class StormScale:
    dtus: int
    storms: int
    #: Seconds after a drop within which a DTU must be logged in again, else its login counts as lost.
    bound: float
    #: Listen backlogs to compare: None is the center's own default (no ``backlog=`` in the endpoint).
    backlogs: tuple[int | None, ...]


@attrs.frozen
class Scale:
    hold: tuple[int, ...]
    hold_idle: float
    #: Seconds for a freshly started center, and for the last logins' database work and log lines, to settle.
    settle: float
    ingest_dtus: int
    ingest_rates: tuple[int, ...]
    warmup: float
    measure: float
    profile_seconds: float
    modbus_dtus: int
    modbus_warmup: float
    modbus_seconds: float
    connect_rate: int
    storm: StormScale
    #: Fresh runs of each configuration, in turn, at the rate a cost is judged at (see :func:`repeated_steps`).
    repeats: int = 1


FULL = Scale(
    hold=(1000, 10000, 19000), hold_idle=15.0, settle=2.0, ingest_dtus=1000,
    ingest_rates=(2000, 5000, 8000, 9500, 11000, 12500, 14000, 17000, 20000, 24000),
    warmup=5.0, measure=10.0, profile_seconds=15.0, modbus_dtus=1000, modbus_warmup=5.0, modbus_seconds=20.0,
    connect_rate=2000, storm=StormScale(dtus=19_000, storms=3, bound=60.0, backlogs=(None,)), repeats=5,
)
#: Every scenario end to end (one step each), as briefly as still yields a number: the tests run it.
SMOKE = Scale(
    hold=(20,), hold_idle=0.5, settle=0.2, ingest_dtus=20, ingest_rates=(40,), warmup=0.5, measure=1.0,
    profile_seconds=0.0, modbus_dtus=5, modbus_warmup=1.0, modbus_seconds=1.0, connect_rate=1000,
    storm=StormScale(dtus=20, storms=2, bound=30.0, backlogs=(None,)),
)

#: ``--db``'s name for the default database: an SQLite file in the scenario's directory.
SQLITE = "sqlite"

#: A step has fallen behind when it delivers less than this share of the offered rate ...
KEEP_UP = 0.95
#: Values per SendTest in the ingest scenario.
VALUES = 8
#: ... or when acks take longer than this (the target is 100 ms at p99).
ACK_P99_TARGET = 0.100
#: Past this p99 the center is clearly saturated; no point offering more.
GIVE_UP_P99 = 1.0


def _sim_dtu_args(port: int, count: int, psn: int, interval: float, connect_rate: int) -> list[str]:
    return [
        "dtu", "--server", f"127.0.0.1:{port}", "--count", str(count), "--psn", str(psn),
        "--values", str(VALUES), "--interval", f"{interval:.6f}", "--connect-rate", str(connect_rate),
        "--report-interval", "0.25",
    ]


def _wait_logged_in(reader: ReportReader, sim: Child, count: int) -> dict[str, Any]:
    """Gives up only when no more DTUs log in for PATIENCE seconds: logins are slow on a busy machine, not stuck."""
    progress, progressed = -1, time.monotonic()
    while True:
        snap = reader.next(sim)
        if snap["logged_in"] >= count:
            return snap
        if snap["logged_in"] > progress:
            progress, progressed = snap["logged_in"], time.monotonic()
        elif time.monotonic() - progressed > PATIENCE:
            raise RuntimeError(f"stuck at {progress} of {count} DTUs logged in for {PATIENCE:.0f}s")


def _wait_until(reader: ReportReader, sim: Child, elapsed: float) -> dict[str, Any]:
    while True:
        snap = reader.next(sim)
        if snap["elapsed"] >= elapsed:
            return snap


# -- hold ------------------------------------------------------------------------------------------


def run_hold(workdir: Path, scale: Scale, count: int) -> dict[str, Any]:
    port = free_port()
    center = start_center(workdir, port)
    sim: Child | None = None
    try:
        time.sleep(scale.settle)
        rss_before = rss_bytes(center.pid)
        sim, path = start_sim(workdir, f"hold-{count}",
                              _sim_dtu_args(port, count, 1_000_000, 100_000.0, scale.connect_rate))
        reader = ReportReader(path)
        logged_in = _wait_logged_in(reader, sim, count)
        login_time = logged_in["elapsed"]
        time.sleep(scale.settle)  # let the last logins' database work and log lines finish
        cpu_start, wall_start = cpu_seconds(center.pid), time.monotonic()
        time.sleep(scale.hold_idle)
        idle_cpu = (cpu_seconds(center.pid) - cpu_start) / (time.monotonic() - wall_start)
        rss = rss_bytes(center.pid)
        still = reader.next(sim)["logged_in"]
        return {
            "dtus": count, "login_time": login_time, "rss": rss, "rss_before": rss_before,
            "rss_per_dtu": (rss - rss_before) / count, "idle_cpu": idle_cpu, "still_logged_in": still,
            "connect_rate": scale.connect_rate,
        }
    finally:
        if sim is not None:
            sim.stop()
        center.stop()


# -- ingest ----------------------------------------------------------------------------------------


def _max_sample_id(db: Path | str) -> int:
    """The highest sample id: rows stored so far (ids only grow), from an SQLite file or a database URL."""
    if isinstance(db, Path):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0])
    engine = sqlalchemy.create_engine(db, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT coalesce(max(id), 0) FROM samples").scalar_one())
    finally:
        engine.dispose()


def run_ingest_step(workdir: Path, scale: Scale, server: Child, port: int, rate: int, label: str,
                    db: Path | str | None) -> dict[str, Any]:
    interval = scale.ingest_dtus / rate
    sim, path = start_sim(workdir, f"ingest-{label}-{rate}",
                          _sim_dtu_args(port, scale.ingest_dtus, 2_000_000, interval, scale.connect_rate))
    try:
        reader = ReportReader(path)
        ready = _wait_logged_in(reader, sim, scale.ingest_dtus)
        first = _wait_until(reader, sim, ready["elapsed"] + scale.warmup)
        cpu_a, sim_cpu_a = cpu_seconds(server.pid), cpu_seconds(sim.pid)
        children_cpu_a = children_cpu_seconds(server.pid)
        stored_a = _max_sample_id(db) if db else 0
        last = _wait_until(reader, sim, first["elapsed"] + scale.measure)
        cpu_b, sim_cpu_b = cpu_seconds(server.pid), cpu_seconds(sim.pid)
        children_cpu_b = children_cpu_seconds(server.pid)
        stored_b = _max_sample_id(db) if db else 0
        rss = rss_bytes(server.pid)
    finally:
        sim.stop()
    seconds = last["elapsed"] - first["elapsed"]
    counts_a, counts_b = first["counts"], last["counts"]

    def delta(name: str) -> int:
        return int(counts_b.get(name, 0) - counts_a.get(name, 0))

    latency = histogram_difference(last["latency"], first["latency"])
    frames = delta("acked") / seconds
    p50, p99 = percentile(latency, 0.5), percentile(latency, 0.99)
    return {
        "offered": rate, "frames_per_s": frames,
        # One row per upload, 8 values each.
        "samples_per_s": (stored_b - stored_a) * VALUES / seconds if db else None,
        "p50": p50, "p99": p99, "cpu": (cpu_b - cpu_a) / seconds, "sim_cpu": (sim_cpu_b - sim_cpu_a) / seconds,
        # The center's child processes (the MQTT worker): their CPU is not taken from the reactor's GIL.
        "children_cpu": max(children_cpu_b - children_cpu_a, 0.0) / seconds,
        "resent": delta("resent"), "ack_timeouts": delta("ack_timeouts"), "late": delta("late"),
        "errors": delta("errors"), "rss": rss, "seconds": seconds,
        "kept_up": frames >= KEEP_UP * rate and p99 is not None and p99 < ACK_P99_TARGET,
    }


def run_ingest(workdir: Path, scale: Scale, label: str, log: Callable[[str], None],
               database: str = SQLITE, center_args: Sequence[str] = (),
               rates: Sequence[int] | None = None) -> dict[str, Any]:
    """Rising rates (or ``rates``) against the center (on ``database``: SQLite in ``workdir`` or a scratch
    database's URL, emptied first; ``label`` "center", or another with ``center_args``) or the baseline,
    until a step falls far behind."""
    port = free_port()
    db: Path | str | None = None
    if label == "baseline":
        server = start_baseline(workdir, port)
    elif database == SQLITE:
        db = workdir / "center.db"
        server = start_center(workdir, port, center_args)
    else:
        db = empty_database(database)
        server = start_center(workdir, port, ["--db", database, *center_args])
    steps: list[dict[str, Any]] = []
    try:
        for rate in rates or scale.ingest_rates:
            step = run_ingest_step(workdir, scale, server, port, rate, label, db)
            steps.append(step)
            log(f"  {label} offered {rate}/s: {report.step_line(step)}")
            if step["p99"] is None or step["p99"] > GIVE_UP_P99 or step["frames_per_s"] < 0.8 * rate:
                break
    finally:
        server.stop()
    sustained = [s for s in steps if s["kept_up"]]
    best = max(sustained, key=lambda s: s["frames_per_s"]) if sustained else None
    peak = max(steps, key=lambda s: s["frames_per_s"]) if steps else None
    return {"steps": steps, "best": best, "peak": peak, "database": describe_database(database)}


def empty_database(url: str) -> str:
    """``url`` with the center's tables dropped: the center creates them at start, as on a new database."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as connection:
            Base.metadata.drop_all(connection)
            connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    finally:
        engine.dispose()
    return url


def describe_database(database: str) -> str:
    """What the report calls a database: its engine, and for PostgreSQL the driver and the bulk path."""
    if database == SQLITE:
        return "SQLite"
    url = sqlalchemy.engine.make_url(database)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SHOW server_version").scalar_one()
    finally:
        engine.dispose()
    path = "COPY" if url.get_driver_name() == "psycopg" else "multi-row INSERT"
    return f"PostgreSQL {str(version).split()[0]} via {url.get_driver_name()} ({path})"


def run_databases(workroot: Path, scale: Scale, databases: Sequence[str], log: Callable[[str], None]
                  ) -> list[dict[str, Any]]:
    """The ingest scenario once per database, back to back, for a comparison on the same machine."""
    runs = []
    for index, database in enumerate(databases):
        log(f"ingest on {describe_database(database)}")
        runs.append(run_ingest(_fresh(workroot, f"ingest-db-{index}"), scale, "center", log, database))
    return runs


# -- MQTT publishing at the ingest rate ------------------------------------------------------------

#: The MQTT comparison's runs: the center without MQTT, and with each payload shape (docs/integrations.md).
MQTT_RUNS = (("without", None), ("value", "value"), ("device", "device"), ("batch", "batch"))


def start_mosquitto(workdir: Path) -> tuple[Child, int]:
    port = free_port()
    config = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr"]
    if os.geteuid() == 0:
        lines.append("user root")
    config.write_text("\n".join(lines) + "\n")
    broker = Child("mosquitto", ["mosquitto", "-c", str(config)], workdir / "mosquitto.log")
    wait_listening(port, broker)
    return broker, port


def _backlog_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM mqtt_backlog").fetchone()[0])


@contextlib.contextmanager
def mqtt_center(payload: str | None, run_dir: Path) -> Iterator[list[str]]:
    """The center's arguments for a run with ``payload`` (None: without MQTT), a local Mosquitto meanwhile."""
    if payload is None:
        yield []
        return
    broker, port = start_mosquitto(run_dir)
    try:
        config = run_dir / "center.toml"
        config.write_text(f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\npayload = "{payload}"\n')
        yield ["--config", str(config)]
    finally:
        broker.stop()


def run_mqtt(workdir: Path, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """The ingest steps without MQTT and with --mqtt to a local Mosquitto, one payload shape after the other;
    then fresh runs in turn at the rate each shape's cost is judged at."""
    rates = scale.ingest_rates if scale is SMOKE else tuple(r for r in scale.ingest_rates if r <= 14000)
    runs: dict[str, Any] = {}
    for label, payload in MQTT_RUNS:
        run_dir = _fresh(workdir, label)
        log(f"mqtt: {label}")
        with mqtt_center(payload, run_dir) as args:
            result = run_ingest(run_dir, scale, f"mqtt-{label}", log, center_args=args, rates=rates)
        if payload:
            result["backlog_rows"] = _backlog_rows(run_dir / "center.db")
        runs[label] = result
    kept_up = {label: {step["offered"] for step in run["steps"] if step["kept_up"]} for label, run in runs.items()}
    by_rate: dict[int, list[str]] = {}
    for label, _ in MQTT_RUNS[1:]:
        common = kept_up[label] & kept_up["without"]
        if common:
            by_rate.setdefault(max(common), []).append(label)
    payloads = dict(MQTT_RUNS)
    runs["repeated"] = [
        {"rate": rate, "steps": repeated_steps(
            _fresh(workdir, f"repeated-{rate}"), scale, rate,
            [(label, functools.partial(mqtt_center, payloads[label])) for label in ("without", *labels)],
            "mqtt", log,
        )}
        for rate, labels in sorted(by_rate.items())
    ]
    return runs


#: What a repeated run needs of its configuration: its directory in, the center's arguments out (and
#: whatever runs beside the center, such as a broker, started before and stopped after).
Prepare = Callable[[Path], contextlib.AbstractContextManager[list[str]]]


def repeated_steps(workdir: Path, scale: Scale, rate: int, configurations: Sequence[tuple[str, Prepare]],
                   name: str, log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """``scale.repeats`` rounds of one ingest step at ``rate`` for each configuration, in turn, each against a
    freshly started center.

    On this machine (2 cores of a VM) one run's CPU per frame reads up to 10% above or below the next run's
    of the same center: a cost of a few points judged from one run of each is as much the machine's as the
    center's. Runs in turn, so that a slow spell of the machine falls on both sides, and their medians
    compared (benchmarks/findings.md, "MQTT: how much of the cost was the machine").
    """
    steps: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in configurations}
    for round_ in range(scale.repeats):
        for label, prepare in configurations:
            run_dir = _fresh(workdir, f"{label}-{round_}")
            log(f"{name}: {label} at {rate}/s, round {round_ + 1} of {scale.repeats}")
            with prepare(run_dir) as args:
                result = run_ingest(run_dir, scale, f"{name}-{label}", log, center_args=args, rates=[rate])
            steps[label].append(result["steps"][0])
    return steps


# -- profile ---------------------------------------------------------------------------------------


def run_profile(workdir: Path, scale: Scale, rate: int) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if scale.profile_seconds <= 0:
        return {"skipped": "not at smoke scale"}
    if not Path(py_spy).exists():
        return {"skipped": "py-spy is not installed (pip install -e '.[bench]')"}
    port = free_port()
    center = start_center(workdir, port)
    interval = scale.ingest_dtus / rate
    sim, path = start_sim(workdir, f"profile-{rate}",
                          _sim_dtu_args(port, scale.ingest_dtus, 3_000_000, interval, scale.connect_rate))
    raw = workdir / "profile.txt"
    try:
        reader = ReportReader(path)
        ready = _wait_logged_in(reader, sim, scale.ingest_dtus)
        _wait_until(reader, sim, ready["elapsed"] + scale.warmup)
        result = subprocess.run(
            [py_spy, "record", "--pid", str(center.pid), "--duration", str(int(scale.profile_seconds)),
             "--rate", "200", "--gil", "--format", "raw", "--output", str(raw)],
            capture_output=True, text=True, timeout=scale.profile_seconds + PATIENCE, check=False,
        )
        if result.returncode != 0 or not raw.exists():
            return {"skipped": f"py-spy failed: {(result.stderr or result.stdout).strip()[-300:]}"}
    finally:
        sim.stop()
        center.stop()
    return {"rate": rate, "seconds": int(scale.profile_seconds), **report.summarise_profile(raw.read_text())}


# -- modbus ----------------------------------------------------------------------------------------


def modbus_config(count: int) -> str:
    """One link per DTU, one meter of 10 registers polled every second. The registrations are what
    ``dtucenter-sim modbus --registration SIM-{n:05d}`` sends."""
    return modbus_scale.config(count, modbus_scale.SINGLE)


def run_modbus(workdir: Path, scale: Scale) -> dict[str, Any]:
    """Polls as the center counts them (GET /api/status), not as the simulator sees them:
    only the center knows how long each poll took and which ones timed out."""
    config = workdir / "modbus.toml"
    config.write_text(modbus_config(scale.modbus_dtus))
    port, modbus_port, api_port = free_port(), free_port(), free_port()
    token = "benchmark-token"
    center = start_center(workdir, port, [
        "--config", str(config), "--modbus", f"tcp:{modbus_port}:interface=127.0.0.1",
        "--api", f"tcp:{api_port}:interface=127.0.0.1", "--api-token", token,
    ])
    api = ApiClient(api_port, token)
    dialled = time.monotonic()
    sim, path = start_sim(workdir, "modbus", [
        "modbus", "--server", f"127.0.0.1:{modbus_port}", "--count", str(scale.modbus_dtus),
        "--registration", "SIM-{n:05d}", "--heartbeat", "HB", "--heartbeat-interval", "30",
        "--units", "1", "--connect-rate", str(scale.connect_rate), "--report-interval", "0.5",
    ])
    try:
        reader = ReportReader(path)
        modbus_scale.wait_links_online(api, center, scale.modbus_dtus)
        online_time = time.monotonic() - dialled
        time.sleep(scale.modbus_warmup)  # every meter polled on its live link a few times
        first, cpu_a, wall_a = modbus_scale.polling(api), cpu_seconds(center.pid), time.monotonic()
        sim_a = reader.next(sim)
        time.sleep(scale.modbus_seconds)
        last, cpu_b, wall_b = modbus_scale.polling(api), cpu_seconds(center.pid), time.monotonic()
        sim_b = reader.next(sim)
        links = api.get("/api/links")["links"]
        rss = rss_bytes(center.pid)
    finally:
        sim.stop()
        center.stop()
    seconds = wall_b - wall_a
    return {
        "dtus": scale.modbus_dtus, "expected_per_s": float(scale.modbus_dtus),
        **modbus_scale.poll_window(first, last, seconds, links, sim_a, sim_b),
        "cpu": (cpu_b - cpu_a) / seconds, "rss": rss, "online_time": online_time,
    }


# -- redial storms ----------------------------------------------------------------------------------


def _listen_overflows() -> dict[str, int]:
    """The kernel's count of connections dropped for a full accept queue (this network namespace, all sockets)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    if len(lines) != 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:], strict=True))
    return {name: int(values.get(name, 0)) for name in ("ListenOverflows", "ListenDrops")}


def _wait_for(reader: ReportReader, sim: Child, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    while not done(snap := reader.next(sim)):
        pass
    return snap


def run_storm(workdir: Path, scale: Scale, backlog: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole fleet logged in, all its connections dropped at once (the simulator's SIGUSR1), all redialling
    together after the same 1-2 s backoff; ``storms`` times over. A login not back within ``bound`` is lost."""
    storm = scale.storm
    port = free_port()
    endpoint = f"tcp:{port}:interface=127.0.0.1" + ("" if backlog is None else f":backlog={backlog}")
    center = start_center(workdir, port, ["--dtu", endpoint])  # a later --dtu wins over start_center's
    label = "default" if backlog is None else str(backlog)
    sim: Child | None = None
    rows: list[dict[str, Any]] = []
    try:
        sim, path = start_sim(workdir, f"storm-{label}", [
            *_sim_dtu_args(port, storm.dtus, 4_000_000, 100_000.0, scale.connect_rate), "--report-interval", "0.1",
        ])
        reader = ReportReader(path)
        _wait_logged_in(reader, sim, storm.dtus)
        for number in range(1, storm.storms + 1):
            time.sleep(scale.settle)
            rss_before, overflows_before = rss_bytes(center.pid), _listen_overflows()
            before = reader.next(sim)
            cpu_before = cpu_seconds(center.pid), cpu_seconds(sim.pid)
            os.kill(sim.pid, signal.SIGUSR1)
            # Redials wait out a backoff of at least 1 s: this snapshot precedes every new login.
            dropped = _wait_for(reader, sim, lambda snap, n=number: snap["counts"].get("drop_all", 0) >= n)
            logins = dropped["counts"].get("logins", 0)

            def back(snap: dict[str, Any], logins: int = logins, dropped: dict[str, Any] = dropped) -> bool:
                relogged = snap["counts"].get("logins", 0) - logins >= storm.dtus
                return (relogged and snap["logged_in"] >= storm.dtus) or (
                    snap["elapsed"] - dropped["elapsed"] >= storm.bound)

            at_bound = _wait_for(reader, sim, back)
            lost = storm.dtus - at_bound["logged_in"] if at_bound["logged_in"] < storm.dtus else 0
            everyone = at_bound if not lost else _wait_logged_in(reader, sim, storm.dtus)
            cpu_after = cpu_seconds(center.pid), cpu_seconds(sim.pid)
            time.sleep(scale.settle)
            overflows_after = _listen_overflows()
            counts_a, counts_b = before["counts"], reader.next(sim)["counts"]
            row = {
                "storm": number, "dropped": dropped["counts"].get("dropped", 0) - counts_a.get("dropped", 0),
                "lost": lost, "all_back": everyone["elapsed"] - dropped["elapsed"],
                "connect_failed": counts_b.get("error_connect_failed", 0) - counts_a.get("error_connect_failed", 0),
                "login_timeouts": counts_b.get("error_login_timeout", 0) - counts_a.get("error_login_timeout", 0),
                "listen_overflows": {name: overflows_after[name] - overflows_before.get(name, 0)
                                     for name in overflows_after},
                "rss_before": rss_before, "rss_after": rss_bytes(center.pid),
                # From before the drop until every DTU was back: the center's and the simulator's own CPU.
                "center_cpu": cpu_after[0] - cpu_before[0], "sim_cpu": cpu_after[1] - cpu_before[1],
            }
            rows.append(row)
            log(f"  backlog {label}: {report.storm_line(row, storm.dtus)}")
    finally:
        if sim is not None:
            sim.stop()
        center.stop()
    return {"backlog": backlog, "dtus": storm.dtus, "bound": storm.bound, "storms": rows,
            "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text())}


# -- the whole run ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import sqlalchemy

    import twisted

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    return {
        "cores": os.cpu_count(), "cpu": model, "ram_gib": mem_kb / 1024 / 1024,
        "python": platform.python_version(), "twisted": twisted.__version__,
        "sqlalchemy": sqlalchemy.__version__, "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny scale, seconds (for CI)")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write the report (default {DEFAULT_OUT})")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    parser.add_argument("--only",
                        default="hold,ingest,baseline,profile,modbus,modbus_scale,storm,junk,mqtt,features,upload_cpu,"
                                "reads",
                        help="comma-separated scenarios to run (default all but databases, which runs with "
                             "--db; also: databases)")
    parser.add_argument("--profile-rate", type=int, default=None,
                        help="frames/s offered while profiling (default: the best sustained ingest rate)")
    parser.add_argument("--hold", default=None, help="comma-separated DTU counts for the hold scenario")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only re-render the report from results saved with --json")
    parser.add_argument("--findings-only", action="store_true",
                        help="only bring the report's copy of benchmarks/findings.md up to date")
    parser.add_argument("--postgres", default=None,
                        help="scratch PostgreSQL database URL for --only cluster (it is emptied), not run without; "
                             "--only reads runs on it too (after SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    parser.add_argument("--db", default=SQLITE,
                        help="comma-separated databases for the databases scenario (ingest on each, compared): "
                             f"{SQLITE!r} (a file in the temporary directory) or SQLAlchemy URLs of scratch "
                             "databases, whose tables are dropped first, e.g. "
                             "postgresql+psycopg://u:p@host/db (COPY) or postgresql+psycopg2://... (INSERT)")
    parser.add_argument("--merge", action="store_true",
                        help="with --only storm and/or junk, or --from-json: replace only those sections of the "
                             "existing report")
    args = parser.parse_args(argv)
    if args.merge and not set(args.only.split(",")) <= report.MERGEABLE and not args.from_json:
        parser.error("--merge takes --only storm, junk, databases, cluster, features, modbus_scale and/or reads "
                     "(or --from-json): the other sections share the Targets summary")
    if "cluster" in args.only.split(",") and not args.postgres:
        parser.error("--only cluster needs --postgres URL: the nodes share a PostgreSQL database")
    if args.findings_only:
        out = args.out or DEFAULT_OUT
        out.write_text(report.with_current_findings(out.read_text()))
        return 0
    if args.from_json:
        out = args.out or DEFAULT_OUT
        saved = json.loads(args.from_json.read_text())
        out.write_text(report.with_sections(out.read_text(), saved) if args.merge else report.render(saved))
        return 0
    scale = SMOKE if args.smoke else FULL
    if args.hold:
        scale = attrs.evolve(scale, hold=tuple(int(n) for n in args.hold.split(",")))
    out = args.out or DEFAULT_OUT
    only = set(args.only.split(","))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    raise_file_limit()
    workroot = Path(tempfile.mkdtemp(prefix="dtucenter-bench-"))
    results: dict[str, Any] = {"machine": machine(), "scale": "smoke" if args.smoke else "full",
                               "hold": [], "ingest": None, "baseline": None, "profile": None, "modbus": None,
                               "storm": [], "junk_flood": None, "databases": [], "mqtt": None,
                               "cluster": None, "features": None, "modbus_scale": None,
                               "upload_cpu": None, "reads": None}
    try:
        if "hold" in only:
            for count in scale.hold:
                log(f"hold: {count} DTUs")
                row = run_hold(_fresh(workroot, f"hold-{count}"), scale, count)
                log(f"  {report.hold_line(row)}")
                results["hold"].append(row)
        if "ingest" in only:
            log("ingest: center")
            results["ingest"] = run_ingest(_fresh(workroot, "ingest"), scale, "center", log)
        if "baseline" in only:
            log("ingest: baseline")
            results["baseline"] = run_ingest(_fresh(workroot, "baseline"), scale, "baseline", log)
        if "profile" in only:
            best = (results["ingest"] or {}).get("best") or (results["ingest"] or {}).get("peak")
            rate = args.profile_rate or (int(best["offered"]) if best else scale.ingest_rates[0])
            log(f"profile: center at {rate} frames/s")
            results["profile"] = run_profile(_fresh(workroot, "profile"), scale, rate)
        if "modbus" in only:
            log("modbus")
            results["modbus"] = run_modbus(_fresh(workroot, "modbus"), scale)
            log(f"  {report.modbus_line(results['modbus'])}")
        if "modbus_scale" in only:
            results["modbus_scale"] = modbus_scale.run_modbus_scale(
                workroot, modbus_scale.SMOKE if args.smoke else modbus_scale.FULL, log)
        if "storm" in only:
            for backlog in scale.storm.backlogs:
                log(f"storm: {scale.storm.dtus} DTUs, backlog {backlog or 'default'}")
                workdir = _fresh(workroot, f"storm-{backlog or 'default'}")
                results["storm"].append(run_storm(workdir, scale, backlog, log))
        if "databases" in only:
            results["databases"] = run_databases(workroot, scale, args.db.split(","), log)
        if "junk" in only:
            log("junk flood")
            results["junk_flood"] = junk_flood.run_junk_flood(
                _fresh(workroot, "junk"), junk_flood.SMOKE if args.smoke else junk_flood.FULL)
            log(f"  {report.junk_flood_line(results['junk_flood'])}")
        if "mqtt" in only:
            results["mqtt"] = run_mqtt(_fresh(workroot, "mqtt"), scale, log)
        if "upload_cpu" in only:
            log("upload cpu: center against the baseline")
            results["upload_cpu"] = upload_cpu.run_upload_cpu(
                _fresh(workroot, "upload_cpu"), upload_cpu.SMOKE if args.smoke else upload_cpu.FULL,
                lambda workdir, label, rates: run_ingest(workdir, scale, label, log, rates=rates),
                lambda workdir, rate: run_profile(workdir, scale, rate), log)
        if "features" in only:
            from benchmarks.features import run_features  # it builds on this module's scenarios

            results["features"] = run_features(_fresh(workroot, "features"), scale, log)
        if "cluster" in only:
            log("cluster")
            results["cluster"] = cluster.run_cluster(
                _fresh(workroot, "cluster"), args.postgres, cluster.SMOKE if args.smoke else cluster.FULL, log)
        if "reads" in only:
            results["reads"] = reads.run_reads(
                _fresh(workroot, "reads"), args.postgres, reads.SMOKE if args.smoke else reads.FULL, log)
    finally:
        if args.keep:
            log(f"kept {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        out.write_text(report.with_sections(out.read_text(), results))
    else:
        out.write_text(report.render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {out}")
    return 0


def _fresh(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    return path


if __name__ == "__main__":
    sys.exit(main())
