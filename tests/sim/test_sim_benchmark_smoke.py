"""The benchmark at a tiny scale: every scenario must run end to end and write its section of the report.

No assertion on speed: numbers come from running the benchmark on purpose. No time budget either: on a busy
machine it is slower, so it fails only if the benchmark falls silent (each step prints a line), and the
benchmark's servers and simulators go with its process group whatever happens.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import reads, report, upload_cpu
from tests.support import run_process

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    result = run_process(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
         "--only", "hold,ingest,baseline,modbus,modbus_scale,storm,junk,mqtt,features,reads"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## Hold", "### center (stored in SQLite)", "### framing-only baseline", "## Modbus",
                    "## Redial storms", "## Junk flood", "## MQTT publishing at the ingest rate",
                    report.FEATURES_HEADING, "## Modbus at scale", "- Modbus at scale, 5,000 meters",
                    reads.HEADING, "### SQLite\n"):
        assert heading in text
    # The costs of MQTT and of every integration are judged from fresh runs in turn, not from one run of each.
    assert "fresh centers of each configuration in turn" in text and "median CPU per frame of the center" in text
    assert "fresh centers off and on in turn" in text and "fresh run of each in turn" in text
    assert "Python 3." in text and "Twisted" in text and "SQLAlchemy" in text
    assert "Traceback" not in result.stderr
    assert report.with_current_findings(text) == text, "--findings-only would change a fresh report"


def test_the_databases_scenario_compares_sqlite_and_postgresql(tmp_path: Path, postgres_urls: tuple[str, str]) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n## Targets\n\nkept\n")
    result = run_process(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--only", "databases", "--merge",
         "--db", f"sqlite,{postgres_urls[0]}"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "kept" in text, "--merge replaced more than its section"
    section = text.partition(report.DATABASES_HEADING)[2]
    assert "| SQLite | " in section
    assert "via psycopg (COPY) | " in section
    assert "Traceback" not in result.stderr


def test_the_reads_scenario_runs_on_sqlite_and_postgresql(tmp_path: Path, postgres_urls: tuple[str, str]) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n## Targets\n\nkept\n")
    result = run_process(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--only", "reads", "--merge",
         "--postgres", postgres_urls[1]],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "kept" in text, "--merge replaced more than its section"
    section = text.partition(reads.HEADING)[2]
    sqlite, _, postgresql = section.partition("### PostgreSQL (psycopg2)")
    for run in (sqlite, postgresql):
        rows = [line for line in run.splitlines() if line.startswith(("| API: ", "| console: "))]
        assert len(rows) == 6, run
        # Every meter of the fleet answered with each of its points' values, whatever the times were.
        answer = f"| {reads.SMOKE.fleet:,} meters, {reads.SMOKE.fleet * len(reads.FLEET_POINTS):,} values |"
        assert run.count(answer) == 2, run
        assert "covering index ix_meter_samples_meter_point_time" in run.lower() or "meter_point_time_idx" in run
    assert "Traceback" not in result.stderr


def test_retention_cost_smoke_run_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "retention.md"
    result = run_process([sys.executable, "-m", "benchmarks.retention_cost", "--smoke", "--out", str(out)], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("## Retention job beside ingest")
    rows = [line.split("|") for line in text.splitlines() if line.startswith(("| with ", "| without "))]
    assert [row[1].strip() for row in rows] == ["without", "with"]
    # The job did its work during the step with it, and none without it.
    assert [int(row[7].replace(",", "")) for row in rows] == [0, 2000]


def test_profile_summary_reads_py_spy_raw_stacks() -> None:
    from benchmarks.report import summarise_profile

    raw = (
        "<module> (twistd:8);run (reactor.py:10);dataReceived (dtucenter/dtu/session.py:90);"
        "feed (wire.py:520) 30\n"
        "<module> (twistd:8);run (reactor.py:10);dataReceived (dtucenter/dtu/session.py:91) 10\n"
        "_commit (dtucenter/store/facade.py:200);execute (base.py:1) 60\n"
    )
    summary = summarise_profile(raw)
    assert summary["samples"] == 100
    assert summary["own"][0] == ("execute (base.py)", 0.6)
    assert summary["total"] == [
        ("_commit (dtucenter/store/facade.py)", 0.6), ("dataReceived (dtucenter/dtu/session.py)", 0.4)
    ]


def test_a_storm_section_is_merged_into_an_existing_report() -> None:
    from benchmarks.report import STORM_HEADING, render, with_storm_section

    machine = {"cores": 2, "cpu": "x", "ram_gib": 1.0, "kernel": "k", "python": "3", "twisted": "t",
               "sqlalchemy": "s", "sqlite": "q", "date": "then"}
    row = {"storm": 1, "dropped": 10, "lost": 0, "all_back": 2.0, "connect_failed": 0, "login_timeouts": 0,
           "listen_overflows": {"ListenOverflows": 0}, "rss_before": 1 << 20, "rss_after": 1 << 20}
    run = {"backlog": None, "dtus": 10, "bound": 30.0, "somaxconn": 4096, "storms": [row]}
    empty = {"machine": machine, "scale": "full", "hold": [], "storm": []}
    full = render({**empty, "storm": [run]})
    assert with_storm_section(render(empty), {"machine": machine, "storm": [run]}) == full  # inserted in its place
    again = with_storm_section(full, {"machine": {**machine, "date": "now"}, "storm": [run]})  # replaced
    assert again == full.replace("Measured then.", "Measured now.")
    assert again.splitlines().count(STORM_HEADING) == 1


def test_a_merged_storm_run_at_full_scale_brings_its_line_in_targets_up_to_date() -> None:
    from benchmarks.report import STORM_TARGET, render, with_storm_section

    machine = {"cores": 2, "cpu": "x", "ram_gib": 1.0, "kernel": "k", "python": "3", "twisted": "t",
               "sqlalchemy": "s", "sqlite": "q", "date": "then"}
    row = {"storm": 1, "dropped": 19_000, "lost": 0, "all_back": 12.5, "connect_failed": 0, "login_timeouts": 0,
           "listen_overflows": {"ListenOverflows": 0}, "rss_before": 1 << 20, "rss_after": 1 << 20,
           "center_cpu": 9.0, "sim_cpu": 11.0}
    run = {"backlog": None, "dtus": 19_000, "bound": 60.0, "somaxconn": 4096,
           "storms": [row, {**row, "storm": 2, "all_back": 21.5}]}
    old = render({"machine": machine, "scale": "full", "hold": [], "storm": []})
    merged = with_storm_section(old, {"machine": machine, "storm": [run]})
    targets = [line for line in merged.splitlines() if line.startswith(STORM_TARGET)]
    assert targets == [(f"{STORM_TARGET} within 20 s, none lost in repeated storms: **missed**: 2 storms in a row "
                        "all back after 12.5, 21.5 s (slowest +1.5 s against the target), 0 logins lost")]
    assert merged.index("## Targets") < merged.index(targets[0]) < merged.index("## Redial storms")
    met = with_storm_section(merged, {"machine": machine, "storm": [{**run, "storms": [row]}]})
    assert [line for line in met.splitlines() if line.startswith(STORM_TARGET)] == [(
        f"{STORM_TARGET} within 20 s, none lost in repeated storms: **met**: 1 storms in a row all back after "
        "12.5 s (slowest -7.5 s against the target), 0 logins lost")]
    assert "| 9.0 | 11.0 |" in met


def test_a_junk_flood_section_is_merged_into_an_existing_report() -> None:
    from benchmarks.report import JUNK_FLOOD_HEADING, render, with_sections

    machine = {"cores": 2, "cpu": "x", "ram_gib": 1.0, "kernel": "k", "python": "3", "twisted": "t",
               "sqlalchemy": "s", "sqlite": "q", "date": "then"}
    window = {"p50": 0.001, "p99": 0.002, "acked_per_s": 10.0, "ack_timeouts": 0, "seconds": 1.0}
    junk = {"junk_connections": 5, "dtus": 5, "rate": 20, "quiet": window, "flooded": window, "seconds": 1.0,
            "junk_bytes_per_s": 1.0, "junk_connections_closed_per_s": 1.0, "log_lines": 0, "cpu": 0.1}
    empty = {"machine": machine, "scale": "full", "hold": [], "storm": []}
    full = render({**empty, "junk_flood": junk})
    assert with_sections(render(empty), {"machine": machine, "junk_flood": junk}) == full  # inserted in its place
    again = with_sections(full, {"machine": machine, "junk_flood": {**junk, "log_lines": 7}})  # replaced
    assert again.splitlines().count(JUNK_FLOOD_HEADING) == 1 and "log lines written: 7 in" in again


def test_the_upload_cpu_scenario_merges_its_section_and_its_target_line(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\n## Targets\n\n- kept\n\n## Hold\n\nkept too\n")
    result = run_process(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--only", "upload_cpu", "--merge"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    targets = text.partition("## Targets\n")[2].partition("\n\n## ")[0]
    assert targets.splitlines()[1:] == ["- kept", targets.splitlines()[2]]
    assert targets.splitlines()[2].startswith(upload_cpu.TARGET_LINE)
    assert "kept too" in text, "--merge replaced more than its section"
    section = text.partition(upload_cpu.HEADING)[2]
    assert "| 40 | " in section  # the smoke scale's one offered rate, both servers measured
    assert "Traceback" not in result.stderr


def test_the_modbus_scale_section_and_its_target_are_merged_into_an_existing_report() -> None:
    from benchmarks.modbus_scale import HEADING, TARGET_LINE
    from benchmarks.report import render, with_sections

    machine = {"cores": 2, "cpu": "x", "ram_gib": 1.0, "kernel": "k", "python": "3", "twisted": "t",
               "sqlalchemy": "s", "sqlite": "q", "date": "then"}
    step = {"layout": "10 meters per DTU", "meters_per_dtu": 10, "meters": 5000, "dtus": 500, "polls_per_s": 4990.0,
            "timed_out": 0, "failed": 0, "p50": 0.1, "p99": 0.4, "cpu": 0.8, "polls_per_core_s": 6237.5,
            "cpu_us_per_poll": 160.3, "sim_cpu": 0.3, "rss": 1e8, "load": 2.5, "kept_up": True}
    result = {"steps": [step], "target_meters": 5000}
    empty = {"machine": machine, "scale": "full", "hold": [], "storm": []}
    full = render({**empty, "modbus_scale": result})
    assert with_sections(render(empty), {"machine": machine, "modbus_scale": result}) == full  # inserted in place
    assert "**met**: 6,238 polls per core-second" in full
    behind = {"steps": [{**step, "polls_per_s": 3000.0, "timed_out": 12, "kept_up": False}], "target_meters": 5000}
    again = with_sections(full, {"machine": machine, "modbus_scale": behind})  # replaced
    assert again.splitlines().count(HEADING) == 1
    (target,) = [line for line in again.splitlines() if line.startswith(TARGET_LINE)]
    assert "**missed**" in target and "12 timed out" in target and "no step kept up" in target


def test_the_poll_path_cost_is_measured_over_answered_polls() -> None:
    from benchmarks.modbus_poll_path import measure

    result = measure(meters=20, per_link=10, rounds=2, tune_gc=False)
    assert (result["polls"], result["failed"]) == (40, 0)
    assert result["rows"] == 10 * 60  # the first poll's and two rounds', 10 registers each

