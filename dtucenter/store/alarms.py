"""Alarm rules of accounts, their webhooks, and alarms raised and cleared, as plain functions of a Session.

A rule's definition is its ``[[alarm]]`` keys as JSON; the store keeps and returns it as
text (the alarm reader checks it, for the file and the API alike).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dtucenter.store.links import DeviceConflict
from dtucenter.store.models import Account, Alarm, AlarmRuleRow, AlarmWebhook, Dtu, Link, Meter

#: Alarm rules an account may make through the API: each is evaluated in memory, so an account
#: (or a script gone wrong) cannot grow the center without bound.
MAX_RULES_PER_ACCOUNT = 10_000


@attrs.frozen
class StoredRule:
    account_id: int
    account: str
    name: str
    #: The rule's keys as JSON.
    definition: str


@attrs.frozen
class AlarmRecord:
    """An alarm as the API shows it and the engine reads back at start."""

    id: int
    account_id: int
    account: str
    rule: str
    device_kind: str
    device: str
    point: str | None
    limit: float | None
    message: str
    raised: dt.datetime
    raised_value: float | None
    cleared: dt.datetime | None
    cleared_value: float | None
    cleared_message: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "account": self.account, "rule": self.rule, "device_kind": self.device_kind,
            "device": self.device, "point": self.point, "limit": self.limit, "message": self.message,
            "active": self.cleared is None, "raised": self.raised.isoformat(), "raised_value": self.raised_value,
            "cleared": None if self.cleared is None else self.cleared.isoformat(),
            "cleared_value": self.cleared_value, "cleared_message": self.cleared_message,
        }


def _record(row: Alarm) -> AlarmRecord:
    return AlarmRecord(
        row.id, row.account_id, row.account, row.rule, row.device_kind, row.device, row.point, row.limit,
        row.message, row.raised, row.raised_value, row.cleared, row.cleared_value, row.cleared_message,
    )


# -- rules -----------------------------------------------------------------------------------------


def _stored(row: AlarmRuleRow) -> StoredRule:
    return StoredRule(row.account_id, row.owner.name, row.name, row.definition)


def list_rules(session: Session) -> list[StoredRule]:
    """Every account's rules made through the API, by account name and name."""
    query = select(AlarmRuleRow).join(AlarmRuleRow.owner).order_by(Account.name, AlarmRuleRow.name)
    return [_stored(row) for row in session.scalars(query)]


def _get_rule(session: Session, account: int, name: str) -> AlarmRuleRow | None:
    return session.scalars(
        select(AlarmRuleRow).where(AlarmRuleRow.account_id == account, AlarmRuleRow.name == name)
    ).one_or_none()


def device_owner(session: Session, kind: str, device: str) -> tuple[int, str] | None:
    """(account id, name) of the account owning a DTU (by PSN, as text), meter or link; None if unknown."""
    if kind == "dtu":
        row: Dtu | Meter | Link | None = session.get(Dtu, int(device))
    elif kind == "meter":
        row = session.get(Meter, device)
        if row is not None and not row.configured:
            row = None  # deleted, or left the file: its samples stay, it is no device any more
    else:
        row = session.get(Link, device)
    return None if row is None else (row.account_id, row.owner.name)


def create_rule(session: Session, account: int, name: str, definition: str, now: dt.datetime) -> None:
    if _get_rule(session, account, name) is not None:
        raise DeviceConflict(f"an alarm rule named {name!r} exists")
    count = session.scalar(select(func.count()).select_from(AlarmRuleRow).where(AlarmRuleRow.account_id == account))
    if (count or 0) >= MAX_RULES_PER_ACCOUNT:
        raise DeviceConflict(f"the account has {count} alarm rules, the most it may have; delete some first")
    session.add(AlarmRuleRow(account_id=account, name=name, definition=definition, created=now, updated=now))


def replace_rule(session: Session, account: int, name: str, definition: str, now: dt.datetime) -> bool:
    row = _get_rule(session, account, name)
    if row is None:
        return False
    row.definition, row.updated = definition, now
    return True


def delete_rule(session: Session, account: int, name: str) -> bool:
    row = _get_rule(session, account, name)
    if row is None:
        return False
    session.delete(row)
    return True


# -- webhooks of accounts ----------------------------------------------------------------------------


def list_webhooks(session: Session) -> dict[int, str]:
    """Every account's webhook, by account id."""
    return {row.account_id: row.url for row in session.scalars(select(AlarmWebhook))}


def set_webhook(session: Session, account: int, url: str | None, now: dt.datetime) -> bool:
    """Set (or with None, remove) an account's webhook; whether it had one."""
    row = session.get(AlarmWebhook, account)
    had = row is not None
    if url is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(AlarmWebhook(account_id=account, url=url, updated=now))
    else:
        row.url, row.updated = url, now
    return had


# -- alarms ---------------------------------------------------------------------------------------------


def raise_alarm(
    session: Session, account_id: int, account: str, rule: str, device_kind: str, device: str, point: str | None,
    limit: float | None, value: float | None, message: str, time: dt.datetime,
) -> int | None:
    """Store a raised alarm; its id, or None when the rule has one active already (nothing is stored)."""
    if _active(session, account_id, rule) is not None:
        return None
    row = Alarm(
        account_id=account_id, account=account, rule=rule, device_kind=device_kind, device=device, point=point,
        limit=limit, message=message, raised=time, raised_value=value,
    )
    session.add(row)
    session.flush()
    return row.id


def _active(session: Session, account_id: int, rule: str) -> Alarm | None:
    return session.scalars(
        select(Alarm).where(Alarm.account_id == account_id, Alarm.rule == rule, Alarm.cleared.is_(None))
        .order_by(Alarm.id).limit(1)
    ).first()


def clear_alarm(
    session: Session, account_id: int, rule: str, value: float | None, message: str, time: dt.datetime
) -> int | None:
    """Clear the rule's active alarm; its id, or None when it has none."""
    row = _active(session, account_id, rule)
    if row is None:
        return None
    session.execute(
        update(Alarm).where(Alarm.id == row.id)
        .values(cleared=time, cleared_value=value, cleared_message=message)
    )
    return row.id


def active_alarms(session: Session) -> list[AlarmRecord]:
    """Every account's active alarms, oldest first: what the engine starts from."""
    return [_record(row) for row in session.scalars(select(Alarm).where(Alarm.cleared.is_(None)).order_by(Alarm.id))]


def list_alarms(
    session: Session, account: int | None, *, active: bool, before: int | None, limit: int,
    rule: str | None = None,
) -> list[AlarmRecord]:
    """Alarms newest first, ``limit`` of them, with ids below ``before`` (the page after the one that
    ended with it); only active ones with ``active``; ``account`` None: every account's."""
    query = select(Alarm).order_by(Alarm.id.desc()).limit(limit)
    if account is not None:
        query = query.where(Alarm.account_id == account)
    if active:
        query = query.where(Alarm.cleared.is_(None))
    if before is not None:
        query = query.where(Alarm.id < before)
    if rule is not None:
        query = query.where(Alarm.rule == rule)
    return [_record(row) for row in session.scalars(query)]
