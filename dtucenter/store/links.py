"""The Modbus bridge's links in the database, as plain synchronous functions of a Session.

A link's definition is its ``[[link]]`` table as JSON; the store keeps and
returns it as text and never parses it (the config reader does, for the file
and for the API alike).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from sqlalchemy import select
from sqlalchemy.orm import Session

from dtucenter.store.accounts import first_admin_id
from dtucenter.store.models import MANAGED_BY_API, MANAGED_BY_FILE, Link


@attrs.frozen
class LinkRow:
    name: str
    account: str
    managed_by: str
    #: The ``[[link]]`` table as JSON.
    definition: str


def sync_links(session: Session, links: Sequence[Mapping[str, Any]], now: dt.datetime) -> tuple[int, list[str]]:
    """Make the file's links in the table match the config: add or update ``links`` (dicts of
    name, definition and registration) as file-managed, delete the file-managed ones the file
    no longer declares. Returns how many were added, and the names of those removed.

    As for meters: a new one belongs to the first admin account, an existing one keeps its
    owner, and one the API made under a name the file now declares becomes the file's.
    """
    rows = {row.name: row for row in session.scalars(select(Link))}
    owner = first_admin_id(session) if any(spec["name"] not in rows for spec in links) else None
    added = 0
    removed: list[str] = []
    for spec in links:
        row = rows.pop(spec["name"], None)
        if row is None:
            assert owner is not None
            row = Link(name=spec["name"], account_id=owner, created=now)
            session.add(row)
            added += 1
        if (row.definition, row.managed_by) != (spec["definition"], MANAGED_BY_FILE):
            row.updated = now
        row.definition, row.registration, row.managed_by = spec["definition"], spec["registration"], MANAGED_BY_FILE
    for row in rows.values():
        if row.managed_by == MANAGED_BY_FILE:
            session.delete(row)
            removed.append(row.name)
    return added, removed


def list_links(session: Session, account_id: int | None = None) -> list[LinkRow]:
    """Every link, or an account's, by name."""
    query = select(Link).order_by(Link.name)
    if account_id is not None:
        query = query.where(Link.account_id == account_id)
    return [LinkRow(row.name, row.owner.name, row.managed_by, row.definition) for row in session.scalars(query)]


def api_link_definitions(session: Session) -> list[tuple[str, str]]:
    """(name, ``[[link]]`` table as JSON) of the links the API manages, by name."""
    query = select(Link.name, Link.definition).where(Link.managed_by == MANAGED_BY_API).order_by(Link.name)
    return [(name, definition) for name, definition in session.execute(query)]


# -- written through the API ---------------------------------------------------------------


class DeviceConflict(ValueError):
    """A name that is taken, or a device that the config file manages."""


def get_link(session: Session, name: str, account: int | None = None) -> LinkRow | None:
    """Link ``name``; None also when ``account`` (an account id) is given and does not own it."""
    row = session.get(Link, name)
    if row is None or (account is not None and row.account_id != account):
        return None
    return LinkRow(row.name, row.owner.name, row.managed_by, row.definition)


def create_link(session: Session, spec: Mapping[str, Any], account: int, now: dt.datetime) -> None:
    """Add an API-managed link (``spec`` as ``sync_links`` takes one) owned by ``account``."""
    if session.get(Link, spec["name"]) is not None:
        raise DeviceConflict(f"a link named {spec['name']!r} exists")
    session.add(Link(
        name=spec["name"], account_id=account, managed_by=MANAGED_BY_API, definition=spec["definition"],
        registration=spec["registration"], created=now, updated=now,
    ))


def _api_row(session: Session, name: str, account: int | None, config_file: str) -> Link | None:
    row = session.get(Link, name)
    if row is None or (account is not None and row.account_id != account):
        return None
    if row.managed_by == MANAGED_BY_FILE:
        raise DeviceConflict(f"link {name!r} is managed by the config file {config_file}: change it there")
    return row


def replace_link(
    session: Session, spec: Mapping[str, Any], account: int | None, config_file: str, now: dt.datetime
) -> str | None:
    """Replace an API-managed link's definition; returns the old one (to put back should the
    bridge refuse the new one), None when there is no such link or ``account`` does not own it."""
    row = _api_row(session, spec["name"], account, config_file)
    if row is None:
        return None
    old = row.definition
    row.definition, row.registration, row.updated = spec["definition"], spec["registration"], now
    return old


def delete_link(session: Session, name: str, account: int | None, config_file: str) -> bool:
    """Delete an API-managed link; False when there is none (or ``account`` does not own it)."""
    row = _api_row(session, name, account, config_file)
    if row is None:
        return False
    session.delete(row)
    return True
