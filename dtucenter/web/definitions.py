"""Creating, replacing and deleting links and meters through the API: POST, PUT and DELETE on
/api/links[/{name}] and /api/meters[/{name}] (their GETs are the status views of ``meters``).

A body is the ``[[link]]`` or ``[[meter]]`` table of the config file as JSON, read by the
same reader with the same messages (400). Each write changes the row first, then the
running bridge; should the bridge refuse (a taken name, a registration that cannot be told
apart from another's, a ``scada_unit`` another meter answers under) the row is put back as
it was and the answer is 409. The config file's links and meters are the file's to change:
writing one answers 409 naming the file. Scoped like the rest: an account manages its own;
another account's answers 404 as an unknown one; an admin may name the owning ``account``
of what it creates.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from dtucenter.modbus.config import LinkSettings, MeterSettings
from dtucenter.modbus.poller import UnknownMeter
from dtucenter.modbus.service import LinkConflict, ModbusBridge, ScadaUnitTaken, UnknownLink
from dtucenter.modbus.templates import TemplateCatalog, TemplateFinder
from dtucenter.setting import ConfigError
from dtucenter.store import links as device_links
from dtucenter.store import meters as device_meters
from dtucenter.store import templates as device_templates
from dtucenter.store.facade import Store
from dtucenter.store.links import DeviceConflict
from dtucenter.store.recorder import MeterRecorder, link_spec, meter_spec
from dtucenter.web.meters import account_named
from dtucenter.web.router import ApiError, Call, Reply, Router

#: ``config.read_link_definition`` and ``read_meter_definition``, passed in: the config
#: module imports the API's names, so the API does not import it. A meter's template is
#: resolved by its account's ``TemplateCatalog.finder``.
LinkReader = Callable[[object, str], LinkSettings]
MeterReader = Callable[[object, str, TemplateFinder], MeterSettings]


def _answer(settings: LinkSettings | MeterSettings) -> dict[str, object]:
    """What a write answers: the definition as it reads back (keys at their defaults left out)."""
    return {"name": settings.name, "managed_by": "api", "definition": settings.table()}


async def body_and_owner(call: Call, store: Store, name: str | None) -> tuple[dict[str, Any], int, str]:
    """The object in the body and the account that is to own what it defines: the caller's
    unless an admin names another with ``account`` (popped), as its id and name; ``name`` from
    the path fills in or must match the body's."""
    call.query(())
    body = call.json_object()
    owner = body.pop("account", None)
    if name is not None and body.setdefault("name", name) != name:
        raise ApiError(400, f"name: a PUT cannot rename {name!r}; create {body['name']!r} and delete this one")
    if owner is None or owner == call.caller.account:
        return body, call.caller.account_id, call.caller.account
    call.require_admin()
    return body, await account_named(store, owner), str(owner)


async def write_or_refuse(recorder: MeterRecorder, job: Callable[[Session], Any]) -> Any:
    """Run ``job`` in a write transaction once the file's devices are in the database; its
    refusal (a ``DeviceConflict`` or ``ApiError`` raised before it changes anything) is
    returned from the database thread and raised here (409 for a conflict): raised there,
    it would fail the whole batch of writes it went in with."""

    def run(session: Session) -> Any:
        try:
            return job(session)
        except (DeviceConflict, ApiError) as e:
            return e

    await recorder.synced()
    result = await recorder.store.write(run)
    if isinstance(result, DeviceConflict):
        raise ApiError(409, str(result))
    if isinstance(result, ApiError):
        raise result
    return result


class DefinitionApi:
    def __init__(
        self, recorder: MeterRecorder, bridge: ModbusBridge | None, config_file: str, now: Callable[[], dt.datetime],
        read_link: LinkReader, read_meter: MeterReader, templates: TemplateCatalog,
    ) -> None:
        self.templates = templates
        self.read_link = read_link
        self.read_meter = read_meter
        self.recorder = recorder
        self.store = recorder.store
        self._bridge = bridge
        self.config_file = config_file
        self.now = now

    def install(self, router: Router) -> None:
        router.add("POST", "/api/links", self.create_link)
        router.add("PUT", "/api/links/{name}", self.replace_link)
        router.add("DELETE", "/api/links/{name}", self.delete_link)
        router.add("POST", "/api/meters", self.create_meter)
        router.add("PUT", "/api/meters/{name}", self.replace_meter)
        router.add("DELETE", "/api/meters/{name}", self.delete_meter)

    # -- shared steps -----------------------------------------------------------------------------

    @property
    def bridge(self) -> ModbusBridge:
        if self._bridge is None:
            raise ApiError(409, "the Modbus bridge is off: the center serves no links or meters")
        return self._bridge

    async def _body(self, call: Call, name: str | None) -> tuple[dict[str, Any], int]:
        body, owner, _ = await body_and_owner(call, self.store, name)
        return body, owner

    async def _write(self, job: Callable[[Session], Any]) -> Any:
        # Not before the center has served what the database held at start: a row written
        # earlier would be read there and served a second time.
        await self.templates.loaded()
        return await write_or_refuse(self.recorder, job)

    # -- links ------------------------------------------------------------------------------------

    def _link(self, call: Call, body: dict[str, Any]) -> LinkSettings:
        try:
            settings = self.read_link(body, "the body")
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        # A port of the center's own, a dial to any address or a serial device of the host are
        # the operator's to hand out; an account's DTUs dial the shared listener.
        if settings.kind != "shared" and not call.caller.admin:
            raise ApiError(403, f"only an admin account may make a {settings.kind} link; "
                                "an account's DTUs dial the shared listener with a registration")
        return settings

    async def create_link(self, call: Call) -> Reply:
        body, owner = await self._body(call, None)
        settings = self._link(call, body)
        bridge = self.bridge
        await self._write(partial(device_links.create_link, spec=link_spec(settings), account=owner, now=self.now()))
        try:
            bridge.add_link(settings)
            await self._listening(settings)
        except LinkConflict as e:
            await self.store.write(partial(device_links.delete_link, name=settings.name, account=None,
                                           config_file=self.config_file))
            raise ApiError(409, str(e)) from None
        return Reply(_answer(settings), 201)

    async def _listening(self, settings: LinkSettings) -> None:
        """A link with its own port is made only once the port is bound: a port in use (or a
        wrong interface) is the caller's 409 now, not a link that silently never accepts.
        Raises :class:`LinkConflict` after taking the link out of the bridge again."""
        if settings.kind != "listen":
            return
        try:
            await self.bridge.listening(settings.name)
        except Exception as e:
            await self.bridge.remove_link(settings.name)
            raise LinkConflict(f"link {settings.name!r} cannot listen on {settings.listen}: {e}") from None

    async def replace_link(self, call: Call, name: str) -> dict[str, object]:
        body, _ = await self._body(call, name)
        settings = self._link(call, body)
        bridge = self.bridge
        old = await self._write(partial(device_links.replace_link, spec=link_spec(settings), account=call.caller.scope,
                                        config_file=self.config_file, now=self.now()))
        if old is None:
            raise ApiError(404, f"no link {name!r}")
        try:
            if name in bridge.links:
                await bridge.update_link(settings)
            else:  # it could not be served at start; now it may
                bridge.add_link(settings)
            await self._listening(settings)
        except LinkConflict as e:
            previous = self.read_link(json.loads(old), f"database: link {name!r}")
            await self.store.write(partial(device_links.replace_link, spec=link_spec(previous), account=None,
                                           config_file=self.config_file, now=self.now()))
            if name not in bridge.links:  # taken out because its new port would not bind: serve the old one
                with suppress(LinkConflict):
                    bridge.add_link(previous)
            raise ApiError(409, str(e)) from None
        return _answer(settings)

    async def delete_link(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        bridge = self.bridge
        scope, config_file = call.caller.scope, self.config_file

        def job(session: Session) -> list[str] | None:
            if not device_links.delete_link(session, name, scope, config_file):
                return None
            return device_meters.retire_link_meters(session, name)

        retired = await self._write(job)
        if retired is None:
            raise ApiError(404, f"no link {name!r}")
        with suppress(UnknownLink):  # not served: it could not be at start
            await bridge.remove_link(name)
        return {"deleted": name, "meters": retired}

    # -- meters -----------------------------------------------------------------------------------

    def _meter(self, body: dict[str, Any], owner: int) -> tuple[MeterSettings, Callable[[Session], None]]:
        """The meter in the body, its template resolved for ``owner``, and a check for its write
        job that the account's template it was made from is still the one read here."""
        try:
            settings = self.read_meter(body, "the body", self.templates.finder(owner))
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        own = None if settings.template is None else self.templates.own(owner).get(settings.template)
        if own is None:
            return settings, lambda session: None
        return settings, partial(device_templates.check_current, account=owner, name=own.name, version=own.version)

    @staticmethod
    def _check_scada_unit(admin: bool, settings: MeterSettings, current: object) -> None:
        """The Modbus TCP server has no accounts: which meters it serves, to every client on the
        plant network, is the operator's to say. An account's PUT keeps what an admin set."""
        if not admin and settings.scada_unit != current:
            raise ApiError(403, "only an admin account may set or change a meter's scada_unit: the Modbus TCP "
                                "server for SCADA serves it to every client, whatever its account")

    @staticmethod
    def _check_link(session: Session, settings: MeterSettings, scope: int | None) -> None:
        """A meter goes on a link its account may use: the caller's own, or any for an admin."""
        if device_links.get_link(session, settings.link, scope) is None:
            raise ApiError(400, f"meter {settings.name!r}: no link named {settings.link!r}")

    async def create_meter(self, call: Call) -> Reply:
        body, owner = await self._body(call, None)
        await self.templates.loaded()
        settings, check_template = self._meter(body, owner)
        self._check_scada_unit(call.caller.admin, settings, None)
        bridge = self.bridge
        scope, spec, now = call.caller.scope, meter_spec(settings), self.now()

        def job(session: Session) -> bool:
            self._check_link(session, settings, scope)
            check_template(session)
            return device_meters.create_meter(session, spec, owner, now)

        created = await self._write(job)
        try:
            bridge.set_meter(settings)
        except (UnknownLink, ScadaUnitTaken) as e:
            await self.store.write(partial(device_meters.undo_create_meter, name=settings.name, created=created))
            raise ApiError(409, str(e)) from None
        return Reply(_answer(settings), 201)

    async def replace_meter(self, call: Call, name: str) -> dict[str, object]:
        body, _ = await self._body(call, name)
        scope = call.caller.scope
        # Its template is its owner's, which for an admin's call need not be the caller.
        owner = await self.store.read(partial(device_meters.meter_owner, name=name, account=scope))
        if owner is None:
            raise ApiError(404, f"no meter {name!r}")
        await self.templates.loaded()
        settings, check_template = self._meter(body, owner)
        bridge = self.bridge
        spec, config_file, admin = meter_spec(settings), self.config_file, call.caller.admin

        def job(session: Session) -> dict[str, Any] | None:
            current = device_meters.get_meter(session, name, scope)
            if current is None or device_meters.meter_owner(session, name, scope) != owner:
                return None
            self._check_scada_unit(admin, settings, (current.definition or {}).get("scada_unit"))
            self._check_link(session, settings, scope)
            check_template(session)
            return device_meters.replace_meter(session, spec, scope, config_file)

        old = await self._write(job)
        if old is None:
            raise ApiError(404, f"no meter {name!r}")
        try:
            bridge.set_meter(settings)
        except (UnknownLink, ScadaUnitTaken) as e:
            await self.store.write(partial(device_meters.replace_meter, spec=old, account=None,
                                           config_file=config_file))
            raise ApiError(409, str(e)) from None
        return _answer(settings)

    async def delete_meter(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        bridge = self.bridge
        deleted = await self._write(partial(device_meters.delete_meter, name=name, account=call.caller.scope,
                                            config_file=self.config_file))
        if not deleted:
            raise ApiError(404, f"no meter {name!r}")
        with suppress(UnknownMeter):  # not polled: its link could not be served
            bridge.remove_meter(name)
        return {"deleted": name}
