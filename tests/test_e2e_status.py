"""GET /api/status against the real service."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from dtucenter.dtu import wire
from tests.support import connect_dtu, start_center


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
        assert body["modbus"] is None, "no [[link]] configured, no bridge"
        assert body["uptime_s"] >= 0 and body["started"].endswith("+00:00")
        assert (await api.get("/api/status?x=1")).status == 400
    finally:
        await center.stop()
