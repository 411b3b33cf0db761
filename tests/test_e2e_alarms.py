"""Alarms end to end: the real center, a DTU over TCP crossing a limit, the API, and a webhook
receiver that fails on purpose for a while; then a restart on the same database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pymodbus.framer import FramerType
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web import server
from twisted.web.resource import Resource

from dtucenter.dtu import wire
from dtucenter.store import alarms as stored_alarms
from tests.modbus.interop_support import PymodbusServer
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import ApiClient, RunningCenter, connect_dtu, eventually, start_center, until
from tests.test_e2e_dtu import add_dtu

PSN = 1001


class Receiver(Resource):
    """A webhook receiver: answers 503 to its first ``failures`` requests, then takes them."""

    isLeaf = True

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.refused = 0
        self.accepted: list[tuple[str, dict[str, Any]]] = []

    def render_POST(self, request: server.Request) -> bytes:
        assert request.content is not None
        body = json.loads(request.content.read())
        assert request.getHeader("Content-Type") == "application/json"
        if self.refused < self.failures:
            self.refused += 1
            request.setResponseCode(503)
            return b"down for maintenance"
        self.accepted.append((request.getHeader("X-Dtucenter-Delivery") or "", body))
        return b"{}"


async def upload(dtu: Any, *values: int) -> None:
    dtu.send(wire.SendTest(net_state=25, test_code=1, values=values))
    await dtu.next(wire.SendTestAck)


async def alarms(api: ApiClient, query: str = "") -> list[dict[str, Any]]:
    answer = await api.get(f"/api/alarms{query}")
    assert answer.status == 200, answer.body
    return answer.body["alarms"]  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_a_dtu_crossing_a_limit_raises_an_alarm_listed_and_posted_once_in_order(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver(failures=2)
    port: IListeningPort = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")  # type: ignore[attr-defined]
    hook = f"http://127.0.0.1:{port.getHost().port}/hook"
    center: RunningCenter | None = await start_center(tmp_path, db_url=db_url)
    try:
        assert center is not None
        add_dtu(center, PSN)
        api = center.api()
        rule = {"name": "hot", "dtu": PSN, "point": 1, "above": 100, "hysteresis": 10, "webhook": hook}
        made = await api.post("/api/alarms/rules", rule)
        assert made.status == 201, made.body
        assert made.body == {**rule, "point": "1", "above": 100.0, "hysteresis": 10.0, "account": "admin",
                             "managed_by": "api", "raised": False}
        assert (await api.post("/api/alarms/rules", rule)).status == 409
        refused = await api.post("/api/alarms/rules", {**rule, "name": "cold", "below": 1})
        assert (refused.status, refused.error) == (
            400, "the body: below: cannot be combined with above; make two rules")
        monkeypatch.setattr(stored_alarms, "MAX_RULES_PER_ACCOUNT", 1)
        full = await api.post("/api/alarms/rules", {"name": "second", "dtu": PSN, "offline": 5})
        assert (full.status, full.error) == (
            409, "the account has 1 alarm rules, the most it may have; delete some first")
        monkeypatch.undo()
        unknown = await api.post("/api/alarms/rules", {"name": "x", "meter": "nowhere", "failed_polls": 1})
        assert (unknown.status, unknown.error) == (404, "no meter 'nowhere'")
        for query, error in (("?active=2", "active must be 0 or 1, got '2'"),
                             ("?before=x", "before must be an alarm id, got 'x'")):
            assert (await api.get(f"/api/alarms{query}")).error == error

        dtu = await connect_dtu(center)
        assert (await dtu.login(PSN, 1)).accepted
        await upload(dtu, 500, 50)  # position 0 is not watched
        await upload(dtu, 0, 150)
        first = await eventually(lambda: alarms(api, "?active=1"), "the alarm raised")
        assert [(a["rule"], a["device"], a["point"], a["raised_value"], a["limit"]) for a in first] == [
            ("hot", str(PSN), "1", 150.0, 100.0)]
        assert (await api.get("/api/alarms/rules/hot")).body["raised"] is True
        await upload(dtu, 0, 95)  # inside the hysteresis: still raised
        await upload(dtu, 0, 90)  # cleared
        await upload(dtu, 0, 120)  # raised again
        history = await eventually(
            lambda: _when(alarms(api), lambda found: len(found) == 2 and found[1]["cleared"]), "the history"
        )
        assert [(a["active"], a["raised_value"], a["cleared_value"]) for a in history] == [
            (True, 120.0, None), (False, 150.0, 90.0)]
        page = await api.get("/api/alarms?limit=1")
        assert page.body["next"] == history[0]["id"]
        assert [a["id"] for a in await alarms(api, f"?limit=1&before={page.body['next']}")] == [history[1]["id"]]

        # The receiver refused twice, then took each delivery once, in the order they happened.
        await until(lambda: len(receiver.accepted) == 3, timeout=30)
        assert receiver.refused == 2
        assert [(body["event"], body["alarm"], body["value"]) for _, body in receiver.accepted] == [
            ("raised", history[1]["id"], 150.0), ("cleared", history[1]["id"], 90.0),
            ("raised", history[0]["id"], 120.0)]
        assert [key for key, _ in receiver.accepted] == [
            f"{history[1]['id']}-raised", f"{history[1]['id']}-cleared", f"{history[0]['id']}-raised"]
        assert receiver.accepted[0][1]["message"] == f"dtu {PSN} 1 = 150, above 100"

        # A restart reads the active alarm back: the value still above the limit raises nothing new.
        dtu.close()
        await center.stop()
        center = None
        center = await start_center(tmp_path, db_url=db_url)
        api = center.api()
        dtu = await connect_dtu(center)
        assert (await dtu.login(PSN, 1)).accepted
        await eventually(lambda: _rule_raised(api), "the rule raised after the restart")
        await upload(dtu, 0, 200)
        await upload(dtu, 0, 10)
        history = await eventually(
            lambda: _when(alarms(api), lambda found: not found[0]["active"]), "the alarm cleared after the restart"
        )
        assert [(a["raised_value"], a["cleared_value"]) for a in history] == [(120.0, 10.0), (150.0, 90.0)]
        await until(lambda: len(receiver.accepted) == 4, timeout=30)
        assert receiver.accepted[3][1]["event"] == "cleared"
        assert await alarms(api, "?active=1") == []
        dtu.close()
    finally:
        if center is not None:
            await center.stop()
        await port.stopListening()


async def _when(found: Any, condition: Any) -> Any:
    result = await found
    return result if condition(result) else None


async def _rule_raised(api: ApiClient) -> bool:
    answer = await api.get("/api/alarms/rules/hot")
    return answer.status == 200 and answer.body["raised"] is True


@pytest_twisted.ensureDeferred
async def test_the_files_rules_are_evaluated_read_only_to_the_api_and_follow_a_reload(
    tmp_path: Path, db_url: str
) -> None:
    receiver = Receiver(failures=0)
    port: IListeningPort = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")  # type: ignore[attr-defined]
    config = tmp_path / "center.toml"
    config.write_text('[[alarm]]\nname = "silent"\ndtu = 2002\noffline = 0.2\n')
    center = await start_center(tmp_path, "--config", str(config), db_url=db_url)
    try:
        add_dtu(center, 2002)
        api = center.api()
        hook = f"http://127.0.0.1:{port.getHost().port}/all"
        assert (await api.call("PUT", "/api/alarms/webhook", {"url": hook})).body == {"account": "admin", "url": hook}
        listed = (await api.get("/api/alarms/rules")).body["rules"]
        assert [(r["name"], r["managed_by"]) for r in listed] == [("silent", "file")]
        assert (await api.call("PUT", "/api/alarms/rules/silent", {"dtu": 2002, "offline": 5})).status == 409
        assert (await api.call("DELETE", "/api/alarms/rules/silent")).status == 409
        assert (await api.post("/api/alarms/rules", {"name": "silent", "dtu": 2002, "offline": 5})).status == 409

        # Never online since the start: raised once the 0.2 s have passed; its login clears it.
        await until(lambda: len(receiver.accepted) == 1)
        dtu = await connect_dtu(center)
        assert (await dtu.login(2002, 1)).accepted
        await until(lambda: len(receiver.accepted) == 2)
        assert [(body["event"], body["rule"], body["device"]) for _, body in receiver.accepted] == [
            ("raised", "silent", "2002"), ("cleared", "silent", "2002")]

        # A reload with the rule gone: no longer listed; a new one in its place is evaluated.
        config.write_text('[[alarm]]\nname = "quiet"\ndtu = 2002\noffline = 0.2\n')
        await center.service.reloader.reload()  # type: ignore[attr-defined]
        listed = (await api.get("/api/alarms/rules")).body["rules"]
        assert [r["name"] for r in listed] == ["quiet"]
        dtu.close()
        await until(lambda: len(receiver.accepted) == 3)
        assert receiver.accepted[2][1]["rule"] == "quiet"
    finally:
        await center.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_polled_meter_past_its_limit_and_then_failing_raises_both_rules(
    tmp_path: Path, db_url: str
) -> None:
    meter = PymodbusServer([sdm120(7)], framer=FramerType.SOCKET).start()
    config = tmp_path / "center.toml"
    config.write_text(
        f'[[link]]\nname = "plant"\nprotocol = "tcp"\nconnect = "tcp:host=127.0.0.1:port={meter.port}"\n'
        '[[meter]]\nname = "house"\nlink = "plant"\nunit = 7\ninterval = 0.2\ntemplate = "eastron-sdm120"\n'
        '[[alarm]]\nname = "volts-high"\nmeter = "house"\npoint = "voltage"\nabove = 230\ndelay = 0.5\n'
        '[[alarm]]\nname = "volts-low"\nmeter = "house"\npoint = "voltage"\nbelow = 200\n'
        '[[alarm]]\nname = "house-dead"\nmeter = "house"\nfailed_polls = 2\n'
    )
    stopped = False
    center = await start_center(tmp_path, "--config", str(config), db_url=db_url)
    try:
        api = center.api()
        high = await eventually(lambda: alarms(api, "?active=1&rule=volts-high"), "volts-high raised")
        assert [(a["device_kind"], a["device"], a["point"], a["raised_value"], a["limit"]) for a in high] == [
            ("meter", "house", "voltage", SDM120_VALUES["voltage"], 230.0)]
        meter.stop()
        stopped = True
        dead = await eventually(lambda: alarms(api, "?active=1&rule=house-dead"), "house-dead raised")
        assert dead[0]["message"].startswith("meter house: 2 polls failed in a row (last: ")
        # Nothing else: the value never went below 200, and each rule raised once.
        assert sorted(a["rule"] for a in await alarms(api)) == ["house-dead", "volts-high"]
    finally:
        await center.stop()
        if not stopped:
            meter.stop()
