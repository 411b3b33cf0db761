"""Accounts' own meter templates in the database, as plain synchronous functions of a Session.

A template's document is its keys as JSON, as a template file has them; the store keeps
and returns it as text and never parses it (the template reader does, for the shipped
files, the API and the CLI alike). Which meters are made from a template is read from
their definitions (``template = NAME``); a meter's template is always its own account's
or a shipped one, so only the account's meters are looked at.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import attrs
from sqlalchemy import select
from sqlalchemy.orm import Session

from dtucenter.setting import MAX_NAME
from dtucenter.store.links import DeviceConflict
from dtucenter.store.models import Account, Meter, MeterTemplate, TemplateEdit


@attrs.frozen
class TemplateRow:
    account_id: int
    account: str
    name: str
    version: int
    #: The template's keys as JSON.
    document: str


@attrs.frozen
class TemplateEditInfo:
    action: str
    version: int
    who: str
    time: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "version": self.version, "who": self.who, "time": self.time.isoformat()}


def _row(row: MeterTemplate) -> TemplateRow:
    return TemplateRow(row.account_id, row.owner.name, row.name, row.version, row.document)


def list_templates(session: Session, account: int | None = None) -> list[TemplateRow]:
    """Every account's templates by account name and name, or those of ``account`` (an id)."""
    query = select(MeterTemplate).join(MeterTemplate.owner).order_by(Account.name, MeterTemplate.name)
    if account is not None:
        query = query.where(MeterTemplate.account_id == account)
    return [_row(row) for row in session.scalars(query)]


def _get(session: Session, account: int, name: str) -> MeterTemplate | None:
    return session.scalars(
        select(MeterTemplate).where(MeterTemplate.account_id == account, MeterTemplate.name == name)
    ).one_or_none()


def get_template(session: Session, account: int, name: str) -> TemplateRow | None:
    row = _get(session, account, name)
    return None if row is None else _row(row)


def meters_using(session: Session, account: int, name: str) -> list[tuple[str, str]]:
    """(name, ``[[meter]]`` table as JSON) of the account's meters made from template ``name``
    and not deleted, by name."""
    query = (
        select(Meter.name, Meter.definition)
        .where(Meter.account_id == account, Meter.configured.is_(True), Meter.definition.is_not(None))
        .order_by(Meter.name)
    )
    return [
        (meter, definition) for meter, definition in session.execute(query)
        if definition is not None and json.loads(definition).get("template") == name
    ]


def check_current(session: Session, account: int, name: str, version: int) -> None:
    """Refuse a meter write that read template ``name`` at ``version`` when the account's
    template has since been replaced or deleted (a write racing a template write)."""
    row = _get(session, account, name)
    if row is None or row.version != version:
        raise DeviceConflict(f"template {name!r} changed meanwhile: send the meter again")


def _audit(session: Session, row: MeterTemplate, action: str, who: str, now: dt.datetime) -> None:
    session.add(TemplateEdit(
        account=row.owner.name, name=row.name, action=action, version=row.version, who=who[:MAX_NAME], time=now,
    ))


def create_template(
    session: Session, account: int, name: str, version: int, document: str, who: str, now: dt.datetime
) -> None:
    """Add one of ``account``'s templates; ``DeviceConflict`` when it has one of that name."""
    if _get(session, account, name) is not None:
        raise DeviceConflict(f"a template named {name!r} exists")
    row = MeterTemplate(account_id=account, name=name, version=version, document=document, created=now, updated=now)
    session.add(row)
    session.flush()
    session.refresh(row)
    _audit(session, row, "create", who, now)


def replace_template(
    session: Session, account: int, name: str, version: int, document: str, who: str, now: dt.datetime,
    meter_points: Mapping[str, list[dict[str, Any]]],
) -> bool:
    """Replace one of ``account``'s templates with a higher ``version``, and set the points of the
    meters made from it (``meter_points``: by meter name, as ``meter_spec`` gives them; they must
    be all of its meters, else another write came between and ``DeviceConflict`` says so).
    False when the account has no such template."""
    row = _get(session, account, name)
    if row is None:
        return False
    if version <= row.version:
        raise DeviceConflict(
            f"template {name!r} is at version {row.version}: a replacement must raise the version"
        )
    users = {meter for meter, _ in meters_using(session, account, name)}
    if users != set(meter_points):
        raise DeviceConflict(f"the meters made from template {name!r} changed meanwhile: send it again")
    row.version, row.document, row.updated = version, document, now
    for meter in session.scalars(select(Meter).where(Meter.name.in_(users))):
        meter.points = json.dumps(meter_points[meter.name])
    _audit(session, row, "replace", who, now)
    return True


def delete_template(session: Session, account: int, name: str, who: str, now: dt.datetime) -> bool:
    """Delete one of ``account``'s templates; refused (``DeviceConflict``, naming them) while
    meters are made from it. False when the account has no such template."""
    row = _get(session, account, name)
    if row is None:
        return False
    users = [meter for meter, _ in meters_using(session, account, name)]
    if users:
        raise DeviceConflict(
            f"template {name!r} is used by meters {', '.join(users)}: give them other points or delete them first"
        )
    _audit(session, row, "delete", who, now)
    session.delete(row)
    return True


def template_of_meter(session: Session, meter: str) -> tuple[int, str] | None:
    """(account id, name) of the account's own template meter ``meter`` is made from, if it is."""
    row = session.get(Meter, meter)
    if row is None or row.definition is None:
        return None
    name = json.loads(row.definition).get("template")
    if name is None or _get(session, row.account_id, name) is None:
        return None
    return row.account_id, name


def list_edits(session: Session, account: str, name: str, limit: int) -> list[TemplateEditInfo]:
    """The audit trail of one account's template, newest first."""
    rows = session.scalars(
        select(TemplateEdit)
        .where(TemplateEdit.account == account, TemplateEdit.name == name)
        .order_by(TemplateEdit.id.desc())
        .limit(limit)
    )
    return [TemplateEditInfo(r.action, r.version, r.who, r.time) for r in rows]
