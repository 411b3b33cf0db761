"""The benchmark at a tiny scale: every scenario must run end to end and write its section of the report.

No assertion on speed: numbers come from running the benchmark on purpose. No time budget either: on a busy
machine it is slower, so it fails only if the benchmark falls silent (each step prints a line), and the
benchmark's servers and simulators go with its process group whatever happens.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import report
from tests.support import run_process

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    result = run_process(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
         "--only", "hold,ingest,baseline,modbus,junk"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets", "## Hold", "### center (stored in SQLite)", "### framing-only baseline", "## Modbus",
                    "## Junk flood"):
        assert heading in text
    assert "Python 3." in text and "Twisted" in text and "SQLAlchemy" in text
    assert "Traceback" not in result.stderr
    assert report.with_current_findings(text) == text, "--findings-only would change a fresh report"


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


def test_merging_one_scenario_keeps_the_others_and_the_findings() -> None:
    from benchmarks.report import FINDINGS, merge_sections

    findings = FINDINGS.read_text()
    first_finding = next(line for line in findings.splitlines() if line.startswith("## "))
    existing = "# Performance\n\n## Targets\n\nold targets\n\n## Modbus: 1,000 DTUs\n\nmodbus\n\n" + findings
    fresh = "# Performance\n\n## Targets\n\nnew targets\n\n## Junk flood: 5 DTUs\n\njunk\n\n" + findings
    merged = merge_sections(existing, fresh)
    assert "modbus" in merged and "old targets" in merged and "new targets" not in merged
    assert merged.index("## Modbus") < merged.index("## Junk flood: 5 DTUs") < merged.index(first_finding)
    again = merge_sections(merged, fresh.replace("junk\n", "junk again\n"))
    assert again.count("## Junk flood") == 1 and "junk again" in again
