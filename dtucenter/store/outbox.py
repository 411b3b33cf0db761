"""The MQTT publisher's backlog and directory in the database (``mqtt/publisher.py``'s ``Backlog``).

Implemented by structure, in plain types: the store imports nothing of the MQTT
package. Appends, reads and removals are all jobs of the store's one writer, so
they run in the order they are asked for: a read of the oldest messages sees
every append asked for before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred

from dtucenter.store.facade import Store
from dtucenter.store.models import Account, Dtu, Link, Meter, MqttBacklog, RegisterEntry
from dtucenter.store.queries import rowcount, table_of

#: (seq, topic, payload, qos, retain)
BacklogRow = tuple[int, str, bytes, int, bool]
#: A device's kind ("dtu", "meter", "link") and key (a PSN or a name) -> its account's name.
Accounts = dict[tuple[str, int | str], str]
#: A DTU's PSN -> its register list, (dev, addr) by position.
RegisterLists = dict[int, tuple[tuple[int, int], ...]]

MQTT_BACKLOG = table_of(MqttBacklog)


def backlog_state(session: Session) -> tuple[int, int]:
    count, highest = session.execute(select(func.count(), func.max(MqttBacklog.seq))).one()
    return int(count), int(highest or 0)


def oldest_messages(session: Session, limit: int) -> list[BacklogRow]:
    query = select(
        MqttBacklog.seq, MqttBacklog.topic, MqttBacklog.payload, MqttBacklog.qos, MqttBacklog.retain
    ).order_by(MqttBacklog.seq).limit(limit)
    return [
        (seq, topic, bytes(payload), qos, bool(retain)) for seq, topic, payload, qos, retain in session.execute(query)
    ]


def append_messages(session: Session, values: list[dict[str, object]]) -> None:
    session.execute(MQTT_BACKLOG.insert(), values)


def remove_messages_through(session: Session, seq: int) -> int:
    return rowcount(session.execute(delete(MqttBacklog).where(MqttBacklog.seq <= seq)))


def device_directory(
    session: Session, only: Sequence[tuple[str, int | str]] | None = None
) -> tuple[Accounts, RegisterLists]:
    """Every device's account name (or only these devices'), in four queries whatever their number."""
    wanted = {kind: [key for of_kind, key in only or () if of_kind == kind] for kind in ("dtu", "meter", "link")}
    accounts: Accounts = {}
    dtus = select(Dtu.psn, Account.name).join(Account, Dtu.account_id == Account.id)
    if only is not None:
        dtus = dtus.where(Dtu.psn.in_(wanted["dtu"]))
    for psn, account in session.execute(dtus):
        accounts[("dtu", psn)] = account
    for kind, model in (("meter", Meter), ("link", Link)):
        named = select(model.name, Account.name).join(Account, model.account_id == Account.id)
        if only is not None:
            named = named.where(model.name.in_(wanted[kind]))
        for device, account in session.execute(named):
            accounts[(kind, device)] = account
    registers: dict[int, list[tuple[int, int]]] = {}
    entries = select(RegisterEntry.psn, RegisterEntry.dev, RegisterEntry.addr).order_by(
        RegisterEntry.psn, RegisterEntry.position
    )
    if only is not None:
        entries = entries.where(RegisterEntry.psn.in_(wanted["dtu"]))
    for psn, dev, addr in session.execute(entries):
        registers.setdefault(psn, []).append((dev, addr))
    return accounts, {psn: tuple(entries) for psn, entries in registers.items()}


class MqttOutbox:
    """The backlog and directory the MQTT publisher reads and writes through the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def state(self) -> Deferred[tuple[int, int]]:
        return self._store.read(backlog_state)

    def append(self, rows: list[BacklogRow]) -> Deferred[None]:
        # A job, not add_rows: a transaction runs its jobs before its rows, and a read of the oldest
        # messages must see every append asked for before it.
        values = [{"seq": seq, "topic": topic, "payload": payload, "qos": qos, "retain": retain}
                  for seq, topic, payload, qos, retain in rows]
        return self._store.write(lambda session: append_messages(session, values))

    def oldest(self, limit: int) -> Deferred[list[BacklogRow]]:
        # Through the writer, not a reader: it must see the appends queued before it.
        return self._store.write(lambda session: oldest_messages(session, limit))

    def remove_through(self, seq: int) -> Deferred[int]:
        return self._store.write(lambda session: remove_messages_through(session, seq))

    def directory(self) -> Deferred[tuple[Accounts, RegisterLists]]:
        return self._store.read(device_directory)

    def devices(self, keys: list[tuple[str, int | str]]) -> Deferred[tuple[Accounts, RegisterLists]]:
        return self._store.read(lambda session: device_directory(session, keys))
