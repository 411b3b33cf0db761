"""GET /api/templates: the shipped meter templates, through the real API."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from dtucenter.modbus.templates import shipped_templates
from tests.support import start_center


@pytest_twisted.ensureDeferred
async def test_the_shipped_templates_are_listed_and_shown(tmp_path: Path) -> None:
    center = await start_center(tmp_path)
    try:
        api = center.api()
        listing = (await api.get("/api/templates")).body["templates"]
        names = [template["name"] for template in listing]
        assert {"eastron-sdm120", "eastron-sdm630"} <= set(names)
        assert names == list(shipped_templates())
        sdm120 = next(template for template in listing if template["name"] == "eastron-sdm120")
        assert sdm120["points"] == len(shipped_templates()["eastron-sdm120"].points)

        shown = (await api.get("/api/templates/eastron-sdm120")).body
        voltage = next(point for point in shown["points"] if point["address"] == 0)
        assert (voltage["table"], voltage["type"], voltage["word_order"]) == ("input", "float32", "big")
        assert {k: v for k, v in shown.items() if k != "points"} == {k: v for k, v in sdm120.items() if k != "points"}
        assert len(shown["points"]) == sdm120["points"]

        missing = await api.get("/api/templates/no-such-meter")
        assert (missing.status, missing.error) == (404, "no template 'no-such-meter'")
    finally:
        await center.stop()
