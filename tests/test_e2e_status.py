"""GET /api/status against the real service."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest_twisted
from sqlalchemy.orm import Session

from dtucenter.dtu import wire
from dtucenter.store import queries
from tests.support import connect_dtu, start_center, until


@pytest_twisted.ensureDeferred
async def test_status_counts_online_dtus_frames_and_commits(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept")
    api = center.api()
    try:
        dtu = await connect_dtu(center)
        await dtu.login(8, 8)
        bad = bytearray(wire.encode_frame(wire.SendTick()))
        bad[-1] ^= 1
        dtu.send_raw(bytes(bad))
        dtu.send(wire.SendTest(10, 1, (1, 2, 3)))
        await dtu.next(wire.SendTestAck)
        status = await api.get("/api/status")
        assert status.status == 200
        body = status.body
        assert body["dtus_online"] == 1
        assert body["counters"]["logins"] == 1 and body["counters"]["dropped_BadChecksum"] == 1
        assert body["counters"]["samples_stored"] == 3
        assert body["store"]["healthy"] is True and body["store"]["rows_committed"] == 1  # one row per upload
        assert body["modbus"]["links"] == 0, "no [[link]] configured (the bridge waits for the API's)"
        assert body["uptime_s"] >= 0 and body["started"].endswith("+00:00")
        assert (await api.get("/api/status?x=1")).status == 400
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_stale_register_list_shows_in_the_status_and_heals(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept")
    api = center.api()
    try:
        with Session(center.store.engine) as session, session.begin():
            queries.upsert_dtu(session, 12, {"tick_time": 60}, dt.datetime.now(dt.UTC))
            queries.replace_register_list(session, 12, 10, [(1, 0), (1, 1)])  # what a SaveSetup of 2 left
        dtu = await connect_dtu(center)
        assert (await dtu.login(12, 5)).accepted
        eight = tuple(range(8))
        for _ in range(3):
            dtu.send(wire.SendTest(10, 7, eight))
        answers = [await dtu.next() for _ in range(4)]
        assert answers == [wire.SendTestAck(6)] * 2 + [wire.ReadSetup(), wire.SendTestAck(6)]  # 6: "resend"
        body = (await api.get("/api/status")).body
        assert body["register_list_mismatches"] == {"dtus": 1, "psns": [12]}
        assert body["counters"]["uploads_mismatched"] == 3 and body["counters"]["register_lists_asked"] == 1
        dtu.send(wire.ReadSetupAck(10, tuple(wire.Register(1, addr) for addr in range(8))))
        await until(lambda: center.center.sessions[12].registers and len(center.center.sessions[12].registers) == 8)
        dtu.send(wire.SendTest(10, 7, eight))
        assert (await dtu.next(wire.SendTestAck)).test_code == 7
        body = (await api.get("/api/status")).body
        assert body["register_list_mismatches"] == {"dtus": 0, "psns": []}
        assert body["counters"]["samples_stored"] == 8
    finally:
        await center.stop()
