"""The offline admin CLI against a real SQLite file."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from dtucenter import cli
from dtucenter.dtu import wire
from dtucenter.dtu.center import upload_row
from dtucenter.store import queries
from dtucenter.store.db import open_engine
from dtucenter.store.models import Sample


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'c.db'}"


def store_upload(db: str, psn: int, when: dt.datetime, upload: wire.SendTest, registers=()) -> None:
    engine = open_engine(db)
    with Session(engine) as session, session.begin():
        row = upload_row(psn, when, upload, registers)
        session.execute(Sample.__table__.insert(), [dict(zip(queries.SAMPLE_ROW_COLUMNS, row, strict=False))])
    engine.dispose()


def test_add_update_and_list(db: str) -> None:
    added = run("dtu", "add", "10001", "--name", "pump house", "--password", "77", "--db", db)
    assert added == (0, "added DTU 10001\n")
    assert run("dtu", "add", "10001", "--tick-time", "30", "--db", db) == (0, "updated DTU 10001\n")
    code, text = run("dtu", "list", "--db", db)
    assert code == 0 and "pump house" in text and text.splitlines()[0].startswith("PSN")
    code, text = run("dtu", "list", "--json", "--db", db)
    [record] = json.loads(text)["dtus"]
    assert record["psn"] == 10001 and record["tick_time"] == 30 and record["password_set"] is True
    assert "password" not in record


def test_samples_csv_oldest_first_with_register_names(db: str) -> None:
    run("dtu", "add", "5", "--db", db)
    t0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    registers = (wire.Register(1, 100), wire.Register(1, 101))
    store_upload(db, 5, t0 + dt.timedelta(minutes=1), wire.SendTest(20, 2, (3, 4)), registers)
    store_upload(db, 5, t0, wire.SendTest(21, 1, (-1,)))
    code, text = run("samples", "5", "--db", db)
    assert code == 0
    assert text.splitlines() == [
        "time,psn,net_state,position,dev,addr,value",
        "2026-11-01T12:00:00+00:00,5,21,0,,,-1",
        "2026-11-01T12:01:00+00:00,5,20,0,1,100,3",
        "2026-11-01T12:01:00+00:00,5,20,1,1,101,4",
    ]
    code, text = run("samples", "5", "--since", "2026-11-01T12:00:30Z", "--limit", "1", "--format", "json", "--db", db)
    assert [s["value"] for s in json.loads(text)["samples"]] == [3]
    code, text = run("samples", "5", "--order", "desc", "--limit", "2", "--db", db)
    assert text.splitlines()[1:] == [
        "2026-11-01T12:01:00+00:00,5,20,0,1,100,3", "2026-11-01T12:01:00+00:00,5,20,1,1,101,4",
    ]


def test_errors_are_one_line(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("samples", "404", "--db", db)[0] == 1
    assert capsys.readouterr().err == "dtucenter: no DTU 404\n"
    assert run("dtu", "list", "--db", "sqlite:////no/such/dir/x.db")[0] == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        run("dtu", "add", "4294967296", "--db", db)
    assert caught.value.code == 2
    assert "PSN must be a whole number" in capsys.readouterr().err
    run("dtu", "add", "5", "--db", db)
    # Times that parse but have no UTC equivalent: refused by the option, not a traceback from the query.
    for option, text in [("--since", "0001-01-01T00:00:00+14:00"), ("--until", "9999-12-31T23:59:59-14:00")]:
        with pytest.raises(SystemExit) as caught:
            run("samples", "5", option, text, "--db", db)
        assert caught.value.code == 2
        assert f"{option}: {text!r} is outside the years 1..9999 in UTC" in capsys.readouterr().err
    assert run("dtu", "add", "5", "--name", "x" * 101, "--db", db)[0] == 1
    assert capsys.readouterr().err == "dtucenter: name must be text of at most 100 characters\n"


def test_meter_samples_csv_and_json(db: str) -> None:
    import tomllib

    from dtucenter.config import read_settings
    from dtucenter.store import meters
    from dtucenter.store.models import MeterSample
    from dtucenter.store.recorder import meter_spec

    settings = read_settings(tomllib.loads(
        '[[link]]\nname = "bus"\nserial = "/dev/ttyX"\n[[meter]]\nname = "m1"\nlink = "bus"\nunit = 1\n'
        '[[meter.point]]\nname = "volts"\ntable = "holding"\naddress = 0\nscale = 0.1\n'
        '[[meter.point]]\nname = "door"\ntable = "discrete"\naddress = 0\n'
    )).modbus
    t0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    engine = open_engine(db)
    with Session(engine) as session, session.begin():
        meters.sync_meters(session, [meter_spec(settings.meters[0])], t0)
        rows = meters.sample_rows("m1", t0, {"volts": 230.1, "door": True}) + meters.sample_rows(
            "m1", t0 + dt.timedelta(seconds=10), {"volts": float("nan"), "door": False})
        table_rows = [dict(zip(meters.METER_SAMPLE_COLUMNS, row, strict=False)) for row in rows]
        session.execute(MeterSample.__table__.insert(), table_rows)  # type: ignore[attr-defined]
    engine.dispose()
    code, text = run("samples", "--meter", "m1", "--db", db)
    assert code == 0
    assert text.splitlines() == [
        "time,meter,point,value",
        "2026-11-01T12:00:00+00:00,m1,volts,230.1",
        "2026-11-01T12:00:00+00:00,m1,door,true",
        "2026-11-01T12:00:10+00:00,m1,volts,",
        "2026-11-01T12:00:10+00:00,m1,door,false",
    ]
    code, text = run("samples", "--meter", "m1", "--point", "door", "--since", "2026-11-01T12:00:05Z",
                     "--format", "json", "--db", db)
    assert json.loads(text) == {"samples": [{"time": "2026-11-01T12:00:10+00:00", "point": "door", "value": False}]}


def test_samples_need_exactly_one_of_psn_and_meter(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["5", "--meter", "m1"], ["5", "--point", "volts"]):
        with pytest.raises(SystemExit) as caught:
            run("samples", *args, "--db", db)
        assert caught.value.code == 2
    assert "--point goes with --meter" in capsys.readouterr().err
    assert run("samples", "--meter", "nope", "--db", db)[0] == 1
    assert capsys.readouterr().err == "dtucenter: no meter 'nope'\n"
