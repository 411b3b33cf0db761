"""Accounts and their tokens: made and revoked through the API and the CLI, and every endpoint scoped to them."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from dtucenter import cli
from dtucenter.events import DtuOnline, MeterRead
from dtucenter.store import accounts, queries
from dtucenter.store.db import open_engine
from dtucenter.store.facade import METER_SAMPLES
from dtucenter.store.models import ApiToken
from dtucenter.web.router import Router
from tests.support import ApiClient, RunningCenter, eventually, make_account, open_events, start_center

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
#: The first account's DTU, meter and link: what the second account must never see.
PSN = 424242
METER = "acme-meter"
LINK = "acme-site"
#: A link acme made through the API: the link routes' known name.
API_LINK = "acme-api-site"
#: Ids nobody has: a scoped answer must be exactly the answer for these.
#: acme's alarm rule: its DTU offline.
ALARM_RULE = "acme-offline"
NO_PSN = 999_999
NO_METER = "no-such-meter"
NO_LINK = "no-such-link"

CONFIG = f"""
[modbus]
listen = "tcp:0:interface=127.0.0.1"

[[link]]
name = "{LINK}"
registration = "ACME-0001"

[[meter]]
name = "{METER}"
link = "{LINK}"
unit = 1
interval = 60

[[meter.point]]
name = "power"
table = "holding"
address = 0
"""


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


async def start(tmp_path: Path, db_url: str, *args: str) -> RunningCenter:
    config = tmp_path / "center.toml"
    config.write_text(CONFIG)
    return await start_center(tmp_path, "--config", str(config), *args, db_url=db_url)


# -- the store ----------------------------------------------------------------------------------------


def test_tokens_are_kept_as_digests_found_by_index_and_revoked(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            accounts.create_account(session, "acme", False, T0)
            token = accounts.create_token(session, "acme", "ops", T0)
            assert len(token) >= 43  # 256 random bits
            with pytest.raises(accounts.AccountConflict):
                accounts.create_token(session, "acme", "ops", T0)
        with Session(engine) as session, session.begin():
            stored = [tuple(row) for row in session.execute(text("SELECT * FROM api_tokens"))]
            assert not any(token in str(value) for row in stored for value in row), "the token itself is stored"
            assert session.scalar(select(ApiToken.digest)) == accounts.digest_of(token)
            owner = accounts.token_owner(session, token)
            assert owner is not None and (owner.account, owner.token_name, owner.admin) == ("acme", "ops", False)
            assert accounts.token_owner(session, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
            assert [t.name for t in accounts.list_tokens(session, "acme")] == ["ops"]
            accounts.revoke_token(session, "acme", "ops")
        with Session(engine) as session:
            assert accounts.token_owner(session, token) is None
    finally:
        engine.dispose()


def test_an_enrolled_dtu_goes_to_the_first_admin_account(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            accounts.create_account(session, "acme", False, T0)
            outcome = queries.authenticate(session, 7, 1, "HDTU", 1, "", "peer", T0, enroll_unknown=True)
            assert outcome.enrolled and outcome.record is not None
            assert outcome.record.account == accounts.FIRST_ADMIN
    finally:
        engine.dispose()


def test_an_account_that_owns_devices_or_is_the_last_admin_is_not_removed(db_url: str) -> None:
    engine = open_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            accounts.create_account(session, "acme", False, T0)
            queries.upsert_dtu(session, 5, {}, T0, accounts.account_id(session, "acme"))
            with pytest.raises(accounts.AccountConflict, match="still owns 1"):
                accounts.remove_account(session, "acme")
            with pytest.raises(accounts.AccountConflict, match="last admin"):
                accounts.remove_account(session, accounts.FIRST_ADMIN)
            queries.delete_dtu(session, 5)
            accounts.remove_account(session, "acme")
            assert [a.name for a in accounts.list_accounts(session)] == [accounts.FIRST_ADMIN]
    finally:
        engine.dispose()


# -- the API ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accounts_and_tokens_through_the_api(tmp_path: Path, db_url: str) -> None:
    center = await start(tmp_path, db_url)
    try:
        admin = center.api()
        acme = await make_account(admin, "acme")
        assert (await admin.post("/api/accounts", {"name": "acme"})).status == 409
        assert (await admin.post("/api/accounts", {"name": "bad/name"})).status == 400
        assert (await acme.post("/api/accounts", {"name": "mine"})).status == 403

        # An account sees itself only, manages its own tokens, and never reads a token back.
        listed = await acme.get("/api/accounts")
        assert [(a["name"], a["admin"]) for a in listed.body["accounts"]] == [("acme", False)]
        second = await acme.post("/api/accounts/acme/tokens", {"name": "ci"})
        assert second.status == 201
        tokens = await acme.get("/api/accounts/acme/tokens")
        assert [t["name"] for t in tokens.body["tokens"]] == ["ci", "ops"]
        assert second.body["token"] not in json.dumps(tokens.body) and acme.token not in json.dumps(tokens.body)
        assert (await acme.get(f"/api/accounts/{accounts.FIRST_ADMIN}/tokens")).status == 404

        # Revoked: the next request with it is refused.
        ci = ApiClient(admin.base, second.body["token"])
        assert (await ci.get("/api/dtus")).status == 200
        assert (await acme.call("DELETE", "/api/accounts/acme/tokens/ci")).status == 200
        assert (await ci.get("/api/dtus")).status == 401
        assert (await acme.call("DELETE", "/api/accounts/acme/tokens/ci")).status == 404

        # Admins create DTUs and give them to accounts; an account changes its own and creates none.
        made = await admin.call("PUT", f"/api/dtus/{PSN}", {"name": "pump", "account": "acme"})
        assert (made.status, made.body["account"]) == (201, "acme")
        assert (await acme.call("PUT", "/api/dtus/5", {"name": "squatter"})).status == 404
        assert (await acme.call("PUT", f"/api/dtus/{PSN}", {"account": "acme"})).status == 403
        assert (await admin.call("PUT", f"/api/dtus/{PSN}", {"account": "nobody"})).status == 400
        changed = await acme.call("PUT", f"/api/dtus/{PSN}", {"name": "pump 2", "password": 99})
        assert (changed.status, changed.body["name"]) == (200, "pump 2")
        assert [d["psn"] for d in (await acme.get("/api/dtus")).body["dtus"]] == [PSN]
        edits = (await acme.get(f"/api/dtus/{PSN}/edits")).body["edits"]
        assert [(e["action"], e["who"], e["fields"]) for e in edits] == [
            ("update", "acme/ops", {"name": "pump 2", "password": "(set)"}),
            ("create", f"{accounts.FIRST_ADMIN}/api-token", {"name": "pump", "account": "acme"}),
        ]

        # The command trail names the token too.
        offline = await acme.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 2}]})
        assert offline.status == 409
        trail = (await acme.get(f"/api/dtus/{PSN}/commands")).body["commands"]
        assert [c["who"] for c in trail] == ["acme/ops"]

        # Moved to another account, it is gone for the first.
        await make_account(admin, "beta")
        moved = await admin.call("PUT", f"/api/dtus/{PSN}", {"account": "beta"})
        assert moved.body["account"] == "beta"
        assert (await acme.get(f"/api/dtus/{PSN}")).status == 404
        assert (await admin.call("DELETE", "/api/accounts/beta")).status == 409  # it owns a DTU
        assert (await acme.call("DELETE", "/api/accounts/acme")).status == 403

        # A meter from the config file starts as the admin's, and an admin gives it away.
        meter = (await admin.get(f"/api/meters/{METER}")).body
        assert meter["account"] == accounts.FIRST_ADMIN
        assert (await acme.get(f"/api/meters/{METER}")).status == 404
        given = await admin.call("PUT", f"/api/meters/{METER}/account", {"account": "acme"})
        assert (given.status, given.body["account"]) == (200, "acme")
        assert [m["name"] for m in (await acme.get("/api/meters")).body["meters"]] == [METER]
    finally:
        await center.stop()


# -- every endpoint, as another account ------------------------------------------------------------------

#: Per endpoint: a body that gets past validation, and what another account gets. A new endpoint fails
#: the walk until it is listed here, so none can be added without saying how it is scoped.
#: "404": exactly what the same request about a device that does not exist gets. "403": admins only.
#: "200": its own (empty) view, in which nothing of the first account's may appear.
#: acme's own meter template.
TEMPLATE: dict[str, Any] = {
    "name": "acme-model", "version": 1, "description": "acme's meter", "manufacturer": "Acme", "model": "A-1",
    "source": "acme's register map", "point": [{"name": "power", "table": "holding", "address": 0, "type": "int16"}],
}

ENDPOINTS: dict[tuple[str, str], tuple[Any, str]] = {
    ("GET", "/api/status"): (None, "200"),
    ("GET", "/metrics"): (None, "403"),
    ("GET", "/api/accounts"): (None, "200"),
    ("POST", "/api/accounts"): ({"name": "another"}, "403"),
    ("GET", "/api/accounts/{name}"): (None, "404"),
    ("DELETE", "/api/accounts/{name}"): (None, "404"),
    ("GET", "/api/accounts/{name}/tokens"): (None, "404"),
    ("POST", "/api/accounts/{name}/tokens"): ({"name": "stolen"}, "404"),
    ("DELETE", "/api/accounts/{name}/tokens/{token_name}"): (None, "404"),
    ("GET", "/api/dtus"): (None, "200"),
    ("GET", "/api/dtus/{psn}"): (None, "404"),
    ("PUT", "/api/dtus/{psn}"): ({"name": "mine now"}, "404"),
    ("DELETE", "/api/dtus/{psn}"): (None, "404"),
    ("GET", "/api/dtus/{psn}/samples"): (None, "404"),
    ("GET", "/api/dtus/{psn}/latest"): (None, "404"),
    ("GET", "/api/dtus/{psn}/setup"): (None, "404"),
    ("POST", "/api/dtus/{psn}/setup"): ({"send_test_time": 5, "registers": [{"dev": 1, "addr": 2}]}, "404"),
    ("POST", "/api/dtus/{psn}/read"): ({"registers": [{"dev": 1, "addr": 2}]}, "404"),
    ("POST", "/api/dtus/{psn}/write"): ({"registers": [{"dev": 1, "addr": 2, "value": 3}]}, "404"),
    ("GET", "/api/dtus/{psn}/commands"): (None, "404"),
    ("GET", "/api/dtus/{psn}/edits"): (None, "404"),
    ("GET", "/api/meters"): (None, "200"),
    ("GET", "/api/meters/{name}"): (None, "404"),
    ("GET", "/api/meters/{name}/samples"): (None, "404"),
    ("GET", "/api/meters/{name}/latest"): (None, "404"),
    ("GET", "/api/latest"): (None, "200"),
    ("GET", "/api/meters/{name}/failures"): (None, "404"),
    ("POST", "/api/meters/{name}/write"): ({"point": "power", "value": 1}, "404"),
    ("GET", "/api/meters/{name}/writes"): (None, "404"),
    ("POST", "/api/meters/{name}/read"): ({"points": ["power"]}, "404"),
    ("GET", "/api/meters/{name}/reads"): (None, "404"),
    ("PUT", "/api/meters/{name}/account"): ({"account": "beta"}, "403"),
    ("GET", "/api/links"): (None, "200"),
    ("GET", "/api/links/{name}"): (None, "404"),
    ("POST", "/api/links"): ({"name": "theirs", "registration": "T-1", "account": "acme"}, "403"),
    ("PUT", "/api/links/{name}"): ({"registration": "BETA-0001"}, "404"),
    ("DELETE", "/api/links/{name}"): (None, "404"),
    ("POST", "/api/meters"): ({"name": "theirs", "link": API_LINK, "unit": 1, "account": "acme",
                               "template": "eastron-sdm120"}, "403"),
    ("PUT", "/api/meters/{name}"): ({"link": API_LINK, "unit": 2, "template": "eastron-sdm120"}, "404"),
    ("DELETE", "/api/meters/{name}"): (None, "404"),
    ("POST", "/api/links/{name}/raw"): ({"hex": "010300000001840a"}, "403"),
    ("GET", "/api/links/{name}/raw"): (None, "403"),
    # Pending devices are nobody's until adopted: an account finds one by its exact registration
    # only (no listing), adopts it into itself, and cannot drop one (tests/modbus/test_e2e_discovery.py).
    ("GET", "/api/pending"): (None, "200"),
    ("POST", "/api/pending/{id}/adopt"): ({"template": "eastron-sdm120"}, "404"),
    ("DELETE", "/api/pending/{id}"): (None, "403"),
    # The shipped templates are the same for every account (tests/test_templates_api.py); acme's own are acme's.
    ("GET", "/api/templates"): (None, "200"),
    ("GET", "/api/templates/{name}"): (None, "404"),
    ("POST", "/api/templates"): ({**TEMPLATE, "name": "theirs", "account": "acme"}, "403"),
    ("PUT", "/api/templates/{name}"): ({**{k: v for k, v in TEMPLATE.items() if k != "name"}, "version": 2}, "404"),
    ("DELETE", "/api/templates/{name}"): (None, "404"),
    ("GET", "/api/templates/{name}/edits"): (None, "404"),
    # Alarms: acme's rules, alarms and webhook are acme's; a rule on acme's devices is refused as on unknown ones.
    ("GET", "/api/alarms"): (None, "200"),
    ("GET", "/api/alarms/rules"): (None, "200"),
    ("POST", "/api/alarms/rules"): ({"name": "theirs", "meter": METER, "point": "power", "above": 1}, "404"),
    ("GET", "/api/alarms/rules/{name}"): (None, "404"),
    ("PUT", "/api/alarms/rules/{name}"): ({"dtu": PSN, "offline": 5}, "404"),
    ("DELETE", "/api/alarms/rules/{name}"): (None, "404"),
    ("GET", "/api/alarms/webhook"): (None, "200"),
    ("PUT", "/api/alarms/webhook"): ({"url": "http://127.0.0.1:9/beta"}, "200"),
    ("DELETE", "/api/alarms/webhook"): (None, "404"),
    # The console: its own session, its own events (a stream: its first events are checked), charts and exports.
    ("GET", "/api/session"): (None, "200"),
    ("POST", "/api/session"): (None, "201"),
    ("DELETE", "/api/session"): (None, "200"),
    ("GET", "/api/events"): (None, "stream"),
    ("GET", "/api/dtus/{psn}/chart"): (None, "404"),
    ("GET", "/api/dtus/{psn}/export"): (None, "404"),
    ("GET", "/api/meters/{name}/chart"): (None, "404"),
    ("GET", "/api/meters/{name}/export"): (None, "404"),
}


def fill(pattern: str, known: bool) -> str:
    """The path of ``pattern`` about the first account's things, or about things nobody has."""
    ids = {
        "psn": str(PSN if known else NO_PSN), "token_name": "ops" if known else "nobodys",
        "id": "guessed-pending-id" if known else "another-guessed-id",
        "name": ("acme" if known else "nobody") if pattern.startswith("/api/accounts") else
                (TEMPLATE["name"] if known else "nobodys-model") if pattern.startswith("/api/templates") else
                (ALARM_RULE if known else "nobodys-rule") if pattern.startswith("/api/alarms") else
                (METER if known else NO_METER) if pattern.startswith("/api/meters") else
                (API_LINK if known else NO_LINK),
    }
    for key, value in ids.items():
        pattern = pattern.replace("{" + key + "}", value)
    return pattern


async def acme_fleet(center: RunningCenter, admin: ApiClient) -> ApiClient:
    """Account acme with a DTU, its samples, commands and edits, and a meter with samples, failures, writes
    and reads on demand."""
    acme = await make_account(admin, "acme")
    assert (await admin.call("PUT", f"/api/dtus/{PSN}", {"name": "pump", "account": "acme"})).status == 201
    assert (await admin.call("PUT", f"/api/meters/{METER}/account", {"account": "acme"})).status == 200
    assert (await acme.post("/api/links", {"name": API_LINK, "registration": "ACME-0002"})).status == 201
    values = struct.pack(">hh", 1111, -2222)
    await center.store.add_samples([(PSN, T0, 1, values, None)])
    await center.store.add_rows(METER_SAMPLES, [(METER, "power", T0, 3333.0)])
    assert (await acme.post(f"/api/dtus/{PSN}/read", {"registers": [{"dev": 1, "addr": 2}]})).status == 409
    assert (await acme.post(f"/api/meters/{METER}/write", {"point": "power", "value": 1})).status == 409
    assert (await acme.post(f"/api/meters/{METER}/read", {"points": ["power"]})).status == 409
    assert (await acme.call("PUT", f"/api/dtus/{PSN}", {"name": "pump 2"})).status == 200
    assert (await acme.post("/api/templates", TEMPLATE)).status == 201
    rule = {"name": ALARM_RULE, "dtu": PSN, "offline": 0.01, "webhook": "http://127.0.0.1:9/acme"}
    assert (await acme.post("/api/alarms/rules", rule)).status == 201
    assert (await acme.call("PUT", "/api/alarms/webhook", {"url": "http://127.0.0.1:9/acme-all"})).status == 200
    await eventually(lambda: alarm_of(acme), "acme's DTU offline alarm")
    return acme


async def alarm_of(client: ApiClient) -> Any:
    return (await client.get("/api/alarms?active=1")).body["alarms"]


@pytest_twisted.ensureDeferred
async def test_every_endpoint_hides_another_accounts_devices(tmp_path: Path, db_url: str) -> None:
    center = await start(tmp_path, db_url)
    try:
        admin = center.api()
        acme = await acme_fleet(center, admin)
        beta = await make_account(admin, "beta")
        router: Router = center.service.getServiceNamed("api").factory.resource  # type: ignore[attr-defined]
        routes = {(route.method, "/" + "/".join(route.segments)) for route in router.routes}
        assert routes == set(ENDPOINTS), "list every endpoint in ENDPOINTS, with how it is scoped"
        before = {path: (await acme.get(path)).body for path in (
            f"/api/dtus/{PSN}/samples", f"/api/dtus/{PSN}/commands", f"/api/dtus/{PSN}/edits",
            f"/api/meters/{METER}/samples", f"/api/meters/{METER}/writes", f"/api/meters/{METER}/reads",
            "/api/accounts/acme/tokens", f"/api/templates/{TEMPLATE['name']}",
            f"/api/templates/{TEMPLATE['name']}/edits", f"/api/alarms/rules/{ALARM_RULE}", "/api/alarms",
            "/api/alarms/webhook",
        )}
        secrets = ("acme", str(PSN), METER, LINK, API_LINK, "ACME-0002", "1111", "-2222", "3333", "pump", "ACME-0001",
                   TEMPLATE["name"])

        for (method, pattern), (body, expected) in sorted(ENDPOINTS.items()):
            where = f"{method} {pattern}"
            if expected == "stream":
                # With acme's DTU, meter and link watched: none of it may come, not even a status event.
                stream = await open_events(center, beta.token, f"dtu:{PSN},meter:{METER},link:{API_LINK}")
                try:
                    # Told to the live feed alone: the alarms and metrics listening to the hub must not hear them.
                    feed = center.service.getServiceNamed("live")
                    feed._hear(DtuOnline(PSN, "127.0.0.1:1", T0))  # type: ignore[attr-defined]
                    feed._hear(MeterRead(METER, T0, {"power": 3333.0}))  # type: ignore[attr-defined]
                    # A summary written after them: once it is here, so would they be.
                    feed._summarize()  # type: ignore[attr-defined]
                    await stream.until(lambda text: text.count("event: summary") >= 2)
                    assert not [s for s in secrets if s in stream.text], (where, stream.text)
                finally:
                    stream.close()
                continue
            seen = await beta.call(method, fill(pattern, known=True), body)
            if expected == "404":
                nobody = await beta.call(method, fill(pattern, known=False), body)
                assert seen.status == 404, (where, seen.body)
                assert nobody.status == 404, (where, nobody.body)
                same = nobody.error
                for unknown, known in zip(fill(pattern, False).split("/"), fill(pattern, True).split("/"), strict=True):
                    same = same.replace(f"'{unknown}'", f"'{known}'").replace(f" {unknown}", f" {known}")
                assert seen.error == same, where
            elif expected == "403":
                assert seen.status == 403, (where, seen.body)
            else:
                assert seen.status == int(expected), (where, seen.body)
                text_seen = json.dumps(seen.body)
                assert not [s for s in secrets if s in text_seen], (where, seen.body)

        # Nothing of acme's changed, and no command went out in its DTU's name.
        after = {path: (await acme.get(path)).body for path in before}
        assert after == before
        assert (await acme.get(f"/api/meters/{METER}")).body["account"] == "acme"
        assert (await acme.get(f"/api/dtus/{PSN}")).body["name"] == "pump 2"
    finally:
        await center.stop()


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accounts_and_tokens_offline_with_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'center.db'}"
    open_engine(url).dispose()
    assert run_cli("account", "add", "acme", "--db", url) == (0, "added account acme\n")
    assert run_cli("account", "add", "acme", "--db", url)[0] == 1
    assert "account 'acme' exists" in capsys.readouterr().err
    assert run_cli("dtu", "add", "77", "--account", "acme", "--db", url) == (0, "added DTU 77\n")
    status, token = run_cli("token", "add", "acme", "ops", "--db", url)
    assert status == 0 and len(token.strip()) >= 43 and "\n" not in token.strip()
    assert "shown this once" in capsys.readouterr().err
    status, listed = run_cli("token", "list", "acme", "--json", "--db", url)
    assert [t["name"] for t in json.loads(listed)["tokens"]] == ["ops"] and token.strip() not in listed
    status, table = run_cli("account", "list", "--db", url)
    assert table.splitlines()[1:] == [
        "acme   no     1     0       1", f"{accounts.FIRST_ADMIN}  yes    0     0       0",
    ]

    # The token made offline opens the running center's API, scoped to its account.
    center = await start_center(tmp_path)
    try:
        acme = center.api(token.strip())
        assert [d["psn"] for d in (await acme.get("/api/dtus")).body["dtus"]] == [77]
        assert run_cli("token", "revoke", "acme", "ops", "--db", url) == (0, "revoked token ops of account acme\n")
        assert (await acme.get("/api/dtus")).status == 401
    finally:
        await center.stop()
    assert run_cli("account", "remove", "acme", "--db", url)[0] == 1
    assert "still owns 1" in capsys.readouterr().err
    assert run_cli("dtu", "remove", "77", "--db", url)[0] == 0
    assert run_cli("account", "remove", "acme", "--db", url) == (0, "removed account acme\n")
