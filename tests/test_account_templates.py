"""Accounts' own meter templates: written through /api/templates and the CLI, scoped, versioned,
and followed by the meters made from them, end to end over real sockets on SQLite and PostgreSQL;
and the schema revision that adds them, from a database of the revision before."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from alembic import command
from pymodbus.framer import FramerType
from sqlalchemy import inspect, text

from dtucenter import cli
from dtucenter.modbus.templates import TemplateCatalog, read_template
from dtucenter.store import schema
from dtucenter.store.db import open_engine
from tests.modbus.interop_support import FakeDtu, PymodbusServer
from tests.modbus.test_e2e_center import latest_poll
from tests.modbus.test_templates import SDM120_VALUES, sdm120
from tests.support import ApiClient, eventually, make_account, start_center
from tests.test_migrations import all_rows, column_names, load_previous_release

LINK = {"name": "site-a", "registration": "DTU-0001", "timeout": 1.0, "retries": 0}
#: acme's own model: the SDM120's voltage only, then (version 2) its current too.
VOLTS = {"name": "volts", "table": "input", "address": 0, "type": "float32", "unit": "V"}
AMPS = {"name": "amps", "table": "input", "address": 6, "type": "float32", "unit": "A"}
TEMPLATE: dict[str, Any] = {
    "name": "acme-meter", "version": 1, "description": "acme's meter, voltage only", "manufacturer": "Acme",
    "model": "A-120", "source": "the SDM120 register map, first register", "point": [VOLTS],
}
VERSION_2 = {**TEMPLATE, "version": 2, "description": "voltage and current", "point": [VOLTS, AMPS]}
METER = {"name": "m1", "link": "site-a", "unit": 1, "interval": 0.2, "template": "acme-meter"}


def without_name(template: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in template.items() if key != "name"}


async def polled(api: ApiClient, expected: dict[str, Any]) -> bool:
    return await latest_poll(api, "m1") == expected


@pytest_twisted.ensureDeferred
async def test_a_meter_follows_its_accounts_template_live(tmp_path: Path, db_url: str) -> None:
    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url)
    dtu = FakeDtu()
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        beta = await make_account(admin, "beta")
        made = await acme.post("/api/templates", TEMPLATE)
        assert made.status == 201, made.body
        assert (made.body["account"], made.body["version"], made.body["points"][0]["name"]) == ("acme", 1, "volts")
        assert (await acme.post("/api/links", LINK)).status == 201
        await dtu.start(await center.modbus_port(), bus.port)
        meter = await acme.post("/api/meters", METER)
        assert meter.status == 201, meter.body
        volts = {"volts": SDM120_VALUES["voltage"]}
        await eventually(lambda: polled(acme, volts), "a poll of the meter made from acme's template")

        # A new version: the meter's next poll reads the new points, and its row shows them.
        replaced = await acme.call("PUT", "/api/templates/acme-meter", without_name(VERSION_2))
        assert replaced.status == 200, replaced.body
        assert replaced.body["meters"] == ["m1"] and replaced.body["version"] == 2
        both = {**volts, "amps": SDM120_VALUES["current"]}
        await eventually(lambda: polled(acme, both), "a poll with the template's new points")
        shown = (await acme.get("/api/meters/m1")).body
        assert [point["name"] for point in shown["points"]] == ["volts", "amps"]
        assert shown["definition"]["template"] == "acme-meter"

        # The version must go up; a meter uses it, so it stays.
        again = await acme.call("PUT", "/api/templates/acme-meter", without_name(VERSION_2))
        assert (again.status, again.error) == (
            409, "template 'acme-meter' is at version 2: a replacement must raise the version"
        )
        used = await acme.call("DELETE", "/api/templates/acme-meter")
        assert used.status == 409 and "meters m1" in used.error, used.body
        # An admin's write of acme's meter resolves its template for acme, not for the admin.
        assert (await admin.call("PUT", "/api/meters/m1", METER)).status == 200
        assert [point["name"] for point in (await admin.get("/api/meters/m1")).body["points"]] == ["volts", "amps"]
        moved = await admin.call("PUT", "/api/meters/m1/account", {"account": "beta"})
        assert moved.status == 409 and "template 'acme-meter' of account 'acme'" in moved.error, moved.body

        await check_scoping(admin, acme, beta)
        await check_refusals(acme)

        # An admin writes acme's template by naming the account.
        by_admin = await admin.call("PUT", "/api/templates/acme-meter", {**without_name(VERSION_2), "version": 3,
                                                                         "account": "acme"})
        assert (by_admin.status, by_admin.body["account"], by_admin.body["meters"]) == (200, "acme", ["m1"])

        # Once no meter is made from it, it goes; the trail names each write and who made it.
        assert (await acme.call("DELETE", "/api/meters/m1")).status == 200
        gone = await acme.call("DELETE", "/api/templates/acme-meter")
        assert (gone.status, gone.body) == (200, {"deleted": "acme-meter"})
        assert (await acme.get("/api/templates/acme-meter")).status == 404
        edits = (await admin.get("/api/templates/acme-meter/edits?account=acme")).body["edits"]
        assert [(e["action"], e["version"], e["who"]) for e in edits] == [
            ("delete", 3, "acme/ops"), ("replace", 3, "admin/api-token"), ("replace", 2, "acme/ops"),
            ("create", 1, "acme/ops"),
        ]
        remade = await acme.post("/api/meters", {**METER, "name": "m2"})
        assert remade.status == 400 and "no template named 'acme-meter'" in remade.error
        # beta still has a template: the account is not removed until it is deleted.
        assert (await beta.post("/api/templates", {**TEMPLATE, "name": "beta-meter"})).status == 201
        assert (await beta.call("DELETE", "/api/links/b-site")).status == 200
        kept = await admin.call("DELETE", "/api/accounts/beta")
        assert (kept.status, kept.error) == (409, "account 'beta' still owns 1 meter templates: delete them first")
        assert (await beta.call("DELETE", "/api/templates/beta-meter")).status == 200
        assert (await admin.call("DELETE", "/api/accounts/beta")).status == 200
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()


async def check_scoping(admin: ApiClient, acme: ApiClient, beta: ApiClient) -> None:
    """Names are per account; another account's template is an unknown one, even to its meters."""
    def names(body: dict[str, Any]) -> list[tuple[str, str | None]]:
        return [(t["name"], t["account"]) for t in body["templates"]]

    shipped = [(name, None) for name, _ in names((await beta.get("/api/templates")).body)]
    assert ("eastron-sdm120", None) in shipped and len(shipped) == 3
    assert names((await acme.get("/api/templates")).body) == [*shipped, ("acme-meter", "acme")]
    assert names((await admin.get("/api/templates")).body) == [*shipped, ("acme-meter", "acme")]
    assert (await admin.get("/api/templates/acme-meter?account=acme")).body["version"] == 2
    for method, path, body in (
        ("GET", "/api/templates/{}", None), ("PUT", "/api/templates/{}", without_name(VERSION_2) | {"version": 3}),
        ("DELETE", "/api/templates/{}", None), ("GET", "/api/templates/{}/edits", None),
    ):
        seen, unknown = await beta.call(method, path.format("acme-meter"), body), await beta.call(
            method, path.format("nobodys"), body)
        assert (seen.status, unknown.status) == (404, 404), (method, path, seen.body)
        assert seen.error == unknown.error.replace("'nobodys'", "'acme-meter'")
    assert (await beta.get("/api/templates/acme-meter?account=acme")).status == 403
    # Its meters cannot name acme's template: the message lists only what beta may use.
    assert (await beta.post("/api/links", {**LINK, "name": "b-site", "registration": "BETA-1"})).status == 201
    refused = await beta.post("/api/meters", {**METER, "name": "b1", "link": "b-site"})
    assert refused.status == 400 and "no template named 'acme-meter'" in refused.error
    assert "acme" not in refused.error.replace("'acme-meter'", "")
    # The same name is beta's to take, as its own.
    mine = await beta.post("/api/templates", {**TEMPLATE, "description": "beta's"})
    assert mine.status == 201 and mine.body["account"] == "beta"
    assert (await acme.get("/api/templates/acme-meter")).body["description"] == VERSION_2["description"]
    assert (await beta.call("DELETE", "/api/templates/acme-meter")).status == 200
    assert (await acme.get("/api/templates/acme-meter")).status == 200


async def check_refusals(acme: ApiClient) -> None:
    """The template reader's messages, taken names, and the shipped templates read-only."""
    for change, message in (
        ({"point": [{**VOLTS, "type": "float99"}]}, 'the body: point "volts": type: must be one of'),
        ({"name": "Bad Name"}, "the body: name: must be lower-case letters, digits and dashes"),
        ({"point": []}, "the body: point: a template needs at least one [[point]]"),
        ({"colour": "red"}, "the body: colour: unknown key (a typo?)"),
        ({"version": 0}, "the body: version: must be between 1 and 1000000, got 0"),
    ):
        bad = await acme.post("/api/templates", {**TEMPLATE, "name": "other", **change})
        assert bad.status == 400 and bad.error.startswith(message), (change, bad.body)
    taken = await acme.post("/api/templates", TEMPLATE)
    assert (taken.status, taken.error) == (409, "a template named 'acme-meter' exists")
    shipped = await acme.post("/api/templates", {**TEMPLATE, "name": "eastron-sdm120"})
    assert shipped.status == 409 and "shipped with the center" in shipped.error
    for method in ("PUT", "DELETE"):
        answer = await acme.call(method, "/api/templates/eastron-sdm120", without_name(VERSION_2))
        assert answer.status == 409 and "shipped with the center" in answer.error, (method, answer.body)
    renamed = await acme.call("PUT", "/api/templates/acme-meter", {**VERSION_2, "name": "other", "version": 9})
    assert renamed.status == 400


def test_the_catalog_resolves_a_name_for_one_account_only() -> None:
    catalog = TemplateCatalog()
    own = read_template(TEMPLATE, "acme's")
    catalog.put(1, own)
    assert catalog.find(1, "acme-meter") is own
    assert catalog.finder(1)("eastron-sdm120") is catalog.shipped["eastron-sdm120"]
    with pytest.raises(LookupError) as unknown:
        catalog.find(2, "acme-meter")
    assert str(unknown.value) == f"no template named 'acme-meter' (templates: {', '.join(catalog.shipped)})"
    with pytest.raises(ValueError, match="shipped with the center"):
        catalog.put(1, catalog.shipped["eastron-sdm120"])
    catalog.remove(1, "acme-meter")
    assert catalog.own(1) == {}

    waiting = catalog.loaded()
    assert not waiting.called
    catalog.finish_loading()
    assert waiting.called and catalog.loaded().called


# -- offline, and from start -----------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


def template_file(path: Path, template: dict[str, Any]) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in template.items() if key != "point"]
    for point in template["point"]:
        lines += ["", "[[point]]", *(f"{key} = {json.dumps(value)}" for key, value in point.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest_twisted.ensureDeferred
async def test_templates_added_offline_are_used_from_the_next_start(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    open_engine(db_url).dispose()
    db = ("--db", db_url)
    assert run_cli("account", "add", "acme", *db)[0] == 0
    first = template_file(tmp_path / "acme-meter.toml", TEMPLATE)
    assert run_cli("template", "add", first, "--account", "acme", *db) == (
        0, "added template acme-meter (usable from the center's next start)\n")
    assert run_cli("template", "add", first, "--account", "acme", *db)[0] == 1
    assert "a replacement must raise the version" in capsys.readouterr().err
    assert run_cli("link", "add", json.dumps(LINK), "--account", "acme", *db)[0] == 0
    # The meter's template resolves against its account's: not the first admin's, which has none.
    assert run_cli("meter", "add", json.dumps(METER), *db)[0] == 1
    assert "no template named 'acme-meter'" in capsys.readouterr().err
    assert run_cli("meter", "add", json.dumps(METER), "--account", "acme", *db)[0] == 0
    second = template_file(tmp_path / "acme-meter-2.toml", VERSION_2)
    assert run_cli("template", "add", second, "--account", "acme", *db) == (0, (
        "replaced template acme-meter with version 2 and the points of m1 (polled so from the center's next start)\n"
    ))
    assert run_cli("template", "remove", "acme-meter", "--account", "acme", *db)[0] == 1
    assert "used by meters m1" in capsys.readouterr().err
    status, listed = run_cli("template", "list", "--json", "--account", "acme", *db)
    own = [(t["name"], t["version"], t["points"]) for t in json.loads(listed)["templates"] if t["account"] == "acme"]
    assert status == 0 and own == [("acme-meter", 2, 2)]
    status, listed = run_cli("template", "list", *db)
    assert status == 0 and "acme-meter\tversion 2\t2 points\taccount acme\tvoltage and current" in listed
    assert run_cli("template", "add", first.replace("acme-meter.toml", "nowhere.toml"), *db)[0] == 1

    bus = PymodbusServer([sdm120(1)], framer=FramerType.RTU).start()
    center = await start_center(tmp_path, "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url)
    dtu = FakeDtu()
    try:
        admin = center.api()

        async def scheduled() -> bool:  # the database's devices start once the file's are imported
            return (await admin.get("/api/meters/m1")).body.get("next_poll") is not None

        await eventually(scheduled, "the meter of the database scheduled")
        await dtu.start(await center.modbus_port(), bus.port)
        both = {"volts": SDM120_VALUES["voltage"], "amps": SDM120_VALUES["current"]}
        await eventually(lambda: polled(admin, both), "a poll of a meter made from a template stored offline")
        edits = (await admin.get("/api/templates/acme-meter/edits?account=acme")).body["edits"]
        assert [(e["action"], e["who"]) for e in edits] == [("replace", cli.CLI_WHO), ("create", cli.CLI_WHO)]
    finally:
        await dtu.stop()
        await center.stop()
        bus.stop()
    assert run_cli("meter", "remove", "m1", *db)[0] == 0
    assert run_cli("template", "remove", "acme-meter", "--account", "acme", *db) == (0, "removed template acme-meter\n")


def test_upgrade_from_the_devices_revision_keeps_every_row(db_url: str) -> None:
    """A database at 0004 with links and an API meter: the templates' revision adds tables only."""
    load_previous_release(db_url)
    engine = open_engine(db_url, create=False)
    try:
        with engine.connect() as connection:
            config = schema._config(connection)
            command.stamp(config, "0001")
            command.upgrade(config, "0004")
            connection.commit()
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO links (name, account_id, managed_by, definition, registration) "
                "VALUES ('site-a', 1, 'api', '{\"name\": \"site-a\", \"registration\": \"DTU-1\"}', :registration)"
            ), {"registration": b"DTU-1"})
            definition = {"name": "x", "link": "site-a", "unit": 1, "template": "eastron-sdm120"}
            connection.execute(text("UPDATE meters SET managed_by = 'api', definition = :definition"),
                               {"definition": json.dumps(definition)})
        before = all_rows(engine)
        assert before["links"] and before["meters"] and before["accounts"] and before["dtus"]
        columns = column_names(engine)

        schema.upgrade(engine)

        assert schema.current(engine).kind == "current"
        assert all_rows(engine, columns) == before
        assert {"meter_templates", "template_edits"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
