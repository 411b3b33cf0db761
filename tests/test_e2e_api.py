"""The HTTP JSON API end to end: the real service, a real HTTP client, a fake DTU on a real socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from dtucenter.dtu import wire
from dtucenter.web.router import MAX_BODY
from tests.support import UDPDTU, DTUClient, RunningCenter, connect_dtu, start_center, until

PSN = 1001
#: Short enough to keep the suite quick, long enough for a loaded CI machine to answer in.
TIMEOUT = "0.5"


async def online_dtu(center: RunningCenter, psn: int = PSN, **fields: Any) -> DTUClient:
    """A DTU created through the API, logged in over TCP, with nothing unread."""
    response = await center.api().call("PUT", f"/api/dtus/{psn}", {"password": 77, **fields})
    assert response.status in (200, 201), response.body
    dtu = await connect_dtu(center)
    assert (await dtu.login(psn, 77)).accepted
    dtu.raw.clear()
    return dtu


def frames(*messages: Any) -> bytes:
    return b"".join(wire.encode_frame(m) for m in messages)


# -- authentication ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_request_needs_the_bearer_token(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        for client, headers in [
            (center.api(token=""), {}),
            (center.api(token="not-the-token"), {}),
            (center.api(), {"Authorization": f"Basic {center.api_token}"}),
            (center.api(), {"Authorization": f"Bearer {center.api_token}x"}),
        ]:
            for method, path in [("GET", "/api/dtus"), ("GET", "/api/nowhere"), ("DELETE", f"/api/dtus/{PSN}")]:
                response = await client.call(method, path, headers=headers)
                assert response.status == 401, (method, path, headers)
                assert response.error == "missing or wrong bearer token"
                assert response.headers["www-authenticate"].startswith("Bearer")
        good = await center.api().get("/api/dtus")
        assert good.status == 200 and good.body == {"dtus": [], "total": 0}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_token_file_is_created_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DTUCENTER_API_TOKEN", raising=False)
    token_file = tmp_path / "dtucenter.token"
    center = await start_center(tmp_path)
    try:
        token = center.api_token
        assert len(token) >= 32 and token_file.read_text().strip() == token
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert (await center.api().get("/api/dtus")).status == 200
    finally:
        await center.stop()
    again = await start_center(tmp_path)
    try:
        assert again.api_token == token
    finally:
        await again.stop()


@pytest_twisted.ensureDeferred
async def test_token_from_option_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "center.toml"
    config.write_text('api_token = "from-the-file"\n')
    monkeypatch.delenv("DTUCENTER_API_TOKEN", raising=False)
    center = await start_center(tmp_path, "--config", str(config))
    try:
        assert (await center.api(token="from-the-file").get("/api/dtus")).status == 200
    finally:
        await center.stop()
    monkeypatch.setenv("DTUCENTER_API_TOKEN", "from-the-environment")
    center = await start_center(tmp_path, "--config", str(config))
    try:
        assert (await center.api(token="from-the-environment").get("/api/dtus")).status == 200
        assert (await center.api(token="from-the-file").get("/api/dtus")).status == 401
    finally:
        await center.stop()
    center = await start_center(tmp_path, "--config", str(config), "--api-token", "from-the-option")
    try:
        assert (await center.api(token="from-the-option").get("/api/dtus")).status == 200
    finally:
        await center.stop()
    assert not (tmp_path / "dtucenter.token").exists()


# -- DTU records and samples ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_read_update_list_and_delete_a_dtu(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        created = await api.call("PUT", "/api/dtus/42", {"name": "pump house", "password": 5, "tick_time": 30})
        assert created.status == 201
        assert created.body["psn"] == 42 and created.body["name"] == "pump house"
        assert created.body["password_set"] is True and "password" not in created.body
        updated = await api.call(
            "PUT", "/api/dtus/42",
            {"send_test_mode": 0, "send_test_time": 10, "fota_flag": 1, "new_ver": 3, "new_ip": "127.0.0.9",
             "new_port": 20001},
        )
        assert updated.status == 200 and updated.body["tick_time"] == 30 and updated.body["new_port"] == 20001
        one = await api.get("/api/dtus/42")
        assert one.status == 200
        for key in ("psn", "name", "online", "remote", "last_seen", "pname", "version", "ccid", "fota_flag",
                    "tick_time", "send_test_mode", "send_test_time", "new_ver", "new_port", "new_ip"):
            assert key in one.body, key
        assert one.body["online"] is False and one.body["send_test_time"] == 10
        listing = await api.get("/api/dtus")
        assert [d["psn"] for d in listing.body["dtus"]] == [42]

        # The DTU gets those parameters in its LoginAck.
        dtu = await connect_dtu(center)
        ack = await dtu.login(42, 5)
        assert (ack.tick_time, ack.send_test_mode, ack.send_test_time, ack.fota_flag) == (30, 0, 10, 1)
        assert (ack.new_ver, ack.new_ip, ack.new_port) == (3, "127.0.0.9", 20001)
        live = (await api.get("/api/dtus/42")).body
        assert live["online"] is True and live["remote"].startswith("127.0.0.1:")

        deleted = await api.call("DELETE", "/api/dtus/42")
        assert deleted.status == 200 and deleted.body == {"deleted": 42}
        await dtu.closed()  # a deleted DTU is disconnected
        assert (await api.get("/api/dtus/42")).status == 404
        gone = await api.call("DELETE", "/api/dtus/42")
        assert gone.status == 404 and gone.error == "no DTU 42"
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_bad_dtu_records_are_refused(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        cases = [
            ({"tick_time": 0}, "tick_time must be a whole number 1..255"),
            ({"password": -1}, "password must be a whole number"),
            ({"send_test_time": "10"}, "send_test_time must be a whole number"),
            ({"new_ip": "300.1.1.1"}, "new_ip"),
            ({"colour": "red"}, "unknown DTU field 'colour'"),
        ]
        for body, message in cases:
            response = await api.call("PUT", "/api/dtus/7", body)
            assert response.status == 400 and message in response.error, (body, response.body)
        for raw, message in [
            (b"{not json", "malformed JSON"),
            (b"[1, 2]", "expected a JSON object"),
            (b"", "expected a JSON object"),
            (b'{"tick_time": NaN}', "malformed JSON"),
            (b"\xff\xfe", "malformed JSON"),
        ]:
            response = await api.call("PUT", "/api/dtus/7", raw=raw)
            assert response.status == 400 and message in response.error, (raw, response.body)
        assert (await api.call("PUT", "/api/dtus/4294967296", {})).status == 400
        assert (await api.call("PUT", "/api/dtus/seven", {})).error.startswith("not a PSN")
        assert (await api.get("/api/dtus")).body == {"dtus": [], "total": 0}  # nothing half-created
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_routes_wrong_methods_and_query_parameters(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        assert (await api.get("/api/nothing")).status == 404
        assert (await api.get("/api/")).error == "no such endpoint: /api"  # "/" itself is the console's
        wrong = await api.call("PATCH", "/api/dtus/1")
        assert wrong.status == 405 and wrong.headers["allow"] == "DELETE, GET, PUT"
        assert (await api.call("DELETE", "/api/dtus")).status == 405
        assert (await api.call("GET", "/api/dtus/1/read")).status == 405
        odd = await api.get("/api/dtus?page=2")
        assert odd.status == 400 and "unknown query parameter 'page'" in odd.error
        assert (await api.get("/api/dtus/")).status == 200  # a trailing slash is the same path
        assert (await api.get("/api/dtus/%FF")).status == 404
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_samples_oldest_first_with_since_until_and_limit(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        for code in range(3):
            dtu.send(wire.SendTest(20 + code, code, (code * 10, -code)))
            await dtu.next(wire.SendTestAck)
        response = await api.get(f"/api/dtus/{PSN}/samples")
        assert response.status == 200 and response.body["more"] is False
        samples = response.body["samples"]
        assert [(s["net_state"], s["position"], s["value"]) for s in samples] == [
            (20, 0, 0), (20, 1, 0), (21, 0, 10), (21, 1, -1), (22, 0, 20), (22, 1, -2),
        ]
        assert set(samples[0]) == {"time", "net_state", "position", "dev", "addr", "value"}
        limited = await api.get(f"/api/dtus/{PSN}/samples?limit=4")
        assert len(limited.body["samples"]) == 4 and limited.body["more"] is True
        first = samples[0]["time"]
        later = await api.get(f"/api/dtus/{PSN}/samples?since=2000-01-01T00:00:00Z&until={first.replace('+', '%2B')}")
        assert later.status == 200 and later.body["samples"] == []
        assert (await api.get(f"/api/dtus/{PSN}/samples?since=2999-01-01")).body["samples"] == []
        # Newest upload first, each upload's values in position order; limit keeps the newest.
        newest = await api.get(f"/api/dtus/{PSN}/samples?order=desc")
        assert [(s["net_state"], s["position"], s["value"]) for s in newest.body["samples"]] == [
            (22, 0, 20), (22, 1, -2), (21, 0, 10), (21, 1, -1), (20, 0, 0), (20, 1, 0),
        ]
        two = await api.get(f"/api/dtus/{PSN}/samples?order=desc&limit=2")
        assert [s["value"] for s in two.body["samples"]] == [20, -2] and two.body["more"] is True
        assert (await api.get(f"/api/dtus/{PSN}/samples?order=asc&limit=1")).body["samples"][0]["value"] == 0
        latest = await api.get(f"/api/dtus/{PSN}/latest")
        assert latest.status == 200 and latest.body == {"samples": newest.body["samples"][:2]}
        assert (await api.get("/api/dtus/999/latest")).status == 404
        await api.call("PUT", "/api/dtus/998", {})
        assert (await api.get("/api/dtus/998/latest")).body == {"samples": []}
        for query, message in [
            ("since=yesterday", "since: not an ISO 8601 time"),
            ("limit=0", "limit must be a whole number 1..100000"),
            ("limit=ten", "limit must be"),
            ("limit=1&limit=2", "given 2 times"),
            ("from=2020-01-01", "unknown query parameter 'from'"),
            ("order=newest", "order must be asc or desc, got 'newest'"),
        ]:
            bad = await api.get(f"/api/dtus/{PSN}/samples?{query}")
            assert bad.status == 400 and message in bad.error, (query, bad.body)
        assert (await api.get("/api/dtus/999/samples")).status == 404
    finally:
        await center.stop()


# -- commands --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_save_setup_round_trip_replaces_the_register_list(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        body = {"send_test_time": 10, "registers": [{"dev": 1, "addr": 0}, {"dev": 2, "addr": 40001}]}
        pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/setup", body))
        await dtu.next(wire.SaveSetup)
        assert bytes(dtu.raw) == bytes.fromhex("aa55 03 0008 0a 010000 029c41 f5".replace(" ", ""))
        dtu.send(wire.SaveSetupAck(1, 10, (wire.Register(1, 0), wire.Register(2, 40001))))
        response = await pending
        assert response.status == 200
        assert response.body == {**body, "confirmed": True}

        stored = await api.get(f"/api/dtus/{PSN}/setup")
        assert stored.body == {"send_test_time": 10, "registers": body["registers"]}
        assert (await api.get(f"/api/dtus/{PSN}")).body["send_test_time"] == 10
        # Uploads are named by the new list at once.
        dtu.send(wire.SendTest(9, 1, (111, 222)))
        await dtu.next(wire.SendTestAck)
        samples = (await api.get(f"/api/dtus/{PSN}/samples")).body["samples"]
        assert [(s["dev"], s["addr"], s["value"]) for s in samples] == [(1, 0, 111), (2, 40001, 222)]
        # And a reconnecting DTU is checked against it too.
        dtu.close()
        again = await connect_dtu(center)
        assert (await again.login(PSN, 77)).send_test_time == 10
        again.send(wire.SendTest(9, 2, (1,)))
        assert (await again.next(wire.SendTestAck)).test_code == 1  # wrong count: resend
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_read_setup_live_asks_the_dtu_and_stores_its_answer(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        assert (await api.get(f"/api/dtus/{PSN}/setup")).body == {"send_test_time": 0, "registers": []}
        pending = ensureDeferred(api.get(f"/api/dtus/{PSN}/setup?live=1"))
        assert await dtu.next() == wire.ReadSetup()
        assert bytes(dtu.raw) == bytes.fromhex("aa55 04 0001 05".replace(" ", ""))
        dtu.send_raw(bytes.fromhex("aa55 84 0005 1e 0700c8 76".replace(" ", "")))  # 30 s, (7, 200)
        response = await pending
        assert response.status == 200
        assert response.body == {"send_test_time": 30, "registers": [{"dev": 7, "addr": 200}]}
        assert (await api.get(f"/api/dtus/{PSN}/setup?live=0")).body == response.body
        assert (await api.get(f"/api/dtus/{PSN}/setup?live=maybe")).status == 400
        assert (await api.get("/api/dtus/5/setup")).status == 404
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_read_and_write_registers(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 3, "addr": 256}]}))
        assert await dtu.next() == wire.ReadTest((wire.Register(3, 256),))
        assert bytes(dtu.raw) == bytes.fromhex("aa55 06 0004 030100 0e".replace(" ", ""))
        dtu.send_raw(bytes.fromhex("aa55 86 0004 01 fffe 88".replace(" ", "")))  # Result 1, value -2
        response = await pending
        assert response.status == 200 and response.body == {"values": [-2]}

        dtu.raw.clear()
        items = [{"dev": 1, "addr": 10, "value": -32768}, {"dev": 255, "addr": 65535, "value": 32767}]
        pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/write", {"registers": items}))
        await dtu.next(wire.SetControl)
        assert bytes(dtu.raw) == bytes.fromhex("aa55 07 000b 01000a8000 ffffff7fff 18".replace(" ", ""))
        dtu.send(wire.SetControlAck(1, (wire.RegisterValue(1, 10, -32768), wire.RegisterValue(255, 65535, 32767))))
        response = await pending
        assert response.status == 200 and response.body == {"registers": items, "confirmed": True}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_concurrent_commands_go_out_one_at_a_time_in_order(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        first = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 1}]}))
        await dtu.next(wire.ReadTest)
        second = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 2, "addr": 2}]}))
        await until(lambda: center.center.sessions[PSN].commands.pending == 2)
        assert not dtu.received  # the second waits for the first's ack
        dtu.send(wire.ReadTestAck(1, (1,)))
        assert (await dtu.next(wire.ReadTest)).registers == (wire.Register(2, 2),)
        dtu.send(wire.ReadTestAck(1, (2,)))
        assert (await first).body == {"values": [1]}
        assert (await second).body == {"values": [2]}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_no_ack_in_time_is_504_and_a_late_ack_is_ignored(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--command-timeout", TIMEOUT)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        response = await api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 1}]})
        assert response.status == 504 and response.error == "no ReadTestAck within 0.5s"
        await dtu.next(wire.ReadTest)
        dtu.send(wire.ReadTestAck(1, (5,)), wire.SendTick())
        await dtu.next(wire.SendTickAck)
        assert center.center.stats["acks_stray"] == 1
        [record] = (await api.get(f"/api/dtus/{PSN}/commands")).body["commands"]
        assert record["outcome"] == "timeout" and record["error"] == "no ReadTestAck within 0.5s"
        assert record["sent"] is not None and record["finished"] is not None
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_command_is_502_for_all_pending(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        on_wire = ensureDeferred(api.post(f"/api/dtus/{PSN}/write", {"registers": [{"dev": 1, "addr": 1, "value": 1}]}))
        await dtu.next(wire.SetControl)
        queued = ensureDeferred(api.get(f"/api/dtus/{PSN}/setup?live=1"))
        await until(lambda: center.center.sessions[PSN].commands.pending == 2)
        dtu.close()
        for pending in (on_wire, queued):
            response = await pending
            assert response.status == 502 and response.error == "the DTU disconnected before answering"
        records = (await api.get(f"/api/dtus/{PSN}/commands")).body["commands"]
        assert [(r["kind"], r["outcome"]) for r in records] == [
            ("read_setup", "disconnected"), ("set_control", "disconnected"),
        ]
        assert records[0]["sent"] is None and records[1]["sent"] is not None
        offline = await api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 1}]})
        assert offline.status == 409 and offline.error == f"DTU {PSN} is offline"
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_result_zero_is_502_and_changes_nothing(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        for path, body, ack in [
            ("setup", {"send_test_time": 5, "registers": [{"dev": 1, "addr": 2}]}, wire.SaveSetupAck(0)),
            ("read", {"registers": [{"dev": 1, "addr": 2}]}, wire.ReadTestAck(0)),
            ("write", {"registers": [{"dev": 1, "addr": 2, "value": 3}]}, wire.SetControlAck(0)),
        ]:
            pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/{path}", body))
            await dtu.next()
            dtu.send_raw(bytes([0xAA, 0x55, ack.TYPE, 0, 2, 0, (ack.TYPE + 2) & 0xFF]))
            response = await pending
            assert response.status == 502 and "with Result 0" in response.error, path
        assert (await api.get(f"/api/dtus/{PSN}/setup")).body == {"send_test_time": 0, "registers": []}
        outcomes = [r["outcome"] for r in (await api.get(f"/api/dtus/{PSN}/commands")).body["commands"]]
        assert outcomes == ["refused"] * 3
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_bad_command_requests_are_400_and_nothing_is_sent(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        reg = {"dev": 1, "addr": 1}
        cases: list[tuple[str, Any, str]] = [
            ("read", {"registers": [{"dev": 256, "addr": 0}]}, "registers[0].dev must be a whole number 0..255"),
            ("read", {"registers": [reg, {"dev": 0, "addr": 65536}]},
             "registers[1].addr must be a whole number 0..65535"),
            ("write", {"registers": [{**reg, "value": 32768}]},
             "registers[0].value must be a whole number -32768..32767"),
            ("write", {"registers": [{**reg, "value": -40000}]}, "registers[0].value"),
            ("setup", {"send_test_time": 300, "registers": []}, "send_test_time must be a whole number 0..255"),
            ("read", {"registers": [reg] * 342}, "342 registers do not fit one frame; at most 341"),
            ("write", {"registers": [{**reg, "value": 0}] * 205}, "at most 204"),
            ("read", {"registers": []}, "registers must not be empty"),
            ("read", {"registers": [{"dev": True, "addr": 1}]}, "registers[0].dev must be a whole number"),
            ("read", {"registers": [{"dev": 1.5, "addr": 1}]}, "registers[0].dev must be a whole number"),
            ("read", {"registers": [{"dev": 1}]}, "registers[0] needs addr"),
            ("read", {"registers": [{**reg, "adr": 1}]}, "registers[0]: unknown field adr"),
            ("read", {"registers": "all"}, "registers must be a list"),
            ("read", {"registers": [7]}, "registers[0] must be an object"),
            ("read", {}, "the body needs registers"),
            ("setup", {"registers": []}, "the body needs send_test_time"),
            ("write", {"registers": [reg]}, "registers[0] needs value"),
        ]
        for path, body, message in cases:
            response = await api.post(f"/api/dtus/{PSN}/{path}", body)
            assert response.status == 400 and message in response.error, (path, response.body)
        for raw in (b"{", b'"registers"', b"null"):
            response = await api.call("POST", f"/api/dtus/{PSN}/read", raw=raw)
            assert response.status == 400, raw
        huge = await api.call("POST", f"/api/dtus/{PSN}/read", raw=b" " * (MAX_BODY + 1))
        assert huge.status == 413 and huge.error == f"request body over {MAX_BODY} bytes"
        chunked = await api.call("POST", f"/api/dtus/{PSN}/read", raw=ChunkedBody(b"x" * 65536, 17))
        assert chunked.status == 413
        dtu.send(wire.SendTick())
        await dtu.next(wire.SendTickAck)
        assert bytes(dtu.raw) == frames(wire.SendTickAck())  # not one command went out
        assert (await api.get(f"/api/dtus/{PSN}/commands")).body == {"commands": []}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_is_404_offline_is_409_and_audited(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    api = center.api()
    try:
        read = {"registers": [{"dev": 1, "addr": 1}]}
        unknown = await api.post("/api/dtus/5/read", read)
        assert unknown.status == 404 and unknown.error == "no DTU 5"
        assert (await api.get("/api/dtus/5/commands")).status == 404
        assert (await api.call("PUT", "/api/dtus/5", {})).status == 201
        for call in (api.post("/api/dtus/5/read", read), api.get("/api/dtus/5/setup?live=1"),
                     api.post("/api/dtus/5/setup", {"send_test_time": 1, "registers": []}),
                     api.post("/api/dtus/5/write", {"registers": [{"dev": 1, "addr": 1, "value": 1}]})):
            response = await call
            assert response.status == 409 and response.error == "DTU 5 is offline"
        records = (await api.get("/api/dtus/5/commands")).body["commands"]
        assert [(r["kind"], r["outcome"]) for r in records] == [
            ("set_control", "offline"), ("save_setup", "offline"), ("read_setup", "offline"), ("read_test", "offline"),
        ]
        assert records[3]["request"] == read and records[3]["sent"] is None
        # The trail outlives the DTU record.
        await api.call("DELETE", "/api/dtus/5")
        assert len((await api.get("/api/dtus/5/commands")).body["commands"]) == 4
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_the_audit_trail_says_who_what_when_and_how_it_ended(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        for value in (1, 2, 3):
            pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": value}]}))
            await dtu.next(wire.ReadTest)
            dtu.send(wire.ReadTestAck(1, (value * 100,)))
            assert (await pending).status == 200
        records = (await api.get(f"/api/dtus/{PSN}/commands?limit=2")).body["commands"]
        assert len(records) == 2
        newest = records[0]
        assert set(newest) == {"id", "psn", "kind", "request", "who", "queued", "sent", "finished", "outcome",
                               "result", "error"}
        assert newest["kind"] == "read_test" and newest["outcome"] == "ok" and newest["error"] is None
        assert newest["request"] == {"registers": [{"dev": 1, "addr": 3}]}
        assert newest["result"] == {"values": [300]}
        assert newest["who"] == "admin/api-token"
        assert newest["queued"] <= newest["sent"] <= newest["finished"]
        assert records[1]["result"] == {"values": [200]} and records[1]["id"] < newest["id"]
        assert (await api.get(f"/api/dtus/{PSN}/commands?limit=1001")).status == 400
    finally:
        await center.stop()


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length, so the client sends it chunked: the server cannot tell its size up front."""

    length = UNKNOWN_LENGTH

    def __init__(self, chunk: bytes, count: int) -> None:
        self.chunk = chunk
        self.count = count

    def startProducing(self, consumer: Any) -> Any:
        for _ in range(self.count):
            consumer.write(self.chunk)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_commands_reach_a_dtu_over_udp(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--unknown-dtu", "accept", "--dtu-udp", "127.0.0.1:0")
    client = UDPDTU()
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        target = ("127.0.0.1", center.udp_port)
        client.transport.write(frames(wire.Login(321, 9)), target)
        await until(lambda: len(client.events) == 1)
        pending = ensureDeferred(center.api().post("/api/dtus/321/read", {"registers": [{"dev": 9, "addr": 9}]}))
        await until(lambda: len(client.events) == 2)
        assert client.events[1] == wire.ReadTest((wire.Register(9, 9),))
        client.transport.write(frames(wire.ReadTestAck(1, (99,))), target)
        assert (await pending).body == {"values": [99]}
    finally:
        await port.stopListening()
        await center.stop()


@pytest.mark.expected_errors("secret detail", error=RuntimeError)
@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_is_a_logged_500_in_json(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        center.store.read = lambda job: fail(RuntimeError("secret detail"))  # type: ignore[method-assign]
        response = await center.api().get("/api/dtus")
        assert response.status == 500
        assert response.error == "internal error; the center's log has the details"
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_the_frame_limit_of_the_dialect_bounds_register_lists(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--max-frame-length", "64")
    api = center.api()
    try:
        dtu = await online_dtu(center)
        registers = [{"dev": 1, "addr": n} for n in range(22)]
        too_many = await api.post(f"/api/dtus/{PSN}/read", {"registers": registers})
        assert too_many.status == 400 and too_many.error == "22 registers do not fit one frame; at most 21"
        pending = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": registers[:21]}))
        assert len((await dtu.next(wire.ReadTest)).registers) == 21
        dtu.send(wire.ReadTestAck(1, tuple(range(21))))
        assert (await pending).body == {"values": list(range(21))}
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_hanging_up_does_not_stop_or_break_the_command(tmp_path: Path) -> None:
    # No failure may be logged either: the autouse expected_errors fixture checks that.
    center = await start_center(tmp_path)
    api = center.api()
    try:
        dtu = await online_dtu(center)
        impatient = ensureDeferred(api.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 1}]}))
        await dtu.next(wire.ReadTest)
        impatient.cancel()  # the client gives up and closes its connection
        await until(lambda: impatient.called)
        dtu.send(wire.ReadTestAck(1, (12,)))
        await until(lambda: center.center.sessions[PSN].commands.pending == 0)
        await center.store.when_idle()
        [record] = (await api.get(f"/api/dtus/{PSN}/commands")).body["commands"]
        assert record["outcome"] == "ok" and record["result"] == {"values": [12]}
        impatient.addErrback(lambda _: None)
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_the_api_can_be_turned_off(tmp_path: Path) -> None:
    center = await start_center(tmp_path, "--api", "off")
    try:
        assert center.api_port is None
        assert "api" not in [s.name for s in center.service]
        assert not (tmp_path / "dtucenter.token").exists()
    finally:
        await center.stop()


@pytest_twisted.ensureDeferred
async def test_commands_pending_at_a_crash_are_marked_interrupted_at_start(tmp_path: Path, db_url: str) -> None:
    import datetime as dt

    from sqlalchemy.orm import Session

    from dtucenter.store import audit
    from dtucenter.store.db import open_engine

    engine = open_engine(db_url)
    with Session(engine) as session, session.begin():
        audit.record_command(session, 8, "read_setup", {}, "127.0.0.1:1", dt.datetime.now(dt.UTC))
    engine.dispose()
    center = await start_center(tmp_path, db_url=db_url)
    try:
        await center.store.when_idle()
        [record] = (await center.api().get("/api/dtus/8/commands")).body["commands"]
        assert record["outcome"] == "interrupted" and record["finished"] is not None
        assert record["error"] == "the center stopped before the command finished"
    finally:
        await center.stop()


# -- hostile input: always a JSON 4xx, never a 500 -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_4xx_never_a_500(tmp_path: Path, db_url: str) -> None:
    center = await start_center(tmp_path, db_url=db_url)
    api = center.api()
    try:
        await online_dtu(center)
        deep = b"[" * 100_000 + b"]" * 100_000
        for raw, message in [
            (deep, "nested too deeply"),
            (b'{"name": ' + deep + b"}", "nested too deeply"),
            (b'{"name": "pump\\u0000house"}', "NUL character"),
            (b'{"name\\u0000": "x"}', "NUL character"),
        ]:
            response = await api.call("PUT", f"/api/dtus/{PSN}", raw=raw)
            assert response.status == 400 and message in response.error, (raw[:40], response.body)
        deep_registers = b'{"registers": ' + deep + b"}"
        response = await api.call("POST", f"/api/dtus/{PSN}/read", raw=deep_registers)
        assert response.status == 400 and "nested too deeply" in response.error
        for path, message in [
            # Times that parse but have no UTC equivalent.
            (f"/api/dtus/{PSN}/samples?since=0001-01-01T00:00:00%2B14:00", "since: '0001-01-01T00:00:00+14:00' is"),
            (f"/api/dtus/{PSN}/samples?until=9999-12-31T23:59:59-14:00", "until: '9999-12-31T23:59:59-14:00' is"),
            ("/api/meters/m/samples?since=0001-01-01T00:00:00%2B01:00", "since:"),
            # NUL in names, where PostgreSQL cannot even compare text holding one.
            ("/api/meters/m%00x", "NUL character"),
            ("/api/meters/m%00x/samples", "NUL character"),
            ("/api/meters/m/samples?point=p%00q", "query parameter 'point' contains a NUL character"),
            (f"/api/dtus/{PSN}/samples?since=2020%00", "NUL character"),
            ("/api/links/l%00", "NUL character"),
        ]:
            response = await api.get(path)
            assert response.status == 400 and message in response.error, (path, response.body)
        assert (await api.get(f"/api/dtus/{PSN}")).body["name"] == ""  # nothing was stored
    finally:
        await center.stop()


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is on a fresh connection and return all the center sends until it hangs up."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def __init__(self) -> None:
            self.received = bytearray()
            self.closed = False

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Any = None) -> None:
            self.closed = True

    client = Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    assert client.transport is not None
    client.transport.write(request)
    try:
        await until(lambda: client.closed)
    finally:
        client.transport.loseConnection()
    return bytes(client.received)


def parse_raw_answer(answer: bytes) -> tuple[int, dict[str, str], Any]:
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    assert headers.get("content-type", "").startswith("application/json"), answer[:300]
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_requests_twisted_refuses_get_json_answers_too(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    assert center.api_port is not None
    auth = f"Authorization: Bearer {center.api_token}\r\n".encode()
    try:
        cases = [
            # Over Twisted's 16 KiB for the request line and headers together.
            (b"GET /api/dtus HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Big: " + b"a" * 8000 + b"\r\n"
             + b"X-Big2: " + b"a" * 9000 + b"\r\n\r\n", 431),
            # One header line over the line limit.
            (b"GET /api/dtus HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
            # Over Twisted's 500 headers.
            (b"GET /api/dtus HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(501)) + b"\r\n",
             431),
            (b"NOT HTTP AT ALL\r\n\r\n", 400),
            (b"GET /api/dtus HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n", 400),
            (b"POST /api/dtus/1 HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        ]
        for request, status in cases:
            answer = await raw_exchange(center.api_port, request)
            code, headers, body = parse_raw_answer(answer)
            assert code == status and set(body) == {"error"}, (request[:60], answer[:200])
            assert headers["connection"] == "close"
        # A path whose bytes are not UTF-8: raw, twisted.web refuses the request line; %-escaped, no such endpoint.
        for path, status in ((b"/api/dtus/\xff", 400), (b"/api/dtus/%ff", 404)):
            answer = await raw_exchange(
                center.api_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n")
            code, _, body = parse_raw_answer(answer)
            assert code == status and set(body) == {"error"}, answer[:200]
    finally:
        await center.stop()
