"""Links and meters created, changed and deleted through the API while the center runs, end to
end over real sockets on SQLite and PostgreSQL: a DTU dials in under a link made a moment ago,
a meter made from a template is polled and stored with no restart, a changed meter's points
are used from its next poll, a deleted link's connection is closed; and the refusals."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pymodbus.framer import FramerType

from tests.modbus.interop_support import FakeDtu, PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import ApiClient, eventually, make_account, start_center

#: The config file's own link: the API may not change it.
CONFIG = """
[[link]]
name = "filed"
registration = "FILE-0001"
"""

LINK = {"name": "site-a", "registration": "DTU-0001", "heartbeat": "HB", "timeout": 1.0, "retries": 0}
METER = {"name": "m1", "link": "site-a", "unit": 1, "interval": 0.2, "template": "eastron-sdm120"}
#: The same meter with one point of its own instead of the template: voltage, as a float at register 0.
VOLTS_ONLY = {"link": "site-a", "unit": 1, "interval": 0.2,
              "point": [{"name": "volts", "table": "input", "address": 0, "type": "float32"}]}


async def online(api: ApiClient, link: str) -> bool:
    body = (await api.get(f"/api/links/{link}")).body
    return bool(body.get("online"))


def only_volts(values: dict[str, Any] | None) -> bool:
    return values == {"volts": SDM120_VALUES["voltage"]}


@pytest_twisted.ensureDeferred
async def test_links_and_meters_made_through_the_api_are_served_at_once(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    config = tmp_path / "center.toml"
    config.write_text(CONFIG)
    center = await start_center(
        tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url
    )
    dtu = FakeDtu()
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")

        made = await acme.post("/api/links", LINK)
        assert made.status == 201, made.body
        assert made.body["managed_by"] == "api" and made.body["definition"]["registration"] == "DTU-0001"
        await dtu.start(await center.modbus_port(), bus.port)
        await eventually(lambda: online(acme, "site-a"), "the DTU of a link made through the API online")
        listed = (await acme.get("/api/links")).body["links"]
        assert [(link["name"], link["account"], link["managed_by"]) for link in listed] == [("site-a", "acme", "api")]
        assert (await beta.get("/api/links")).body == {"links": []}

        meter = await acme.post("/api/meters", METER)
        assert meter.status == 201, meter.body
        stored = await eventually(lambda: latest_poll(acme, "m1"), "the values of a meter made through the API")
        assert stored == SDM120_VALUES
        shown = (await acme.get("/api/meters/m1")).body
        assert shown["managed_by"] == "api" and shown["definition"]["template"] == "eastron-sdm120"
        assert shown["account"] == "acme" and shown["link"] == "site-a"
        assert (await acme.get("/api/links/site-a")).body["meters"] == ["m1"]

        # New points, used from the next poll: only the new point comes.
        changed = await acme.call("PUT", "/api/meters/m1", VOLTS_ONLY)
        assert changed.status == 200, changed.body
        await eventually(lambda: volts_polled(acme), "a poll of the changed meter")
        assert (await acme.get("/api/meters/m1")).body["definition"]["point"][0]["name"] == "volts"

        await check_refusals(admin, acme, beta, str(config))

        gone = await acme.call("DELETE", "/api/links/site-a")
        assert gone.status == 200 and gone.body == {"deleted": "site-a", "meters": ["m1"]}
        assert dtu.center is not None
        await dtu.center.lost  # the center closed the DTU's connection
        assert (await acme.get("/api/links/site-a")).status == 404
        retired = (await acme.get("/api/meters/m1")).body
        assert retired["configured"] is False and retired["next_poll"] is None
        assert (await acme.get("/api/meters/m1/samples?limit=1")).body["samples"], "its samples stay"
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


async def volts_polled(api: ApiClient) -> bool:
    return only_volts(await latest_poll(api, "m1"))


async def check_refusals(admin: ApiClient, acme: ApiClient, beta: ApiClient, config: str) -> None:
    # The file's readers, with the file's messages.
    bad = await acme.post("/api/links", {"name": "x", "registration": "X-1", "timeout": "soon"})
    assert bad.status == 400 and bad.error.startswith("the body: ") and "timeout" in bad.error, bad.body
    bad = await acme.post("/api/meters", {**METER, "name": "m2", "template": "no-such-meter-model"})
    assert bad.status == 400 and "no-such-meter-model" in bad.error, bad.body
    bad = await acme.post("/api/meters", {**METER, "name": "m2", "link": "filed"})
    assert bad.status == 400 and bad.error == "meter 'm2': no link named 'filed'"  # not acme's link
    renamed = await acme.call("PUT", "/api/meters/m1", {**METER, "name": "m9"})
    assert renamed.status == 400

    # Names taken, and a registration the bridge cannot tell apart from site-a's: no row left behind.
    taken = await acme.post("/api/links", LINK)
    assert taken.status == 409 and taken.error == "a link named 'site-a' exists"
    clash = await acme.post("/api/links", {"name": "site-b", "registration": "DTU-00011"})
    assert clash.status == 409 and "cannot be told apart" in clash.error, clash.body
    assert (await acme.get("/api/links/site-b")).status == 404
    assert [link["name"] for link in (await admin.get("/api/links")).body["links"]] == ["filed", "site-a"]
    assert (await acme.post("/api/meters", METER)).status == 409

    # The file's link is the file's to change.
    for method, body in (("PUT", {"registration": "FILE-0002"}), ("DELETE", None)):
        answer = await admin.call(method, "/api/links/filed", body)
        assert answer.status == 409 and config in answer.error, answer.body

    # Another account's link and meter answer as unknown ones do.
    for method, path, body in (
        ("PUT", "/api/links/{}", {"registration": "BETA-1"}), ("DELETE", "/api/links/{}", None),
        ("PUT", "/api/meters/{}", VOLTS_ONLY), ("DELETE", "/api/meters/{}", None),
    ):
        known = "site-a" if "links" in path else "m1"
        seen = await beta.call(method, path.format(known), body)
        unknown = await beta.call(method, path.format("nobody"), body)
        assert (seen.status, unknown.status) == (404, 404), (method, path)
        assert seen.error == unknown.error.replace("'nobody'", f"'{known}'")
    # Nor may it create in acme's name, nor put a meter on acme's link.
    assert (await beta.post("/api/links", {**LINK, "name": "b", "account": "acme"})).status == 403
    assert (await beta.post("/api/meters", {**METER, "name": "b"})).status == 400
    # Ports, dials and serial devices of the center's host are the operator's.
    for transport in ({"listen": "tcp:0"}, {"connect": "tcp:host=192.0.2.1:port=502"}, {"serial": "/dev/ttyS0"}):
        refused = await acme.post("/api/links", {"name": "own-port", **transport})
        assert refused.status == 403 and "shared listener" in refused.error, refused.body
    # An admin may create in another account's name.
    made = await admin.post("/api/links", {"name": "for-beta", "registration": "BETA-0001", "account": "beta"})
    assert made.status == 201, made.body
    assert [link["name"] for link in (await beta.get("/api/links")).body["links"]] == ["for-beta"]
    # Replaced; then refused by the bridge, which leaves the row as it was.
    replaced = await beta.call("PUT", "/api/links/for-beta", {"registration": "BETA-0002", "heartbeat": "hb"})
    assert replaced.status == 200 and replaced.body["definition"]["heartbeat"] == "hb", replaced.body
    clash = await beta.call("PUT", "/api/links/for-beta", {"registration": "DTU-000"})
    assert clash.status == 409 and "cannot be told apart" in clash.error, clash.body
    kept = (await beta.get("/api/links/for-beta")).body
    assert kept["definition"] == {"name": "for-beta", "registration": "BETA-0002", "heartbeat": "hb"}
    assert kept["online"] is False and kept["kind"] == "shared"
    assert (await beta.call("DELETE", "/api/links/for-beta")).status == 200




@pytest.mark.expected_errors("Listener own-port cannot listen")
@pytest_twisted.ensureDeferred
async def test_a_link_whose_own_port_cannot_bind_is_refused_and_leaves_nothing(tmp_path: Path, db_url: str) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    busy = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
    center = await start_center(tmp_path, "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url)
    try:
        admin = center.api()
        refused = await admin.post("/api/links", {"name": "own-port", "listen": busy})
        assert refused.status == 409 and "cannot listen" in refused.error, refused.body
        assert (await admin.get("/api/links/own-port")).status == 404
        made = await admin.post("/api/links", {"name": "own-port", "listen": "tcp:0:interface=127.0.0.1"})
        assert made.status == 201, made.body
        moved = await admin.call("PUT", "/api/links/own-port", {"listen": busy})
        assert moved.status == 409 and "cannot listen" in moved.error, moved.body
        kept = (await admin.get("/api/links/own-port")).body
        assert kept["kind"] == "listen" and kept["definition"]["listen"] == "tcp:0:interface=127.0.0.1", kept
        assert "own-port" in [link["name"] for link in (await admin.get("/api/links")).body["links"]]
    finally:
        taken.close()
        await center.stop()
