"""Pending devices in the database: the durable copy of the running center's
:class:`~dtucenter.discovery.PendingBook`, and what the offline CLI lists and drops."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred

from dtucenter.discovery import PendingDevice, utc
from dtucenter.store.facade import Store
from dtucenter.store.models import PendingDeviceRow
from dtucenter.store.queries import rowcount


def _device(row: PendingDeviceRow) -> PendingDevice:
    return PendingDevice(
        row.id, row.kind, row.registration, row.host, row.peer, row.listener, row.first_bytes,
        row.first_seen.timestamp(), row.last_seen.timestamp(), row.times_seen,
    )


def list_pending(session: Session) -> list[PendingDevice]:
    query = select(PendingDeviceRow).order_by(PendingDeviceRow.first_seen, PendingDeviceRow.id)
    return [_device(row) for row in session.scalars(query)]


def get_pending(session: Session, device_id: str) -> PendingDevice | None:
    row = session.get(PendingDeviceRow, device_id)
    return None if row is None else _device(row)


def delete_pending(session: Session, device_id: str) -> bool:
    return rowcount(session.execute(delete(PendingDeviceRow).where(PendingDeviceRow.id == device_id))) > 0


def save_pending(
    session: Session, saved: Sequence[PendingDevice], removed: Sequence[str], expired_before: float
) -> None:
    """One batch of the book's changes: ``removed`` ids deleted, ``saved`` devices written
    (a device whose registration another id held replaces it), rows not seen since
    ``expired_before`` (the book's expiry, also for rows it did not load) deleted."""
    if removed:
        session.execute(delete(PendingDeviceRow).where(PendingDeviceRow.id.in_(removed)))
    session.execute(delete(PendingDeviceRow).where(PendingDeviceRow.last_seen < utc(expired_before)))
    for device in saved:
        row = session.get(PendingDeviceRow, device.id)
        if row is None:
            session.execute(delete(PendingDeviceRow).where(
                PendingDeviceRow.kind == device.kind, PendingDeviceRow.registration == device.registration
            ))
            row = PendingDeviceRow(id=device.id, kind=device.kind, registration=device.registration,
                                   listener=device.listener, first_bytes=device.first_bytes,
                                   first_seen=utc(device.first_seen))
            session.add(row)
        row.host, row.peer = device.host, device.peer
        row.last_seen, row.times_seen = utc(device.last_seen), device.times_seen


class PendingDeviceStore:
    """:class:`~dtucenter.discovery.PendingStore` through the store's threads."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def load_pending(self) -> Deferred[list[PendingDevice]]:
        return self.store.read(list_pending)

    def save_pending(
        self, saved: Sequence[PendingDevice], removed: Sequence[str], expired_before: float
    ) -> Deferred[None]:
        return self.store.write(lambda session: save_pending(session, saved, removed, expired_before))
