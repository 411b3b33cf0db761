"""Modbus at scale: thousands of meters of 10 registers each, polled every second through transparent DTUs.

    python -m benchmarks.run --only modbus_scale --merge

A rising series of meter counts on one layout (several meters on each DTU's RS-485 bus, as
deployed), and the target count on the other (one meter per DTU: the most connections for
the same polls). Each step is a fresh center (SQLite, as in the other scenarios) and a fresh
simulator; the poll figures are the center's own (GET /api/status), the CPU of both
processes is read from /proc. ``--profile`` adds a py-spy profile of the center at the
largest step.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from benchmarks.procs import (
    CLOCK_TICKS,
    PATIENCE,
    VENV_BIN,
    ApiClient,
    Child,
    ReportReader,
    cpu_seconds,
    free_port,
    rss_bytes,
    start_center,
    start_sim,
)
from dtucenter.latency import histogram_difference, percentile

HEADING = "## Modbus at scale: meters of 10 registers polled every second (issue 14)"
TARGET_LINE = "- Modbus at scale"
#: The issue's target: this many meters, each polled once a second, on one core with no timeouts.
TARGET_METERS = 5000
#: Completed polls must reach this share of the polls due for a step to count as keeping up.
KEEP_UP = 0.99
REGISTERS = 10
TOKEN = "benchmark-token"


@attrs.frozen
class Layout:
    #: Meters on each DTU's bus (unit ids 1..n).
    meters_per_dtu: int

    @property
    def name(self) -> str:
        return "one meter per DTU" if self.meters_per_dtu == 1 else f"{self.meters_per_dtu} meters per DTU"


@attrs.frozen
class ModbusScale:
    #: (layout, meter counts) in the order run.
    series: tuple[tuple[Layout, tuple[int, ...]], ...]
    warmup: float
    measure: float
    profile_seconds: float
    connect_rate: int


BUS = Layout(10)
SINGLE = Layout(1)
FULL = ModbusScale(series=((BUS, (1000, 3000, 5000)), (SINGLE, (5000,))),
                   warmup=5.0, measure=15.0, profile_seconds=15.0, connect_rate=2000)
SMOKE = ModbusScale(series=((BUS, (20,)),), warmup=1.0, measure=1.0, profile_seconds=0.0, connect_rate=1000)


def config(meters: int, layout: Layout) -> str:
    """The bridge's config (dtucenter/modbus/config.py): a link per DTU, its meters on units 1..n, each
    of 10 holding registers polled every second (one FC 3 request per poll)."""
    parts = []
    dtus = -(-meters // layout.meters_per_dtu)
    number = 0
    for n in range(1, dtus + 1):
        parts.append(
            f'[[link]]\nname = "sim-{n:05d}"\nprotocol = "rtu"\nregistration = "SIM-{n:05d}"\n'
            f'heartbeat = "HB"\ntimeout = 3.0\nretries = 1\n\n'
        )
        for unit in range(1, layout.meters_per_dtu + 1):
            number += 1
            if number > meters:
                break
            parts.append(f'[[meter]]\nname = "meter-{number:05d}"\nlink = "sim-{n:05d}"\nunit = {unit}\n'
                         f'interval = 1\n')
            for addr in range(REGISTERS):
                parts.append(f'\n[[meter.point]]\nname = "r{addr}"\ntable = "holding"\naddress = {addr}\n'
                             f'type = "uint16"\n')
            parts.append("\n")
    return "".join(parts)


def polling(api: ApiClient) -> dict[str, Any]:
    polling: dict[str, Any] | None = api.get("/api/status")["modbus"]
    if polling is None:
        raise RuntimeError("the center runs no Modbus bridge: /api/status has no modbus part")
    return polling


def wait_links_online(api: ApiClient, center: Child, count: int) -> None:
    """Gives up only when no more links come online for PATIENCE seconds."""
    progress, progressed = -1, time.monotonic()
    while True:
        if not center.alive():
            raise RuntimeError(f"the center exited:\n{center.tail()}")
        online = polling(api)["links_online"]
        if online >= count:
            return
        if online > progress:
            progress, progressed = online, time.monotonic()
        elif time.monotonic() - progressed > PATIENCE:
            raise RuntimeError(f"stuck at {progress} of {count} links online for {PATIENCE:.0f}s")
        time.sleep(0.5)


def run_step(workdir: Path, scale: ModbusScale, layout: Layout, meters: int, profile: bool = False) -> dict[str, Any]:
    dtus = -(-meters // layout.meters_per_dtu)
    path = workdir / "modbus.toml"
    path.write_text(config(meters, layout))
    port, modbus_port, api_port = free_port(), free_port(), free_port()
    center = start_center(workdir, port, [
        "--config", str(path), "--modbus", f"tcp:{modbus_port}:interface=127.0.0.1:backlog=4096",
        "--api", f"tcp:{api_port}:interface=127.0.0.1", "--api-token", TOKEN,
    ])
    api = ApiClient(api_port, TOKEN)
    sim, report_path = start_sim(workdir, "modbus", [
        "modbus", "--server", f"127.0.0.1:{modbus_port}", "--count", str(dtus),
        "--registration", "SIM-{n:05d}", "--heartbeat", "HB", "--heartbeat-interval", "30",
        "--units", f"1-{layout.meters_per_dtu}" if layout.meters_per_dtu > 1 else "1",
        "--connect-rate", str(scale.connect_rate), "--report-interval", "0.5",
    ])
    profiled: dict[str, Any] | None = None
    try:
        reader = ReportReader(report_path)
        wait_links_online(api, center, dtus)
        time.sleep(scale.warmup)  # every meter polled on its live link a few times
        first, cpu_a, sim_cpu_a, wall_a = (polling(api), cpu_seconds(center.pid), cpu_seconds(sim.pid),
                                           time.monotonic())
        threads_a = thread_cpu(center.pid)
        sim_a = reader.next(sim)
        time.sleep(scale.measure)
        last, cpu_b, sim_cpu_b, wall_b = (polling(api), cpu_seconds(center.pid), cpu_seconds(sim.pid),
                                          time.monotonic())
        threads_b = thread_cpu(center.pid)
        sim_b = reader.next(sim)
        load = os.getloadavg()[0]
        rss = rss_bytes(center.pid)
        links = api.get("/api/links")["links"]
        if profile and scale.profile_seconds > 0:
            profiled = _profile(workdir, center, scale.profile_seconds)
    finally:
        sim.stop()
        center.stop()
    seconds = wall_b - wall_a
    window = poll_window(first, last, seconds, links, sim_a, sim_b)
    completed = window["polls_per_s"]
    cpu = (cpu_b - cpu_a) / seconds
    row = {
        "layout": layout.name, "meters_per_dtu": layout.meters_per_dtu, "meters": meters, "dtus": dtus,
        **window,
        "cpu": cpu, "sim_cpu": (sim_cpu_b - sim_cpu_a) / seconds, "rss": rss, "load": load,
        "polls_per_core_s": completed / cpu if cpu else 0.0,
        "cpu_us_per_poll": cpu / completed * 1e6 if completed else 0.0,
        "threads_cpu": {name: (threads_b[name] - threads_a[name]) / seconds for name in threads_b},
    }
    row["kept_up"] = row["timed_out"] == 0 and row["failed"] == 0 and completed >= KEEP_UP * meters
    if profiled is not None:
        row["profile"] = profiled
    return row


def poll_window(
    first: dict[str, Any], last: dict[str, Any], seconds: float, links: list[dict[str, Any]],
    sim_a: dict[str, Any], sim_b: dict[str, Any],
) -> dict[str, Any]:
    """The polls of a window, from the center's two readings of GET /api/status's ``modbus`` part at its ends,
    its links at the end, and the simulator's two snapshots."""
    durations = histogram_difference(last["duration_histogram"], first["duration_histogram"])

    def delta(name: str) -> int:
        return int(last[name] - first[name])

    polls, failed = delta("polls"), delta("failed")
    return {
        "seconds": seconds, "polls_per_s": (polls - failed) / seconds, "failed": failed,
        "timed_out": delta("timed_out"), "request_timeouts": delta("request_timeouts"),
        "skipped": delta("skipped") if "skipped" in last else None,
        "p50": percentile(durations, 0.5), "p99": percentile(durations, 0.99),
        "links_online": sum(link["online"] for link in links),
        "reconnects": sum(link["counters"]["connects"] - 1 for link in links if link["counters"]["connects"] > 1),
        "sim_answered_per_s": (sim_b["counts"].get("polls", 0) - sim_a["counts"].get("polls", 0))
        / max(sim_b["elapsed"] - sim_a["elapsed"], 1e-9),
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the process's reactor thread (the main one) and of all its other threads together
    (the store's writer and readers: SQLite's own work runs there, without the GIL)."""
    totals = {"reactor": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        thread = "reactor" if task.name == str(pid) else "other threads"
        totals[thread] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def _profile(workdir: Path, center: Child, seconds: float) -> dict[str, Any]:
    """py-spy on the center, as the ``profile`` scenario does, while the step's load goes on."""
    from benchmarks import report

    py_spy = VENV_BIN / "py-spy"
    if not py_spy.exists():
        return {"skipped": "py-spy is not installed in this venv"}
    raw = workdir / "profile.txt"
    result = subprocess.run(
        [str(py_spy), "record", "--pid", str(center.pid), "--duration", str(int(seconds)),
         "--rate", "200", "--gil", "--format", "raw", "--output", str(raw)],
        capture_output=True, text=True, timeout=seconds + PATIENCE, check=False,
    )
    if result.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed: {(result.stderr or result.stdout).strip()[-300:]}"}
    return {"seconds": int(seconds), **report.summarise_profile(raw.read_text())}


def run_modbus_scale(workroot: Path, scale: ModbusScale, log: Callable[[str], None],
                     profile: bool = True) -> dict[str, Any]:
    """Every step of every series, in order (a step that falls behind says where and why; the next ones say
    by how much more)."""
    steps: list[dict[str, Any]] = []
    largest = max(max(counts) for _, counts in scale.series)
    for layout, counts in scale.series:
        for meters in counts:
            log(f"modbus at scale: {meters} meters, {layout.name}")
            workdir = workroot / f"modbus-scale-{layout.meters_per_dtu}-{meters}"
            workdir.mkdir()
            row = run_step(workdir, scale, layout, meters, profile=profile and layout == scale.series[0][0]
                           and meters == largest)
            log(f"  {step_line(row)}")
            steps.append(row)
    return {"steps": steps, "target_meters": TARGET_METERS}


# -- the report ------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def step_line(row: dict[str, Any]) -> str:
    return (f"{row['meters']:,} meters ({row['layout']}): {row['polls_per_s']:.0f} polls/s completed, "
            f"{row['timed_out']} timed out, {row['failed']} failed, p50 {_ms(row['p50'])} ms p99 {_ms(row['p99'])} ms, "
            f"center CPU {row['cpu']:.0%} ({row['polls_per_core_s']:.0f} polls per core-second), "
            f"simulator CPU {row['sim_cpu']:.0%}")


def target_line(result: dict[str, Any]) -> str:
    """The Targets entry: polls per second per core against the 5,000 wanted."""
    steps = result["steps"]
    at_target = [s for s in steps if s["meters"] >= TARGET_METERS]
    met = bool(at_target) and all(s["kept_up"] and s["cpu"] <= 1.0 for s in at_target)
    per_core = max(s["polls_per_core_s"] for s in steps)
    kept = [s for s in steps if s["kept_up"]]
    text = f"{per_core:,.0f} polls per core-second at best"
    if kept:
        top = max(kept, key=lambda s: s["meters"])
        text += (f"; the largest step kept up with: {top['meters']:,} meters ({top['layout']}), "
                 f"{top['polls_per_s']:,.0f} polls/s at center CPU {top['cpu']:.0%}")
    else:
        text += "; no step kept up"
    if at_target:
        text += "; at 5,000 meters: " + ", ".join(
            f"{s['layout']} {s['polls_per_s']:,.0f} polls/s, {s['timed_out']} timed out, p99 {_ms(s['p99'])} ms, "
            f"CPU {s['cpu']:.0%}" for s in at_target)
    verdict = f"**met**: {text}" if met else f"**missed**: {text}"
    return f"{TARGET_LINE}, {TARGET_METERS:,} meters of 10 registers polled every second on one core: {verdict}"


def render(result: dict[str, Any] | None) -> list[str]:
    if not result or not result.get("steps"):
        return []
    lines = [
        HEADING,
        "",
        "Each step is a fresh center (SQLite) and simulator. The simulated DTUs dial the `--modbus` listener,",
        "register (`SIM-00001`...) and answer FC 3 for holding 0-9 of each unit on their bus (RTU framing);",
        "every meter has one poll of one request a second, all on the same 1 s grid. Completed = polls",
        "without any error, counted by the center (GET /api/status) over the measured window after",
        "warm-up; a poll lasts from its first request to its last answer, queueing on its bus included.",
        "CPU is per wall second (100% is one core); polls per core-second = completed / center CPU. The load",
        "average (1 min, at the end of the window) is the whole machine's: 2 cores, shared with other work.",
        "",
        ("| layout | meters | DTUs | polls/s completed | timed out | failed | poll p50 (ms) | poll p99 (ms) "
         "| center CPU | polls per core-second | CPU per poll (us): reactor + other threads | simulator CPU "
         "| center RSS (MiB) | load average | kept up |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['layout']} | {s['meters']:,} | {s['dtus']:,} | {s['polls_per_s']:,.0f} | {s['timed_out']} | "
            f"{s['failed']} | {_ms(s['p50'])} | {_ms(s['p99'])} | {s['cpu']:.0%} | {s['polls_per_core_s']:,.0f} | "
            f"{_split(s)} | {s['sim_cpu']:.0%} | {s['rss'] / 1024 / 1024:.1f} | "
            f"{s.get('load', 0.0):.1f} | {'yes' if s['kept_up'] else 'no'} |")
    profiled = [s for s in result["steps"] if s.get("profile") and not s["profile"].get("skipped")]
    if profiled:
        s = profiled[0]
        lines += ["", (f"py-spy sampled the center (200 Hz, only the thread holding the GIL) for "
                       f"{s['profile']['seconds']} s at {s['meters']:,} meters ({s['layout']}):"), "",
                  *profile_table(s["profile"])]
    return [*lines, ""]


def _split(step: dict[str, Any]) -> str:
    threads = step.get("threads_cpu")
    if not threads or not step["polls_per_s"]:
        return f"{step['cpu_us_per_poll']:.0f}"
    reactor, others = (threads[name] / step["polls_per_s"] * 1e6 for name in ("reactor", "other threads"))
    return f"{step['cpu_us_per_poll']:.0f}: {reactor:.0f} + {others:.0f}"


def profile_table(profile: dict[str, Any], top: int = 12) -> list[str]:
    lines = ["| own time | function |", "|---:|---|"]
    lines += [f"| {share:.1%} | `{name}` |" for name, share in profile["own"][:top]]
    lines += ["", "| total time (incl. callees) | dtucenter function |", "|---:|---|"]
    lines += [f"| {share:.1%} | `{name}` |" for name, share in profile["total"][:top]]
    return lines


def with_target_line(report: str, result: dict[str, Any]) -> str:
    """``report`` with its Targets entry for Modbus at scale replaced, or added at the end of the list:
    ``--only modbus_scale --merge`` leaves the other entries as they were measured."""
    line = target_line(result)
    lines = report.split("\n")
    for index, existing in enumerate(lines):
        if existing.startswith(TARGET_LINE):
            lines[index] = line
            return "\n".join(lines)
    if "## Targets" not in lines:
        return report
    index = lines.index("## Targets") + 1
    while index < len(lines) and (not lines[index] or lines[index].startswith(("- ", "  "))):
        if not lines[index] and any(item.startswith("- ") for item in lines[lines.index("## Targets"):index]):
            break
        index += 1
    lines.insert(index, line)
    return "\n".join(lines)
