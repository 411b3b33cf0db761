"""Turning benchmark results into docs/performance.md (written from scratch on every run)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import cluster, modbus_scale, reads, upload_cpu

MIB = 1024 * 1024
FINDINGS = Path(__file__).resolve().parent / "findings.md"

TARGET_HOLD_DTUS = 19_000
TARGET_HOLD_RSS = 200 * MIB
TARGET_FRAMES = 15_000
TARGET_P99 = 0.100
TARGET_BASELINE_SHARE = 0.5
#: Polls are on a 1 s grid: a window of W seconds holds W or W+1 slots per meter.
TARGET_POLL_SHARE = 0.98
TARGET_STORM_DTUS = 19_000
#: Seconds from the drop until every DTU of a redial storm is logged in again.
TARGET_STORM_SECONDS = 20.0
#: The Targets line of the redial storms starts so (``with_storm_section`` finds it by it).
STORM_TARGET = f"- {TARGET_STORM_DTUS:,} DTUs redialling at once all logged in again"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(cpu: float | None) -> str:
    return "-" if cpu is None else f"{cpu * 100:.0f}%"


def hold_line(row: dict[str, Any]) -> str:
    return (f"{row['dtus']} DTUs logged in in {row['login_time']:.1f}s, RSS {row['rss'] / MIB:.1f} MiB "
            f"({row['rss_per_dtu'] / 1024:.2f} KiB/DTU), idle CPU {_pct(row['idle_cpu'])}")


def step_line(step: dict[str, Any]) -> str:
    samples = "-" if step["samples_per_s"] is None else f"{step['samples_per_s']:.0f}"
    return (f"{step['frames_per_s']:.0f} frames/s, {samples} samples/s stored, ack p50 {_ms(step['p50'])} ms "
            f"p99 {_ms(step['p99'])} ms, CPU {_pct(step['cpu'])} (simulator {_pct(step['sim_cpu'])})"
            f"{'' if step['kept_up'] else ', fell behind'}")


def modbus_line(m: dict[str, Any]) -> str:
    return (f"{m['polls_per_s']:.0f} polls/s completed of {m['expected_per_s']:.0f} expected, "
            f"poll p50 {_ms(m['p50'])} ms p99 {_ms(m['p99'])} ms, {m['timed_out']} timed out, "
            f"{m['failed']} failed, CPU {_pct(m['cpu'])}")


def junk_flood_line(j: dict[str, Any]) -> str:
    q, f = j["quiet"], j["flooded"]
    return (f"ack p50/p99 {_ms(q['p50'])}/{_ms(q['p99'])} ms before, {_ms(f['p50'])}/{_ms(f['p99'])} ms during "
            f"{j['junk_bytes_per_s'] / MIB:.0f} MiB/s of junk written by {j['junk_connections']} connections, "
            f"{j['junk_connections_closed_per_s']:.0f} closed/s; "
            f"{j['log_lines']} log lines, CPU {_pct(j['cpu'])}")


def storm_line(row: dict[str, Any], dtus: int) -> str:
    return (f"storm {row['storm']}: {row['dropped']} dropped, {row['lost']} of {dtus} logins lost, "
            f"all back in {row['all_back']:.1f}s, "
            f"RSS {row['rss_before'] / MIB:.1f} -> {row['rss_after'] / MIB:.1f} MiB, "
            f"CPU center {_seconds(row.get('center_cpu'))} s, simulator {_seconds(row.get('sim_cpu'))} s")


def _seconds(value: float | None) -> str:
    """CPU seconds; "-" for results from before they were measured."""
    return "-" if value is None else f"{value:.1f}"


def storm_target_line(runs: list[dict[str, Any]] | None) -> str:
    """The Targets line of the redial storms: the center's default backlog, every storm of the run."""
    run = next((r for r in runs or () if r["backlog"] is None), None)
    if run is None or run["dtus"] < TARGET_STORM_DTUS or not run["storms"]:
        return f"{STORM_TARGET} within {TARGET_STORM_SECONDS:.0f} s: not run at this scale"
    storms = run["storms"]
    slowest = max(row["all_back"] for row in storms)
    lost = sum(row["lost"] for row in storms)
    times = ", ".join(f"{row['all_back']:.1f}" for row in storms)
    return (f"{STORM_TARGET} within {TARGET_STORM_SECONDS:.0f} s, none lost in repeated storms: "
            + _verdict(slowest <= TARGET_STORM_SECONDS and lost == 0,
                       f"{len(storms)} storms in a row all back after {times} s "
                       f"(slowest {slowest - TARGET_STORM_SECONDS:+.1f} s against the target), {lost} logins lost"))


_LINE_NUMBER = re.compile(r":\d+\)$")


def summarise_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> the functions that use the most CPU, by own and total time."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    # Inclusive time is only telling for the project's own code: the framework frames above it
    # (twistd, the reactor loop, logging context) hold every sample.
    ours = Counter({name: count for name, count in total.items() if "dtucenter/" in name})
    return {
        "samples": samples,
        "own": [(name, count / samples) for name, count in own.most_common(top)] if samples else [],
        "total": [(name, count / samples) for name, count in ours.most_common(top)] if samples else [],
    }


def _verdict(met: bool, text: str) -> str:
    return f"**met**: {text}" if met else f"**missed**: {text}"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out: list[str] = [
        "# Performance",
        "",
        "Generated by `python -m benchmarks.run` (do not edit by hand: the next run rewrites this file;",
        "what was tried and why lives in `benchmarks/findings.md`, included below).",
        "",
        f"- Scale: {results['scale']}",
        f"- Date: {m['date']}",
        f"- Machine: {m['cores']} cores, {m['cpu']}, {m['ram_gib']:.1f} GiB RAM, Linux {m['kernel']}",
        f"- Python {m['python']}, Twisted {m['twisted']}, SQLAlchemy {m['sqlalchemy']}, SQLite {m['sqlite']}",
        "- The center runs as `twistd -n dtucenter` with SQLite (WAL, synchronous=FULL) in a temporary directory;",
        "  every simulator and the baseline are separate processes on the same machine. CPU is the process's",
        "  user+system time (all threads, from /proc/PID/stat) per wall second: 100% is one core.",
        "",
    ]
    out += _render_targets(results)
    out += _render_hold(results["hold"])
    out += _render_ingest(results)
    out += _render_profile(results.get("profile"))
    out += upload_cpu.render(results.get("upload_cpu"), _render_profile)
    out += _render_modbus(results.get("modbus"))
    out += _render_storms(results.get("storm"), results["machine"])
    out += _render_junk_flood(results.get("junk_flood"))
    out += _render_databases(results.get("databases"))
    out += _render_mqtt(results.get("mqtt"))
    out += _render_features(results.get("features"))
    if results.get("cluster"):
        out += ["", *cluster.render(results["cluster"], results["machine"]), ""]
    out += modbus_scale.render(results.get("modbus_scale"))
    if results.get("reads"):
        out += ["", *reads.render(results["reads"]), ""]
    if FINDINGS.exists():
        out += ["", FINDINGS.read_text().rstrip(), ""]
    return "\n".join(out).rstrip() + "\n"


def with_current_findings(report: str) -> str:
    """A rendered report with its copy of findings.md replaced by the file as it is now: for a change to the
    findings alone, without running the benchmark again."""
    findings = FINDINGS.read_text().rstrip()
    measured = report.split("\n" + findings.splitlines()[0] + "\n", 1)[0]
    return f"{measured}\n{findings}\n"


def _render_targets(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", ""]
    hold = [r for r in results["hold"] if r["dtus"] >= TARGET_HOLD_DTUS]
    if hold:
        r = hold[-1]
        met = r["rss"] < TARGET_HOLD_RSS and r["still_logged_in"] >= r["dtus"]
        lines.append("- Hold 19,000 logged-in DTUs under 200 MiB RSS: " + _verdict(
            met, f"{r['rss'] / MIB:.1f} MiB ({(r['rss'] - TARGET_HOLD_RSS) / MIB:+.1f} MiB against the target)"))
    else:
        lines.append("- Hold 19,000 DTUs: not run at this scale")
    ingest, baseline = results.get("ingest"), results.get("baseline")
    if ingest and ingest.get("steps"):
        best = ingest["best"]
        frames = best["frames_per_s"] if best else 0.0
        lines.append("- Ingest at least 15,000 SendTest frames/s (120,000 samples/s) durably with ack p99 < 100 ms: "
                     + _verdict(frames >= TARGET_FRAMES,
                                f"{frames:.0f} frames/s sustained with p99 under 100 ms "
                                f"({frames / TARGET_FRAMES:.0%} of the target)"))
        if baseline and baseline.get("steps"):
            base = (baseline["best"] or baseline["peak"])["frames_per_s"]
            share = frames / base if base else 0.0
            peak_share = ingest["peak"]["frames_per_s"] / baseline["peak"]["frames_per_s"]
            capped = "" if baseline["steps"][-1]["kept_up"] is False else (
                " (the baseline kept up with every offered rate: its real ceiling is higher, "
                "so the ratio is an upper bound)")
            lines.append("- At least 0.5 of the framing-only baseline: "
                         + _verdict(share >= TARGET_BASELINE_SHARE,
                                    f"{share:.2f} of its sustained rate ({frames:.0f} / {base:.0f} frames/s, both with "
                                    f"p99 under 100 ms){capped}; peak throughput regardless of latency "
                                    f"{peak_share:.2f} ({ingest['peak']['frames_per_s']:.0f} / "
                                    f"{baseline['peak']['frames_per_s']:.0f} frames/s)"))
    else:
        lines.append("- Ingest: not run")
    modbus = results.get("modbus")
    if modbus:
        met = (modbus["dtus"] >= 1000 and modbus["timed_out"] == 0 and modbus["failed"] == 0
               and modbus["polls_per_s"] >= TARGET_POLL_SHARE * modbus["expected_per_s"])
        lines.append(f"- {modbus['dtus']:,} meters polled every second with no timeouts: "
                     + _verdict(met, f"{modbus['polls_per_s']:.0f} polls/s completed of {modbus['expected_per_s']:.0f} "
                                     f"expected, {modbus['timed_out']} timed out, {modbus['failed']} failed, "
                                     f"poll p99 {_ms(modbus['p99'])} ms"))
    else:
        lines.append("- 1,000 meters polled every second: not run")
    lines.append(storm_target_line(results.get("storm")))
    if results.get("modbus_scale"):
        lines.append(modbus_scale.target_line(results["modbus_scale"]))
    if results.get("upload_cpu"):
        lines.append(upload_cpu.target_line(results["upload_cpu"]))
    if results.get("reads"):
        lines.append(reads.target_line(results["reads"]))
    if _features_complete(results.get("features")):
        lines.append(features_target_line(results["features"]))
    return [*lines, ""]


def _render_hold(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Hold: logged-in DTUs, idle",
        "",
        "DTUs dial in at the simulator's connect rate, log in, then only send SendTick every TickTime (60 s).",
        "",
        ("| DTUs | login time (s) | connect rate (/s) | center RSS (MiB) | RSS before (MiB) | RSS per DTU (KiB) "
         "| idle CPU | still logged in |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtus']:,} | {r['login_time']:.1f} | {r['connect_rate']} | {r['rss'] / MIB:.1f} | "
            f"{r['rss_before'] / MIB:.1f} | {r['rss_per_dtu'] / 1024:.2f} | {_pct(r['idle_cpu'])} | "
            f"{r['still_logged_in']:,} |"
        )
    return [*lines, ""]


def _render_ingest(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    center_title = f"center (stored in {(results.get('ingest') or {}).get('database', 'SQLite')})"
    for label, title in (("ingest", center_title), ("baseline", "framing-only baseline (no storage)")):
        data = results.get(label)
        if not data or not data.get("steps"):
            continue
        if not lines:
            lines += [
                "## Ingest: 1,000 DTUs x 8 values at rising rates",
                "",
                "Each DTU uploads SendTest every 1000/rate seconds with one upload outstanding; an upload that falls",
                "due before the previous ack is sent right after it (so a slow center shows as a lower rate).",
                "A step keeps up when it delivers at least 95% of the offered rate with ack p99 under 100 ms.",
                "",
            ]
        lines += _render_steps(title, data)
    center, base = results.get("ingest"), results.get("baseline")
    if center and base and center.get("steps") and base.get("steps"):
        c = (center["best"] or {"frames_per_s": 0.0})["frames_per_s"]
        b = (base["best"] or base["peak"])["frames_per_s"]
        peak = center["peak"]["frames_per_s"] / base["peak"]["frames_per_s"]
        lines += [f"Ratio center/baseline: {c / b:.2f} of sustained frames/s (p99 under 100 ms), "
                  f"{peak:.2f} of peak frames/s." if b else "Ratio: -", ""]
    return lines


def _render_steps(title: str, data: dict[str, Any]) -> list[str]:
    """One ingest run: a table of its steps and what it sustained."""
    lines = [
        f"### {title}",
        "",
        ("| offered frames/s | acked frames/s | samples/s stored | ack p50 (ms) | ack p99 (ms) | CPU "
         "| simulator CPU | resent | kept up |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in data["steps"]:
        samples = "-" if s["samples_per_s"] is None else f"{s['samples_per_s']:,.0f}"
        lines.append(
            f"| {s['offered']:,} | {s['frames_per_s']:,.0f} | {samples} | {_ms(s['p50'])} | {_ms(s['p99'])} | "
            f"{_pct(s['cpu'])} | {_pct(s['sim_cpu'])} | {s['resent']} | {'yes' if s['kept_up'] else 'no'} |"
        )
    best = data.get("best")
    sustained = f"Sustained: {best['frames_per_s']:,.0f} frames/s." if best else "Sustained: no step kept up."
    return [*lines, "", sustained, ""]


DATABASES_HEADING = "## Ingest by database"


def _render_databases(runs: list[dict[str, Any]] | None) -> list[str]:
    if not runs:
        return []
    lines = [
        DATABASES_HEADING,
        "",
        "The ingest scenario above, run back to back on each database (`--only databases --db ...`), in the",
        "order of the runs' numbers, the database server on the same machine. PostgreSQL through psycopg 3",
        "(`postgresql+psycopg://`) takes the samples with `COPY ... FROM STDIN`, through psycopg2 with multi-row",
        "`INSERT`s. The center's CPU does not include the database server's.",
        "",
        ("| run | database | sustained frames/s (p99 < 100 ms) | its ack p99 (ms) | its CPU | peak frames/s "
         "| center CPU per frame at the peak (us) |"),
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for number, run in enumerate(runs, 1):
        best, peak = run.get("best"), run.get("peak")
        sustained = (f"{best['frames_per_s']:,.0f} | {_ms(best['p99'])} | {_pct(best['cpu'])}" if best
                     else "none kept up | - | -")
        if peak and peak["frames_per_s"]:
            per_frame = f"{peak['cpu'] / peak['frames_per_s'] * 1e6:.0f}"
            lines.append(
                f"| {number} | {run['database']} | {sustained} | {peak['frames_per_s']:,.0f} | {per_frame} |")
        else:
            lines.append(f"| {number} | {run['database']} | {sustained} | - | - |")
    lines += [
        "",
        "CPU per frame is the center's process time (all threads) per acknowledged upload: it depends much less",
        "than throughput on how busy the rest of the machine is.",
        "",
    ]
    for number, run in enumerate(runs, 1):
        if run.get("steps"):
            lines += _render_steps(f"run {number}: {run['database']}", run)
    return lines


def _render_profile(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []
    lines = ["## Where the time goes", ""]
    if "skipped" in profile:
        return [*lines, f"Profile skipped: {profile['skipped']}.", ""]
    held = ""
    if profile.get("seconds"):
        share = profile["samples"] / (profile["seconds"] * 200)
        held = f" (a thread held the GIL {share:.0%} of the time)"
    lines += [
        (f"py-spy sampled the center (200 Hz, only the thread holding the GIL) during ingest at {profile['rate']:,} "
        f"frames/s offered: {profile['samples']:,} samples{held}."),
        "",
        "| own time | function |",
        "|---:|---|",
    ]
    lines += [f"| {share:.1%} | `{name}` |" for name, share in profile["own"]]
    lines += ["", "| total time (incl. callees) | dtucenter function |", "|---:|---|"]
    lines += [f"| {share:.1%} | `{name}` |" for name, share in profile["total"]]
    return [*lines, ""]


JUNK_FLOOD_HEADING = "## Junk flood: well-behaved DTUs while connections stream junk"


def _render_junk_flood(junk: dict[str, Any] | None) -> list[str]:
    if not junk:
        return []
    j, q, f = junk, junk["quiet"], junk["flooded"]
    met = f["p99"] is not None and f["p99"] < TARGET_P99
    return [
        JUNK_FLOOD_HEADING,
        "",
        (f"{j['dtus']:,} simulated DTUs upload {j['rate']:,} SendTest frames/s in all. Then "
         f"`benchmarks/junk_flood.py` opens {j['junk_connections']} more connections that write `AA 55` (heads "
         "with an impossible Length) as fast as loopback takes it and dial again whenever the center closes them "
         "(after 4 KiB without a valid frame, before a login). Acks are measured over a window before the "
         f"flood and one during it ({f['seconds']:.0f} s); log lines are the center's, written during the "
         "flood window."),
        "",
        "| window | acked frames/s | ack p50 (ms) | ack p99 (ms) | ack timeouts |",
        "|---|---:|---:|---:|---:|",
        (f"| before the flood | {q['acked_per_s']:,.0f} | {_ms(q['p50'])} | {_ms(q['p99'])} | "
         f"{q['ack_timeouts']} |"),
        (f"| during the flood | {f['acked_per_s']:,.0f} | {_ms(f['p50'])} | {_ms(f['p99'])} | "
         f"{f['ack_timeouts']} |"),
        "",
        (f"Junk written by the flooder: {j['junk_bytes_per_s'] / MIB:,.1f} MiB/s (into socket buffers; what "
         "the center had not read when it closed a connection is lost with it); junk connections closed: "
         f"{j['junk_connections_closed_per_s']:,.0f}/s, each after at most 4 KiB parsed; center log lines "
         f"written: {j['log_lines']:,} in {j['seconds']:.0f} s; center CPU {_pct(j['cpu'])}; flooder CPU "
         f"{_pct(j.get('flooder_cpu'))} at niceness {j.get('flooder_nice', 0)}; machine load average at the end "
         f"{j.get('load_average', 0):.1f} on {j.get('cores', '?')} cores."),
        "",
        "- Ack p99 under 100 ms during the flood: " + _verdict(met, f"{_ms(f['p99'])} ms"),
        "",
    ]


def _render_modbus(modbus: dict[str, Any] | None) -> list[str]:
    if not modbus:
        return []
    m = modbus
    return [
        f"## Modbus: {m['dtus']:,} transparent DTUs x 1 meter x 10 registers, polled every second",
        "",
        "Each simulated DTU dials the shared `--modbus` listener, sends its registration packet (`SIM-00001`...)",
        "and a heartbeat every 30 s, and answers FC 3 for holding 0-9 (one request per poll, RTU framing).",
        "The numbers are the center's own (`GET /api/status`, `modbus` part), read at both ends of a",
        f"{m['seconds']:.0f} s window after every link was online: completed = polls without any error; a poll",
        "lasts from sending its request to taking the answer.",
        "",
        ("| DTUs | online after (s) | polls/s completed | expected/s | poll p50 (ms) | poll p99 (ms) "
         "| timed-out polls | failed polls | request timeouts | center CPU | center RSS (MiB) "
         "| answered/s (simulator) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        (f"| {m['dtus']:,} | {m['online_time']:.1f} | {m['polls_per_s']:,.0f} | {m['expected_per_s']:,.0f} | "
         f"{_ms(m['p50'])} | {_ms(m['p99'])} | {m['timed_out']} | {m['failed']} | {m['request_timeouts']} | "
         f"{_pct(m['cpu'])} | {m['rss'] / MIB:.1f} | {m['sim_answered_per_s']:,.0f} |"),
        "",
        (f"Links online at the end: {m['links_online']:,} of {m['dtus']:,}; "
         f"reconnections during the run: {m['reconnects']}."),
        "",
    ]


STORM_HEADING = "## Redial storms"


def _render_storms(runs: list[dict[str, Any]] | None, machine: dict[str, Any]) -> list[str]:
    if not runs:
        return []
    first = runs[0]
    lines = [
        STORM_HEADING,
        "",
        (f"{first['dtus']:,} DTUs logged in; then the simulator drops every connection at once (a power cut), and"),
        "every DTU redials after the same 1-2 s backoff (1 s and a random jitter): the whole fleet at once.",
        f"A DTU not logged in again within {first['bound']:.0f} s of the drop counts as a lost login; \"all back\" is",
        "the time from the drop until every DTU is logged in again. Listen overflows are the kernel's counters",
        "(TcpExt ListenOverflows, the whole host) during the storm: handshakes it dropped because the accept queue",
        "was full. Login timeouts are DTUs whose connection looked open to them but whose Login never reached the",
        "center (the overflow dropped it): each waited out its 30 s login timeout and dialled again, a login",
        f"missed at the first attempt. net.core.somaxconn was {first['somaxconn']}, which caps any backlog.",
        f"Measured {machine['date']}.",
        "",
    ]
    for run in runs:
        backlog = run["backlog"]
        title = ("the center's default backlog" if backlog is None
                 else f"backlog={backlog} in the endpoint (Twisted's default is 50)")
        lines += [
            f"### {title}",
            "",
            ("| storm | dropped | logins lost | all back after (s) | connect failures | login timeouts "
             "| listen overflows | center RSS before (MiB) | after (MiB) | center CPU (s) | simulator CPU (s) |"),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in run["storms"]:
            overflows = r["listen_overflows"].get("ListenOverflows", "-")
            lines.append(
                f"| {r['storm']} | {r['dropped']:,} | {r['lost']:,} | {r['all_back']:.1f} | {r['connect_failed']:,} "
                f"| {r['login_timeouts']:,} | {overflows:,} | {r['rss_before'] / MIB:.1f} "
                f"| {r['rss_after'] / MIB:.1f} | {_seconds(r.get('center_cpu'))} | {_seconds(r.get('sim_cpu'))} |"
            )
        lines.append("")
    return lines


MQTT_HEADING = "## MQTT publishing at the ingest rate"
#: Issue 14's budget: publishing at the ingest rate costs less than this share of the center's throughput.
MQTT_BUDGET = 0.25


def _render_mqtt(mqtt: dict[str, Any] | None) -> list[str]:
    if not mqtt or not mqtt.get("without") or not mqtt["without"].get("steps"):
        return []
    lines = [
        MQTT_HEADING,
        "",
        ("The ingest scenario (1,000 DTUs x 8 values) against the center without MQTT, then with `--mqtt` to a "
         "local Mosquitto (QoS 1) for each `[mqtt] payload` shape: `value` publishes a message per value (8 per "
         "upload, retained), `device` one per upload with all its values (retained), `batch` one per account and "
         "reactor turn with every upload of the turn. Nobody subscribes. What publishing costs the center is "
         "compared at the highest rate both runs kept up with (the same work with and without MQTT): the CPU per "
         "1,000 frames of the center's processes, that is the center and its MQTT worker process together. At "
         "the CPU-bound limit throughput goes as its inverse: that is the throughput cost. Mosquitto is not the "
         "center (a plant's broker usually runs elsewhere), but here it shares the 2 cores with the center, its "
         "worker and the simulator: the peak columns show what the machine as a whole delivered."),
        "",
        ("| run | sustained frames/s | peak frames/s | peak, of the run without MQTT | compared at (frames/s) "
         "| center CPU per 1,000 frames (ms) | its MQTT worker's (ms) | throughput cost | ack p99 there (ms) "
         "| left in the backlog |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_run = mqtt["without"]
    base_steps = {step["offered"]: step for step in base_run["steps"] if step["kept_up"]}
    base_peak = base_run["peak"]["frames_per_s"]
    verdicts = []
    for label, title in MQTT_TITLES.items():
        run = mqtt.get(label)
        if not run or not run.get("steps"):
            continue
        common = [step for step in run["steps"] if step["kept_up"] and step["offered"] in base_steps]
        step = max(common, key=lambda s: s["offered"]) if common else run["steps"][0]
        base = base_steps.get(step["offered"])
        center, worker = _per_thousand(step, "cpu"), _per_thousand(step, "children_cpu")
        cost = None
        if label != "without" and base is not None and center is not None:
            cost = 1 - (_per_thousand(base, "cpu") or 0) / (center + (worker or 0))
        best, peak = run.get("best"), run["peak"]
        lines.append(
            f"| {title} | {best['frames_per_s'] if best else 0:,.0f} | {peak['frames_per_s']:,.0f} | "
            f"{peak['frames_per_s'] / base_peak:.0%} | {step['offered']:,} | {_opt(center)} | {_opt(worker)} | "
            f"{'-' if cost is None else f'{cost:.0%}'} | {_ms(step['p99'])} | {run.get('backlog_rows', '-')} |"
        )
        if label == "without":
            continue
        machine = (f"the machine's peak with the broker on it too: {peak['frames_per_s'] / base_peak:.0%} of the "
                   "run without MQTT")
        repeated = _repeated_mqtt(mqtt, label)
        if repeated is not None:
            rate, runs, base_cpu, label_cpu = repeated
            cost = 1 - base_cpu / label_cpu
            said = (f"{cost:.0%} (median CPU per frame of the center and its worker over {_fresh_runs(runs)} in "
                    f"turn, {label_cpu:.0f} ms against {base_cpu:.0f}) at {rate:,} frames/s; {machine}")
        elif cost is not None:
            said = (f"{cost:.0%} (CPU per frame of the center and its worker {(center or 0) + (worker or 0):.0f} ms "
                    f"against {_per_thousand(base, 'cpu') or 0:.0f}, one run of each) at {step['offered']:,} "
                    f"frames/s; {machine}")
        else:
            said = "no rate both runs kept up with"
        verdicts.append(f"- `payload = {label}` costs the center less than {MQTT_BUDGET:.0%} of its throughput: "
                        + _verdict(cost is not None and cost < MQTT_BUDGET, said))
    return [*lines, "", *_render_repeated_mqtt(mqtt), *verdicts, ""]


MQTT_TITLES = {"without": "without MQTT", "value": "payload = value", "device": "payload = device",
               "batch": "payload = batch"}


def _repeated_mqtt(mqtt: dict[str, Any], label: str) -> tuple[int, int, float, float] | None:
    """The rate ``label`` was run at again, how many runs without MQTT there, and the median CPU per 1,000
    frames without MQTT and with it."""
    for group in mqtt.get("repeated") or ():
        steps = group["steps"]
        if steps.get(label) and steps.get("without"):
            return group["rate"], len(steps["without"]), _median_cpu(steps["without"]), _median_cpu(steps[label])
    return None


def _fresh_runs(count: int) -> str:
    return f"{count} fresh run{'' if count == 1 else 's'}"


def _render_repeated_mqtt(mqtt: dict[str, Any]) -> list[str]:
    groups = mqtt.get("repeated") or []
    if not groups:
        return []
    lines = [
        ("Then, at each rate a shape is judged at, fresh centers of each configuration in turn, one step each "
         "(a run's CPU per frame on this machine often reads a tenth or more above or below the next run's of "
         "the same center: the verdicts below compare the medians):"),
        "",
        ("| run | offered frames/s | CPU per 1,000 frames, center and worker, each run (ms) | median (ms) "
         "| kept up | throughput cost of the medians |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for group in groups:
        steps = group["steps"]
        base = _median_cpu(steps["without"]) if steps.get("without") else None
        for label, title in MQTT_TITLES.items():
            if not steps.get(label):
                continue
            median = _median_cpu(steps[label])
            cost = "-" if label == "without" or base is None else f"{1 - base / median:.0%}"
            lines.append(f"| {title} | {group['rate']:,} | {_each_cpu(steps[label])} | {median:.0f} "
                         f"| {_kept_up(steps[label])} | {cost} |")
    return [*lines, ""]


def _cpu_total(step: dict[str, Any]) -> float:
    """CPU milliseconds per 1,000 frames of the center and its MQTT worker in a step."""
    return ((step["cpu"] or 0) + (step.get("children_cpu") or 0)) / step["frames_per_s"] * 1e6


def _median_cpu(steps: list[dict[str, Any]]) -> float:
    return statistics.median(_cpu_total(step) for step in steps)


def _each_cpu(steps: list[dict[str, Any]]) -> str:
    return " / ".join(f"{_cpu_total(step):.0f}" for step in steps)


def _kept_up(steps: list[dict[str, Any]]) -> str:
    return f"{sum(step['kept_up'] for step in steps)} of {len(steps)}"


def _per_thousand(step: dict[str, Any], key: str) -> float | None:
    """CPU milliseconds per 1,000 frames of a step's ``cpu`` (the center) or ``children_cpu`` (its MQTT worker)."""
    value = step.get(key)
    return value / step["frames_per_s"] * 1e6 if value is not None and step["frames_per_s"] else None


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


FEATURES_HEADING = "## Every integration on: MQTT, alarms and metrics (issue 14)"
#: Issue 14's budget: with every integration on, the CPU per upload rises by at most this share.
FEATURES_BUDGET = 0.25


def _features_complete(features: dict[str, Any] | None) -> bool:
    return bool(features and features.get("off") and features.get("on"))


def _render_features(features: dict[str, Any] | None) -> list[str]:
    if not features or not _features_complete(features):
        return []
    lines = [
        FEATURES_HEADING,
        "",
        ("The ingest scenario (1,000 DTUs x 8 values) at the same offered rates against a center with nothing "
         "on, then one with `[mqtt]` to a local Mosquitto (default payload: a QoS 1, retained message per value, "
         "8 per upload), two alarm rules per DTU (a limit on one value, never crossed, and `offline = 300`) and "
         "`--metrics` scraped every second. CPU per 1,000 frames of the center's processes (the center and its "
         "MQTT worker); Mosquitto and the simulator share the 2 cores but are not the center "
         "(`python -m benchmarks.run --only features --merge`)."),
        "",
        ("| offered frames/s | off: acked/s | off: CPU per 1,000 frames (ms) | on: acked/s | on: center (ms) "
         "| on: MQTT worker (ms) | rise | ack p99 off / on (ms) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = _features_rows(features)
    for off, on, off_cpu, center, worker, rise in rows:
        lines.append(
            f"| {off['offered']:,} | {off['frames_per_s']:,.0f} | {_opt(off_cpu)} | {on['frames_per_s']:,.0f} "
            f"| {_opt(center)} | {_opt(worker)} | {'-' if rise is None else f'{rise:+.0%}'} "
            f"| {_ms(off['p99'])} / {_ms(on['p99'])} |"
        )
    return [*lines, "", *_render_repeated_features(features), features_target_line(features), ""]


def _render_repeated_features(features: dict[str, Any]) -> list[str]:
    repeated = features.get("repeated")
    if not repeated:
        return []
    steps, rate = repeated["steps"], repeated["rate"]
    lines = [
        (f"Then, at {rate:,} frames/s (the highest rate both runs kept up with), fresh centers off and on in turn, "
         "one step each; the verdict compares the medians (one run's CPU per frame on this machine often reads a "
         "tenth or more above or below the next run's of the same center):"),
        "",
        ("| run | CPU per 1,000 frames, center and worker, each run (ms) | median (ms) | kept up "
         "| rise of the medians |"),
        "|---|---:|---:|---:|---:|",
    ]
    off = _median_cpu(steps["off"])
    for label in ("off", "on"):
        median = _median_cpu(steps[label])
        rise = "-" if label == "off" else f"{median / off - 1:+.0%}"
        lines.append(f"| {label} | {_each_cpu(steps[label])} | {median:.0f} | {_kept_up(steps[label])} | {rise} |")
    return [*lines, ""]


#: A rate both feature runs were offered: (off step, on step, off CPU, on center CPU, on worker CPU, rise).
FeaturesRow = tuple[dict[str, Any], dict[str, Any], float | None, float | None, float | None, float | None]


def _features_rows(features: dict[str, Any]) -> list[FeaturesRow]:
    """Each offered rate of the run with integrations off and on: the CPU per 1,000 frames and its rise."""
    on_steps = {step["offered"]: step for step in features["on"]["steps"]}
    rows: list[FeaturesRow] = []
    for off in features["off"]["steps"]:
        on = on_steps.get(off["offered"])
        if on is None:
            continue
        off_cpu, center, worker = _per_thousand(off, "cpu"), _per_thousand(on, "cpu"), _per_thousand(on, "children_cpu")
        rise = (center + (worker or 0)) / off_cpu - 1 if off_cpu and center is not None else None
        rows.append((off, on, off_cpu, center, worker, rise))
    return rows


FEATURES_TARGET = "- CPU per upload with MQTT, alarms and metrics on rises by at most"


def features_target_line(features: dict[str, Any]) -> str:
    """The features' verdict, for their section and the Targets list: at the highest rate both runs kept up
    with, from the medians of the runs repeated there (from the one run of each, for results without them)."""
    repeated = features.get("repeated")
    if repeated and repeated["steps"].get("off") and repeated["steps"].get("on"):
        off, on = _median_cpu(repeated["steps"]["off"]), _median_cpu(repeated["steps"]["on"])
        rise = on / off - 1
        return f"{FEATURES_TARGET} {FEATURES_BUDGET:.0%}: " + _verdict(
            rise <= FEATURES_BUDGET,
            f"{rise:+.0%} at {repeated['rate']:,} frames/s, the highest rate both runs kept up with (median CPU per "
            f"frame over {_fresh_runs(len(repeated['steps']['on']))} of each in turn, {on:.0f} ms against {off:.0f}: "
            f"a throughput cost of {1 - off / on:.1%})")
    kept = [(off_step["offered"], rise) for off_step, on_step, _, _, _, rise in _features_rows(features)
            if rise is not None and off_step["kept_up"] and on_step["kept_up"]]
    compared = kept[-1] if kept else None
    return f"{FEATURES_TARGET} {FEATURES_BUDGET:.0%}: " + _verdict(
        compared is not None and compared[1] <= FEATURES_BUDGET,
        "no rate both runs kept up with" if compared is None else
        f"{compared[1]:+.0%} at {compared[0]:,} frames/s, the highest rate both runs kept up with")


#: The scenarios whose sections stand alone (no line in Targets but their own target lines, which ``--merge``
#: keeps current): ``--merge`` replaces just them.
MERGEABLE = {"storm", "junk", "databases", "mqtt", "cluster", "features", "modbus_scale", "upload_cpu", "reads"}


def with_sections(report: str, results: dict[str, Any]) -> str:
    """``report`` with the stand-alone sections that ``results`` holds replaced (or added)."""
    if results.get("storm"):
        report = with_storm_section(report, results)
    if results.get("junk_flood"):
        report = _with_section(report, JUNK_FLOOD_HEADING, _render_junk_flood(results["junk_flood"]))
    if results.get("databases"):
        report = _with_section(report, DATABASES_HEADING, _render_databases(results["databases"]))
    if results.get("mqtt"):
        report = _with_section(report, MQTT_HEADING, _render_mqtt(results["mqtt"]))
    if _features_complete(results.get("features")):
        report = _with_section(report, FEATURES_HEADING, _render_features(results["features"]))
        report = _with_target_line(report, FEATURES_TARGET, features_target_line(results["features"]))
    if results.get("cluster"):
        report = _with_section(report, cluster.HEADING, cluster.render(results["cluster"], results["machine"]))
    if results.get("modbus_scale"):
        report = _with_section(report, modbus_scale.HEADING, modbus_scale.render(results["modbus_scale"]))
        report = modbus_scale.with_target_line(report, results["modbus_scale"])
    if results.get("upload_cpu"):
        report = _with_section(report, upload_cpu.HEADING, upload_cpu.render(results["upload_cpu"], _render_profile))
        report = _with_target_line(report, upload_cpu.TARGET_LINE, upload_cpu.target_line(results["upload_cpu"]))
    if results.get("reads"):
        report = _with_section(report, reads.HEADING, reads.render(results["reads"]))
        report = _with_target_line(report, reads.TARGET_PREFIX, reads.target_line(results["reads"]))
    return report


def _with_target_line(report: str, start: str, line: str) -> str:
    """``report`` with the Targets list's line that begins with ``start`` replaced by ``line`` (or added last)."""
    lines = report.split("\n")
    if "## Targets" not in lines:
        return report
    index = lines.index("## Targets") + 1
    after_last_item = index + 1  # under the heading's blank line, if the list is empty
    while index < len(lines) and not lines[index].startswith("## "):
        if lines[index].startswith(start):
            lines[index] = line
            return "\n".join(lines)
        if lines[index].startswith("- "):
            after_last_item = index + 1
        index += 1
    lines.insert(after_last_item, line)
    return "\n".join(lines)


def with_storm_section(report: str, results: dict[str, Any]) -> str:
    """``report`` with its redial-storm section replaced by (or, if it has none, given) the one rendered from
    ``results``, and the storms' line in Targets with it."""
    report = _with_section(report, STORM_HEADING, _render_storms(results.get("storm"), results["machine"]))
    return _with_target_line(report, STORM_TARGET, storm_target_line(results.get("storm")))


def with_section(report: str, heading: str, lines: list[str]) -> str:
    """``report`` with the section under ``heading`` replaced by ``lines``: for a scenario run on its own
    (``benchmarks/retention_cost.py``)."""
    return _with_section(report, heading, lines)


def _with_section(report: str, heading: str, lines: list[str]) -> str:
    """``report`` with the section under ``heading`` replaced by ``lines`` (or, if it has none, given them
    where :func:`render` puts such sections: after the measured ones, before the findings)."""
    section = "\n".join(lines).rstrip() + "\n"
    if heading + "\n" in report:
        before, _, rest = report.partition(heading + "\n")
        following = re.search(r"^(## |# )", rest, re.MULTILINE)
        after = rest[following.start():] if following else ""
        return f"{before}{section}\n\n{after}" if after else f"{before}{section}"
    findings_title = FINDINGS.read_text().splitlines()[0] if FINDINGS.exists() else None
    if findings_title and "\n" + findings_title + "\n" in report:
        before, _, after = report.partition("\n" + findings_title + "\n")
        return f"{before.rstrip()}\n\n{section}\n\n{findings_title}\n{after}"
    return f"{report.rstrip()}\n\n{section}"
