"""The binary protocol's pending DTUs end to end: an unknown PSN's login is held unanswered and
listed as pending; adopted into an account, it is answered on the same connection and its
uploads are stored; dropped, it is refused; under ``reject`` it is refused at once."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from dtucenter.dtu import wire
from tests.support import connect_dtu, eventually, make_account, start_center


@pytest_twisted.ensureDeferred
async def test_an_unknown_psn_is_held_pending_and_answered_once_adopted(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")
        dtu = await connect_dtu(center)
        dtu.send(wire.Login(5005, 4242, pname="HS121"))

        async def listed() -> list[dict[str, object]]:
            return list((await acme.get("/api/pending?registration=5005")).body["pending"])

        (device,) = await eventually(listed, "the unknown PSN pending")
        assert device["kind"] == "dtu" and device["registration"] == "5005"
        assert not dtu.received and not dtu.lost.called, "held: no answer yet, not closed"
        bad = await acme.post(f"/api/pending/{device['id']}/adopt", {"template": "eastron-sdm120"})
        assert bad.status == 400, bad.body

        adopted = await acme.post(f"/api/pending/{device['id']}/adopt", {})
        assert adopted.status == 201, adopted.body
        assert adopted.body["account"] == "acme" and adopted.body["link"] == "5005"
        ack = await dtu.next(wire.LoginAck)
        assert ack.accepted, "answered on the connection it logged in on"
        dtu.send(wire.SendTest(net_state=25, test_code=3, values=(7, 8)))
        assert (await dtu.next(wire.SendTestAck)).test_code == 3
        shown = (await acme.get("/api/dtus/5005")).body
        assert shown["account"] == "acme" and shown["password_set"] is True
        assert (await beta.get("/api/dtus/5005")).status == 404
        assert (await beta.get("/api/pending?registration=5005")).body == {"pending": []}
        dtu.close()
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_dropped_pending_dtu_is_refused_and_reject_refuses_at_once(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        admin = center.api()
        dtu = await connect_dtu(center)
        dtu.send(wire.Login(6006, 1))

        async def listed() -> list[dict[str, object]]:
            return list((await admin.get("/api/pending")).body["pending"])

        (device,) = await eventually(listed, "the unknown PSN pending")
        dropped = await admin.call("DELETE", f"/api/pending/{device['id']}")
        assert dropped.status == 200, dropped.body
        assert not (await dtu.next(wire.LoginAck)).accepted
        await dtu.closed()
        assert await listed() == []
    finally:
        await center.stop()
    center = await start_center(tmp_path, "--unknown-dtu", "reject")
    try:
        dtu = await connect_dtu(center)
        assert not (await dtu.login(7007, 1)).accepted
        assert (await center.api().get("/api/pending")).body == {"pending": []}
    finally:
        await center.stop()
