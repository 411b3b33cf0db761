"""Asking a device now, end to end: reads on demand and raw exchanges through the API of a
running center, over real sockets to a pymodbus meter behind a DTU that dials in, while
the poller keeps polling the same link; stored and audited on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from pymodbus.framer import FramerType
from twisted.internet import defer

from dtucenter.modbus.raw import frame_end
from dtucenter.store.accounts import FIRST_ADMIN
from dtucenter.web.auth import CONFIGURED_TOKEN_NAME
from tests.modbus.interop_support import EXPECTED_UNIT_1, FakeDtu, matches_unit_1, meter_toml
from tests.modbus.modbus_helpers import holding_response, read_holding, rtu
from tests.support import ApiClient, eventually, make_account, start_center

CONFIG = """
[modbus]
login_timeout = 5

[[link]]
name = "site-a"
registration = "DTU-0001"
heartbeat = "HB"
timeout = 1.0
retries = 0

[[link]]
name = "site-b"
registration = "DTU-0002"

[[meter]]
name = "m-offline"
link = "site-b"
unit = 1
interval = 60
[[meter.point]]
name = "setpoint"
table = "holding"
address = 0

""" + meter_toml("m-dialin", "site-a", 1, interval=0.2)

#: Holding registers 0 and 1 of the sample meter, asked for and answered as raw RTU frames.
RAW_REQUEST = rtu(read_holding(1, 0, 2))
RAW_ANSWER = rtu(holding_response(1, [2301, 0]))
#: The audit trails' ``who`` for the configured token: the first admin account's.
ADMIN_WHO = f"{FIRST_ADMIN}/{CONFIGURED_TOKEN_NAME}"


async def polled(api: ApiClient) -> bool:
    body = (await api.get("/api/meters/m-dialin/latest")).body
    return matches_unit_1({s["point"]: s["value"] for s in body["samples"]} or None)


@pytest_twisted.ensureDeferred
async def test_reads_and_raw_exchanges_race_the_polls_and_each_gets_its_own_answer(
    tmp_path: Path, db_url: str, meter_server
) -> None:
    bus = meter_server(FramerType.RTU)
    config = tmp_path / "center.toml"
    config.write_text(CONFIG)
    center = await start_center(
        tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url
    )
    dtu = FakeDtu()
    try:
        await dtu.start(await center.modbus_port(), bus.port)
        api = center.api()
        await eventually(lambda: polled(api), "a first stored poll")

        # Several at once, on a link polled every 0.2 s: the link's queue keeps them apart.
        raw_body = {"hex": RAW_REQUEST.hex(), "timeout": 2, "expect": "modbus-rtu"}
        racing = [api.post("/api/links/site-a/raw", raw_body) for _ in range(4)]
        racing += [api.post("/api/meters/m-dialin/read", {}) for _ in range(3)]
        racing.append(api.call("POST", "/api/meters/m-dialin/read"))  # the body is optional
        answers = await defer.gatherResults([defer.ensureDeferred(d) for d in racing])
        for raw in answers[:4]:
            assert raw.status == 200, raw.body
            received = bytes.fromhex(raw.body["received"])
            assert raw.body["complete"] and not raw.body["truncated"]
            # What came is the answer, maybe behind the DTU's heartbeat.
            assert received.endswith(RAW_ANSWER) and frame_end("modbus-rtu", received) == len(received)
            assert raw.body["sent"] == RAW_REQUEST.hex() and 0 < raw.body["elapsed"] < 2
        for read in answers[4:]:
            assert read.status == 200, read.body
            assert matches_unit_1(read.body["values"]) and read.body["errors"] == [] and read.body["stored"]

        one = await api.post("/api/meters/m-dialin/read", {"points": ["voltage", "serial"]})
        assert one.status == 200 and one.body["values"] == {"voltage": EXPECTED_UNIT_1["voltage"], "serial": 501}
        # Stored as a poll's values are, at the time the read started.
        stored = await api.get("/api/meters/m-dialin/samples?point=serial&order=desc&limit=100000")
        assert one.body["time"] in {s["time"] for s in stored.body["samples"]}

        await check_refusals(api)
        await check_audit_trail(api)
        # The polls go on after the raw exchanges: newer values keep landing.
        last = one.body["time"]
        await eventually(lambda: newer_poll(api, last), "a poll after the exchanges")
        assert (await api.get("/api/links/site-a")).body["counters"]["raw_exchanges"] == 4
    finally:
        await dtu.stop()
        await center.stop()


async def newer_poll(api: ApiClient, after: str) -> bool:
    body = (await api.get("/api/meters/m-dialin/samples?point=voltage&order=desc&limit=1")).body
    return bool(body["samples"]) and body["samples"][0]["time"] > after


async def check_refusals(api: ApiClient) -> None:
    refused = [
        ("/api/meters/m-offline/read", {}, 409, "link site-b is offline"),
        ("/api/meters/m-dialin/read", {"points": ["nope"]}, 404, "meter m-dialin has no point 'nope'"),
        ("/api/meters/nope/read", {}, 404, "no meter named 'nope'"),
        ("/api/meters/m-dialin/read", {"points": []}, 400, None),
        ("/api/meters/m-dialin/read", {"point": "voltage"}, 400, None),
        ("/api/links/site-b/raw", {"hex": "01"}, 409, "link site-b is offline"),
        ("/api/links/nope/raw", {"hex": "01"}, 404, "no link 'nope'"),
        ("/api/links/site-a/raw", {"hex": "0"}, 400, None),
        ("/api/links/site-a/raw", {"hex": ""}, 400, None),
        ("/api/links/site-a/raw", {"hex": "01", "timeout": 31}, 400, None),
        ("/api/links/site-a/raw", {"hex": "01", "expect": "ascii"}, 400, None),
        ("/api/links/site-a/raw", {"hex": "01", "max_bytes": 0}, 400, None),
    ]
    for path, body, status, error in refused:
        answer = await api.post(path, body)
        assert answer.status == status, (path, body, answer.body)
        if error is not None:
            assert answer.error == error


async def check_audit_trail(api: ApiClient) -> None:
    reads = (await api.get("/api/meters/m-dialin/reads?limit=100")).body["reads"]
    assert [r["outcome"] for r in reads] == ["ok"] * 5
    assert reads[0]["request"] == {"points": ["voltage", "serial"]} and reads[-1]["request"] == {"points": None}
    assert reads[0]["answer"]["values"]["serial"] == 501 and {r["who"] for r in reads} == {ADMIN_WHO}
    offline = (await api.get("/api/meters/m-offline/reads")).body["reads"]
    assert [(r["outcome"], r["error"]) for r in offline] == [("offline", "link site-b is offline")]

    exchanges = (await api.get("/api/links/site-a/raw")).body["exchanges"]
    assert len(exchanges) == 4 and all((e["outcome"], e["who"]) == ("ok", ADMIN_WHO) for e in exchanges)
    assert exchanges[0]["request"] == {"hex": RAW_REQUEST.hex(), "timeout": 2.0, "expect": "modbus-rtu",
                                       "max_bytes": 4096}
    assert bytes.fromhex(exchanges[0]["answer"]["hex"]).endswith(RAW_ANSWER)
    assert [e["outcome"] for e in (await api.get("/api/links/site-b/raw")).body["exchanges"]] == ["offline"]
    assert (await api.get("/api/links/nope/raw")).status == 404


@pytest_twisted.ensureDeferred
async def test_raw_exchanges_are_for_admins_and_reads_for_the_meters_account(tmp_path: Path) -> None:
    config = tmp_path / "center.toml"
    config.write_text(CONFIG)
    center = await start_center(tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1")
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        asked = await acme.post("/api/links/site-b/raw", {"hex": "01"})
        for answer in (asked, await acme.get("/api/links/site-b/raw")):
            assert (answer.status, answer.error) == (403, "only an admin account may do this")
        assert (await admin.get("/api/links/site-b/raw")).body["exchanges"] == [], "a refused exchange is not tried"

        # The admin's meter is no meter to acme, exactly as one that does not exist.
        for name in ("m-offline", "nope"):
            refused = await acme.post(f"/api/meters/{name}/read", {})
            assert (refused.status, refused.error) == (404, f"no meter {name!r}")
            assert (await acme.get(f"/api/meters/{name}/reads")).status == 404
        assert (await admin.get("/api/meters/m-offline/reads")).body["reads"] == []

        # Given to acme, it is acme's to read, and the trail names acme's token.
        assert (await admin.call("PUT", "/api/meters/m-offline/account", {"account": "acme"})).status == 200
        offline = await acme.post("/api/meters/m-offline/read", {})
        assert (offline.status, offline.error) == (409, "link site-b is offline")
        reads = (await acme.get("/api/meters/m-offline/reads")).body["reads"]
        assert [(r["who"], r["outcome"]) for r in reads] == [("acme/ops", "offline")]
    finally:
        await center.stop()
