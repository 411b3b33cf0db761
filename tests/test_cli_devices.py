"""``dtucenter link|meter add|list|remove``: links and meters written offline, served from the next start."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import pytest_twisted

from dtucenter import cli
from dtucenter.store.db import open_engine
from tests.support import eventually, start_center

LINK = '{"name": "site-a", "registration": "DTU-0001", "heartbeat": "HB"}'
METER = '{"name": "m1", "link": "site-a", "unit": 1, "template": "eastron-sdm120"}'


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out), out.getvalue()


@pytest_twisted.ensureDeferred
async def test_links_and_meters_added_offline_are_served_at_the_next_start(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    open_engine(db_url).dispose()
    assert run("account", "add", "acme", "--db", db_url)[0] == 0
    assert run("link", "add", LINK, "--account", "acme", "--db", db_url) == (
        0, "added link site-a (served from the center's next start)\n")
    served_to_scada = METER.replace('"unit": 1', '"unit": 1, "scada_unit": 5')
    assert run("meter", "add", served_to_scada, "--account", "acme", "--db", db_url)[0] == 0
    listed = run("link", "list", "--json", "--db", db_url)[1]
    assert json.loads(listed) == {"links": [{"name": "site-a", "account": "acme", "managed_by": "api",
                                             "definition": json.loads(LINK)}]}
    table = run("meter", "list", "--account", "acme", "--db", db_url)[1]
    assert table.splitlines()[1].split()[:3] == ["m1", "acme", "api"]

    refusals = [
        (("link", "add", LINK), "a link named 'site-a' exists"),
        (("link", "add", '{"name": "x", "registration": "X", "timeout": "soon"}'),
         "the definition: link \"x\": timeout: must be a number, got 'soon'"),
        (("link", "add", "{nope"), "the definition is not JSON"),
        (("meter", "add", METER.replace("site-a", "nowhere").replace('"m1"', '"m2"')), "no link named 'nowhere'"),
        (("link", "add", LINK.replace("site-a", "s2"), "--account", "nobody"), "no account 'nobody'"),
        (("meter", "remove", "nobody"), "no meter 'nobody'"),
        (("meter", "add", served_to_scada.replace('"m1"', '"m2"')),
         "meter 'm2': scada_unit 5 is already the scada_unit of meter 'm1'"),
    ]
    for args, message in refusals:
        capsys.readouterr()
        assert run(*args, "--db", db_url)[0] == 1, args
        assert message in capsys.readouterr().err, args

    center = await start_center(tmp_path, "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url)
    try:
        api = center.api()

        async def served() -> dict[str, object] | None:
            link = (await api.get("/api/links/site-a")).body
            return link if link.get("meters") == ["m1"] else None

        # The database's links and meters start once the file's are imported, a moment after the API.
        link = await eventually(served, "the link and meter added offline, served")
        assert link["kind"] == "shared" and link["online"] is False
    finally:
        await center.stop()

    assert run("link", "remove", "site-a", "--db", db_url) == (
        0, "removed link site-a and its meters m1 (stopped at the center's next start)\n")
    assert json.loads(run("meter", "list", "--json", "--db", db_url)[1]) == {"meters": []}
    assert run("link", "remove", "site-a", "--db", db_url)[0] == 1


@pytest.mark.expected_errors("polled, but not served to SCADA")
@pytest_twisted.ensureDeferred
async def test_a_stored_meter_whose_scada_unit_the_file_took_is_polled_but_not_served(
    tmp_path: Path, db_url: str
) -> None:
    open_engine(db_url).dispose()
    assert run("link", "add", LINK, "--db", db_url)[0] == 0
    assert run("meter", "add", METER.replace('"unit": 1', '"unit": 1, "scada_unit": 5'), "--db", db_url)[0] == 0
    config = tmp_path / "center.toml"
    config.write_text(
        '[[link]]\nname = "filed"\nregistration = "FILE-0001"\n\n'
        '[[meter]]\nname = "fm"\nlink = "filed"\nunit = 1\nscada_unit = 5\ntemplate = "eastron-sdm120"\n'
    )
    center = await start_center(
        tmp_path, "--config", str(config), "--modbus", "tcp:0:interface=127.0.0.1", db_url=db_url
    )
    try:
        api = center.api()

        async def polled() -> bool:
            return bool((await api.get("/api/links/site-a")).body.get("meters") == ["m1"])

        await eventually(polled, "the stored meter polled")
        assert center.bridge.scada_meter(5).name == "fm"
        assert center.bridge.poller.settings_of("m1").scada_unit is None
    finally:
        await center.stop()
