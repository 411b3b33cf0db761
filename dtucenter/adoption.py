"""Adopting an unknown device: one step for the API, the rules and the ``adopt:`` policy.

A Modbus registration becomes a link named after it (``registration_name``) with, given a
template, one meter of the same name; both are made exactly as ``POST /api/links`` and
``POST /api/meters`` make them (the same readers, rows and bridge calls), in one
transaction with the pending row's removal and the audit record, then served: the bridge's
``add_link`` hands the device's held connection to the new link, so the DTU is polled
with no reconnect. A binary-protocol DTU (its PSN) becomes a DTU record in the account,
and its held login is answered (dtu/center.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import attrs
from sqlalchemy.orm import Session
from twisted.internet import defer
from twisted.logger import Logger

from dtucenter.discovery import DTU, MODBUS, PendingBook, PendingDevice, utc
from dtucenter.modbus.config import LinkSettings, MeterSettings
from dtucenter.modbus.filter import encode_packet_option
from dtucenter.modbus.rules import Adoption, registration_name
from dtucenter.modbus.service import LinkConflict, ModbusBridge
from dtucenter.modbus.templates import TemplateCatalog, TemplateFinder
from dtucenter.setting import ConfigError
from dtucenter.store import accounts
from dtucenter.store import links as device_links
from dtucenter.store import meters as device_meters
from dtucenter.store import pending as pending_rows
from dtucenter.store import templates as device_templates
from dtucenter.store.facade import Store
from dtucenter.store.links import DeviceConflict
from dtucenter.store.recorder import link_spec, meter_spec

log = Logger()

LinkReader = Callable[[object, str], LinkSettings]
MeterReader = Callable[[object, str, TemplateFinder], MeterSettings]
#: Enrols an adopted binary-protocol DTU: (session, psn, account id, now); the DTU half's store does it.
DtuEnroller = Callable[[Session, int, int, dt.datetime], None]
#: Answers the held login of an adopted binary-protocol DTU, by PSN.
DtuReleaser = Callable[[int], None]


class AdoptionRefused(Exception):
    """Why a device cannot be adopted as asked; ``status`` is the API's answer for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Adopted:
    link: str
    meter: str | None
    account: str

    def as_json(self) -> dict[str, object]:
        return {"link": self.link, "meter": self.meter, "account": self.account}


class Adopter:
    """Makes adopted devices' links, meters (or DTU records) and serves them."""

    def __init__(
        self, store: Store, bridge: ModbusBridge | None, book: PendingBook | None, now: Callable[[], dt.datetime],
        read_link: LinkReader, read_meter: MeterReader, synced: Callable[[], defer.Deferred[None]],
        templates: TemplateCatalog, enrol_dtu: DtuEnroller | None = None, release_dtu: DtuReleaser | None = None,
    ) -> None:
        self.store = store
        self.bridge = bridge
        self.book = book
        self.now = now
        self.read_link = read_link
        self.read_meter = read_meter
        self.synced = synced
        self.templates = templates
        self.enrol_dtu = enrol_dtu
        self.release_dtu = release_dtu

    # -- the bridge's Adopter: rules and the adopt: policy, on first contact --------------------

    def adopt_registration(self, registration: bytes, adoption: Adoption, why: str) -> defer.Deferred[None]:
        async def run() -> None:
            adopted = await self.adopt(
                MODBUS, registration, None, account=adoption.account, template=adoption.template,
                unit=adoption.unit, interval=adoption.interval, link_keys={"protocol": adoption.protocol},
                who=why,
            )
            log.info("Adopted {registration!r} as link {link} of account {account} ({why})",
                     registration=registration, link=adopted.link, account=adopted.account, why=why)

        return defer.ensureDeferred(run())

    # -- one adoption ---------------------------------------------------------------------------

    async def adopt_pending(self, device: PendingDevice, *, account: str | None, template: str | None,
                            unit: int, interval: float, link_keys: Mapping[str, Any], who: str) -> Adopted:
        return await self.adopt(device.kind, device.registration, device.id, account=account, template=template,
                                unit=unit, interval=interval, link_keys=link_keys, who=who)

    async def adopt(
        self, kind: str, registration: bytes, pending_id: str | None, *, account: str | None,
        template: str | None, unit: int, interval: float, link_keys: Mapping[str, Any], who: str,
    ) -> Adopted:
        if kind == DTU:
            return await self._adopt_dtu(registration, pending_id, account, who)
        bridge = self.bridge
        if bridge is None:
            raise AdoptionRefused(409, "the Modbus bridge is off: the center serves no links")
        owner = await self.store.read(partial(_owner_or_refusal, account=account))
        if isinstance(owner, AdoptionRefused):
            raise owner
        await self.templates.loaded()
        link, meter = definitions(
            registration, template, unit, interval, link_keys, self.read_link, self.read_meter,
            self.templates.finder(owner),
        )
        own = None if meter is None or meter.template is None else self.templates.own(owner).get(meter.template)
        name = link.name
        now = self.now()

        def job(session: Session) -> tuple[str, bool] | AdoptionRefused:
            try:
                if own is not None:  # the account's template read above is still the one stored
                    device_templates.check_current(session, owner, own.name, own.version)
                return record_link_adoption(session, link, meter, owner, pending_id, who, now)
            except AdoptionRefused as e:
                return e
            except DeviceConflict as e:
                return AdoptionRefused(409, str(e))

        outcome = await self._write(job)
        owner_name, created = outcome
        try:
            bridge.add_link(link)
            if meter is not None:
                bridge.set_meter(meter)
        except (LinkConflict, LookupError) as e:
            def undo(session: Session) -> None:
                device_links.delete_link(session, name, None, "")
                if meter is not None:
                    device_meters.undo_create_meter(session, meter.name, created)

            await self.store.write(undo)
            if pending_id is not None and self.book is not None:
                self.book.rewrite(pending_id)  # its row went with the adoption's transaction
            raise AdoptionRefused(409, str(e)) from None
        if pending_id is not None and self.book is not None:
            self.book.forget(pending_id)
        return Adopted(name, None if meter is None else meter.name, owner_name)

    async def _adopt_dtu(self, registration: bytes, pending_id: str | None, account: str | None, who: str) -> Adopted:
        if self.enrol_dtu is None:
            raise AdoptionRefused(409, "the binary protocol's DTUs cannot be adopted here")
        psn = int(registration)
        now = self.now()
        enrol = self.enrol_dtu

        def job(session: Session) -> str | AdoptionRefused:
            try:
                return record_dtu_adoption(session, enrol, psn, account, pending_id, who, now)
            except AdoptionRefused as e:
                return e

        owner_name = await self._write(job)
        if self.release_dtu is not None:
            self.release_dtu(psn)  # before the book forgets it, which would refuse its held login
        if pending_id is not None and self.book is not None:
            self.book.forget(pending_id)
        return Adopted(str(psn), None, owner_name)

    async def _write(self, job: Callable[[Session], Any]) -> Any:
        await self.synced()
        result = await self.store.write(job)
        if isinstance(result, AdoptionRefused):
            raise result
        return result


# -- the steps, for the running center and the offline CLI alike ----------------------------------


def shown_registration(device: PendingDevice) -> str:
    """A registration as text, or ``hex:...`` when it is not printable; a PSN in decimal."""
    return device.registration.decode("ascii") if device.kind == DTU else registration_name(device.registration)


def device_json(device: PendingDevice) -> dict[str, Any]:
    return {
        "id": device.id, "kind": device.kind, "registration": shown_registration(device), "peer": device.peer,
        "listener": device.listener, "first_bytes": device.first_bytes.hex(),
        "first_seen": utc(device.first_seen).isoformat(), "last_seen": utc(device.last_seen).isoformat(),
        "times_seen": device.times_seen,
    }




def definitions(
    registration: bytes, template: str | None, unit: int, interval: float, link_keys: Mapping[str, Any],
    read_link: LinkReader, read_meter: MeterReader, find: TemplateFinder,
) -> tuple[LinkSettings, MeterSettings | None]:
    """The link named after ``registration`` and its meter (of the same name) from ``template``
    (found by ``find``: the owning account's, then the shipped ones), read by the file's
    readers; AdoptionRefused (400) for what they refuse."""
    name = registration_name(registration)
    link_table = {**link_keys, "name": name, "registration": encode_packet_option(registration)}
    try:
        link = read_link(link_table, "the adoption")
        meter = None if template is None else read_meter(
            {"name": name, "link": name, "unit": unit, "interval": interval, "template": template}, "the adoption",
            find,
        )
    except ConfigError as e:
        raise AdoptionRefused(400, str(e)) from None
    if link.kind != "shared":
        raise AdoptionRefused(400, "an adopted device dials the shared listener: no listen, connect or serial")
    return link, meter


def record_link_adoption(
    session: Session, link: LinkSettings, meter: MeterSettings | None, owner: int, pending_id: str | None,
    who: str, now: dt.datetime,
) -> tuple[str, bool]:
    """The link's and meter's rows in account ``owner`` (an id), the pending row's removal and the
    audit record; returns the account's name and whether the meter's row is new (to undo it)."""
    try:
        device_links.create_link(session, link_spec(link), owner, now)
        created = meter is not None and device_meters.create_meter(session, meter_spec(meter), owner, now)
    except DeviceConflict as e:
        raise AdoptionRefused(409, str(e)) from None
    request = {"kind": MODBUS, "registration": link.name, "template": None if meter is None else meter.template,
               "unit": None if meter is None else meter.unit, "interval": None if meter is None else meter.interval}
    _finish(session, pending_id, link.name, who, now, request)
    return accounts.account_name(session, owner), created


def record_dtu_adoption(
    session: Session, enrol: DtuEnroller, psn: int, account: str | None, pending_id: str | None, who: str,
    now: dt.datetime,
) -> str:
    """The DTU's record in the account, the pending row's removal and the audit record."""
    owner = owner_id(session, account)
    try:
        enrol(session, psn, owner, now)
    except ValueError as e:
        raise AdoptionRefused(409, str(e)) from None
    _finish(session, pending_id, str(psn), who, now, {"kind": DTU, "psn": psn})
    return accounts.account_name(session, owner)


def _owner_or_refusal(session: Session, account: str | None) -> int | AdoptionRefused:
    try:
        return owner_id(session, account)
    except AdoptionRefused as e:
        return e


def owner_id(session: Session, account: str | None) -> int:
    """The id of the account an adoption names; the first admin for None; AdoptionRefused (400) if none."""
    if account is None:
        return accounts.first_admin_id(session)
    try:
        return accounts.account_id(session, account)
    except accounts.AccountError:
        raise AdoptionRefused(400, f"no account {account!r}") from None


def _finish(session: Session, pending_id: str | None, target: str, who: str, now: dt.datetime,
            request: Mapping[str, Any]) -> None:
    """The pending row goes, and the adoption is audited: who, when, what."""
    if pending_id is not None:
        pending_rows.delete_pending(session, pending_id)
    device_meters.record_operation(
        session, kind="adopt", target=target, who=who, requested=now, finished=now, outcome="ok",
        request=request, answer=None, error=None,
    )
