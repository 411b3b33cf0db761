"""/api/templates: the meter templates a meter can be made from, and accounts' own.

The templates shipped with the center (``dtucenter/modbus/templates/``) are the same for
every account and read-only. An account adds, replaces and deletes its own: the body is
the template file's keys as JSON, read by the same reader with the same messages (400).
Names are per account, and a shipped template's name cannot be taken. Another account's
template answers 404 as an unknown one does; an admin sees every account's and names the
account it means with ``account`` (in the body, or ``?account=`` where there is none).

A replacement must raise the version (409 otherwise). The meters made from the template
follow it: their points are replaced in the same transaction, and the bridge polls them
with the new points from their next poll. Each is read again by the meter reader with the
new template; should one fail it, the replacement is refused whole (409, naming it).
Deleting a template that meters are made from is refused (409, naming them).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any

from dtucenter.modbus.config import MeterSettings
from dtucenter.modbus.service import ModbusBridge, UnknownLink
from dtucenter.modbus.templates import Template, TemplateCatalog, TemplateFinder, read_template
from dtucenter.setting import ConfigError
from dtucenter.store import templates as stored
from dtucenter.store.recorder import MeterRecorder, meter_spec, point_spec
from dtucenter.web.definitions import MeterReader, body_and_owner, write_or_refuse
from dtucenter.web.meters import DEFAULT_HISTORY, MAX_HISTORY, account_meant
from dtucenter.web.params import limit_param
from dtucenter.web.router import ApiError, Call, Reply, Router


def template_json(template: Template, account: str | None) -> dict[str, Any]:
    """A template as the API shows one: ``account`` is None for a shipped one."""
    return {**template.summary(), "account": account, "points": [point_spec(point) for point in template.points]}


class TemplateApi:
    def __init__(
        self, recorder: MeterRecorder, bridge: ModbusBridge | None, catalog: TemplateCatalog,
        read_meter: MeterReader, now: Callable[[], dt.datetime],
    ) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.bridge = bridge
        self.catalog = catalog
        self.read_meter = read_meter
        self.now = now

    def install(self, router: Router) -> None:
        router.add("GET", "/api/templates", self.list_templates)
        router.add("POST", "/api/templates", self.create_template)
        router.add("GET", "/api/templates/{name}", self.get_template)
        router.add("PUT", "/api/templates/{name}", self.replace_template)
        router.add("DELETE", "/api/templates/{name}", self.delete_template)
        router.add("GET", "/api/templates/{name}/edits", self.edits)

    # -- shared steps -----------------------------------------------------------------------------

    def _parsed(self, row: stored.TemplateRow) -> Template:
        """A stored template: as loaded (or written since), or read from its row (one the CLI
        added after the start, which meters can use from the next start)."""
        loaded = self.catalog.own(row.account_id).get(row.name)
        if loaded is not None and loaded.version == row.version:
            return loaded
        return read_template(json.loads(row.document), f"database: template {row.name!r}")

    def _read(self, body: dict[str, Any]) -> Template:
        try:
            template = read_template(body, "the body")
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        if template.name in self.catalog.shipped:
            raise ApiError(409, f"template {template.name!r} is shipped with the center; choose another name")
        return template

    def _refuse_shipped(self, name: str) -> None:
        if name in self.catalog.shipped:
            raise ApiError(409, f"template {name!r} is shipped with the center and cannot be changed; "
                                "copy it under another name")

    # -- reading ----------------------------------------------------------------------------------

    async def list_templates(self, call: Call) -> Any:
        call.query(())
        rows = await self.store.read(partial(stored.list_templates, account=call.caller.scope))
        shipped = [{**template.summary(), "account": None} for template in self.catalog.shipped.values()]
        own = [{**self._parsed(row).summary(), "account": row.account} for row in rows]
        return {"templates": shipped + own}

    async def get_template(self, call: Call, name: str) -> Any:
        account_id, account = await account_meant(call, self.store, call.query(("account",)).get("account"))
        row = await self.store.read(partial(stored.get_template, account=account_id, name=name))
        if row is not None:
            return template_json(self._parsed(row), account)
        if name in self.catalog.shipped:
            return template_json(self.catalog.shipped[name], None)
        raise ApiError(404, f"no template {name!r}")

    async def edits(self, call: Call, name: str) -> Any:
        params = call.query(("account", "limit"))
        limit = limit_param(params, DEFAULT_HISTORY, MAX_HISTORY)
        account_id, account = await account_meant(call, self.store, params.get("account"))
        edits = await self.store.read(partial(stored.list_edits, account=account, name=name, limit=limit))
        if not edits and await self.store.read(partial(stored.get_template, account=account_id, name=name)) is None:
            raise ApiError(404, f"no template {name!r}")
        return {"edits": [edit.to_json() for edit in edits]}

    # -- writing ----------------------------------------------------------------------------------

    async def create_template(self, call: Call) -> Reply:
        body, account_id, account = await body_and_owner(call, self.store, None)
        template = self._read(body)
        await self.catalog.loaded()
        await write_or_refuse(self.recorder, partial(
            stored.create_template, account=account_id, name=template.name, version=template.version,
            document=json.dumps(body), who=call.who, now=self.now(),
        ))
        self.catalog.put(account_id, template)
        return Reply(template_json(template, account), 201)

    async def replace_template(self, call: Call, name: str) -> Any:
        self._refuse_shipped(name)
        body, account_id, account = await body_and_owner(call, self.store, name)
        template = self._read(body)
        await self.catalog.loaded()
        users = await self.store.read(partial(stored.meters_using, account=account_id, name=name))
        meters = [self._remade(meter, definition, self._finder(account_id, template)) for meter, definition in users]
        found = await write_or_refuse(self.recorder, partial(
            stored.replace_template, account=account_id, name=name, version=template.version,
            document=json.dumps(body), who=call.who, now=self.now(),
            meter_points={meter.name: meter_spec(meter)["points"] for meter in meters},
        ))
        if not found:
            raise ApiError(404, f"no template {name!r}")
        self.catalog.put(account_id, template)
        if self.bridge is not None:
            for meter in meters:
                with suppress(UnknownLink):  # not polled: its link could not be served
                    self.bridge.set_meter(meter)
        return {**template_json(template, account), "meters": [meter.name for meter in meters]}

    def _finder(self, account: int, replacement: Template) -> TemplateFinder:
        """The account's templates with ``replacement`` in place of its namesake."""
        find = self.catalog.finder(account)
        return lambda name: replacement if name == replacement.name else find(name)

    def _remade(self, meter: str, definition: str, find: TemplateFinder) -> MeterSettings:
        try:
            return self.read_meter(json.loads(definition), f"meter {meter!r}", find)
        except ConfigError as e:
            raise ApiError(409, f"the new points do not fit a meter made from the template: {e}") from None

    async def delete_template(self, call: Call, name: str) -> Any:
        self._refuse_shipped(name)
        account_id, _ = await account_meant(call, self.store, call.query(("account",)).get("account"))
        await self.catalog.loaded()
        found = await write_or_refuse(self.recorder, partial(
            stored.delete_template, account=account_id, name=name, who=call.who, now=self.now(),
        ))
        if not found:
            raise ApiError(404, f"no template {name!r}")
        self.catalog.remove(account_id, name)
        return {"deleted": name}
