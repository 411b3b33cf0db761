"""CPU per acknowledged upload: the center against the framing-only baseline, at the same offered rates.

    python -m benchmarks.run --only upload_cpu --merge      # its section (and Targets line) replaced

Throughput alone hides what a stored upload costs while the center keeps up; this prices it: at each
offered rate the baseline and then the center (alternating, so both see the same machine) each get a fresh
server and the same simulated fleet, and the scenario divides each server's CPU seconds (all threads) by the
uploads it acknowledged. A rate counts only if both kept up with it; the ratio center/baseline is the
issue-14 target (at most 2.0). Then py-spy samples the center at the highest of those rates, the profile
"after" (findings.md keeps the one "before").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

HEADING = "## CPU per acknowledged upload: center against the framing-only baseline"
#: The issue's target: the center's CPU per acknowledged upload at most this many times the baseline's.
TARGET_RATIO = 2.0
#: Starts the Targets line that this scenario owns (replaced by ``--merge``).
TARGET_LINE = "- CPU per acknowledged upload at most 2.0 times the framing-only baseline's"

#: run.run_ingest(workdir, label, rates) -> its result; run.run_profile(workdir, rate) -> a profile.
Ingest = Callable[[Path, str, tuple[int, ...]], dict[str, Any]]
Profile = Callable[[Path, int], dict[str, Any]]


@attrs.frozen
class Scale:
    #: Offered frames/s: rates both servers keep up with on this machine, so CPU is per upload, not saturation.
    rates: tuple[int, ...]
    profile: bool


FULL = Scale(rates=(2000, 4000, 8000), profile=True)
SMOKE = Scale(rates=(40,), profile=False)


def micros_per_upload(step: dict[str, Any]) -> float | None:
    """The server's CPU microseconds (all threads) per upload it acknowledged in the step."""
    return step["cpu"] / step["frames_per_s"] * 1e6 if step["frames_per_s"] else None


def run_upload_cpu(workdir: Path, scale: Scale, ingest: Ingest, profile: Profile,
                   log: Callable[[str], None]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for rate in scale.rates:
        row: dict[str, Any] = {"offered": rate}
        for label in ("baseline", "center"):
            step_dir = workdir / f"{label}-{rate}"
            step_dir.mkdir()
            steps = ingest(step_dir, label, (rate,))["steps"]
            row[label] = steps[0] if steps else None
        base, center = row["baseline"], row["center"]
        row["kept_up"] = bool(base and center and base["kept_up"] and center["kept_up"])
        base_us = micros_per_upload(base) if base else None
        center_us = micros_per_upload(center) if center else None
        row["baseline_us"], row["center_us"] = base_us, center_us
        row["ratio"] = center_us / base_us if base_us and center_us else None
        log(f"  upload cpu at {rate}/s: {line(row)}")
        rows.append(row)
    result: dict[str, Any] = {"rows": rows, "profile": None}
    kept = [r for r in rows if r["kept_up"]]
    if scale.profile and kept:
        profile_dir = workdir / "profile"
        profile_dir.mkdir()
        result["profile"] = profile(profile_dir, max(r["offered"] for r in kept))
    return result


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def line(row: dict[str, Any]) -> str:
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
    return (f"center {_us(row['center_us'])} us, baseline {_us(row['baseline_us'])} us per acked upload, "
            f"ratio {ratio}{'' if row['kept_up'] else ' (a server fell behind: not counted)'}")


def judged(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The step the target is judged on: the highest offered rate that both servers kept up with."""
    kept = [r for r in (result or {}).get("rows", []) if r["kept_up"] and r["ratio"] is not None]
    return max(kept, key=lambda r: r["offered"]) if kept else None


def target_line(result: dict[str, Any] | None) -> str:
    row = judged(result)
    if row is None:
        return f"{TARGET_LINE}: **missed**: no offered rate that both kept up with"
    ratio = row["ratio"]
    text = (f"{ratio:.2f} at {row['offered']:,} uploads/s offered ({_us(row['center_us'])} us against "
            f"{_us(row['baseline_us'])} us)")
    if ratio <= TARGET_RATIO:
        return f"{TARGET_LINE}: **met**: {text}"
    over = row["center_us"] - TARGET_RATIO * row["baseline_us"]
    return f"{TARGET_LINE}: **missed**: {text}; {over:.1f} us per upload over the target"


def render(result: dict[str, Any] | None, render_profile: Callable[[dict[str, Any] | None], list[str]]
           ) -> list[str]:
    if not result:
        return []
    lines = [
        HEADING,
        "",
        "At each offered rate the framing-only baseline (benchmarks/baseline.py) and then the center (SQLite)",
        "each get a fresh server and the ingest scenario's fleet (1,000 DTUs x 8 values, one upload outstanding",
        "each); CPU is the server process's user+system time, all threads, over the measured window, divided by",
        "the uploads it acknowledged in it. A rate counts only if both kept up (95% of the rate, ack p99 under",
        f"100 ms). Target: the center's CPU per upload at most {TARGET_RATIO:.1f} times the baseline's.",
        "",
        target_line(result),
        "",
        ("| offered uploads/s | center acked/s | center CPU | center us/upload | baseline acked/s | baseline CPU "
         "| baseline us/upload | ratio | both kept up |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in result["rows"]:
        c, b = r["center"] or {}, r["baseline"] or {}
        lines.append(
            f"| {r['offered']:,} | {c.get('frames_per_s', 0):,.0f} | {_pct(c.get('cpu'))} | {_us(r['center_us'])} "
            f"| {b.get('frames_per_s', 0):,.0f} | {_pct(b.get('cpu'))} | {_us(r['baseline_us'])} "
            f"| {'-' if r['ratio'] is None else format(r['ratio'], '.2f')} | {'yes' if r['kept_up'] else 'no'} |"
        )
    lines.append("")
    profile = result.get("profile")
    if profile:
        # The shared renderer's heading, one level down: this is the center after the lean ingest path.
        body = render_profile(profile)
        lines += ["### Profile of the center at that rate (after the lean ingest path; before: findings)", "",
                  *body[2:]]
    return lines


def _pct(cpu: float | None) -> str:
    return "-" if cpu is None else f"{cpu * 100:.0f}%"
