"""The cluster's shared truth: which center nodes run, which DTUs and links each holds.

Every node of a cluster shares one PostgreSQL database. A node registers a row
in ``nodes`` with a lease it renews; once ``lease_until`` has passed (or the
node stopped cleanly) it is dead: its DTUs count as offline and any node may
take its links. Times are the nodes' own clocks, so their clocks must agree
to well within a lease (NTP does).

Plain synchronous functions of a Session, as in ``queries``; the running
center calls them through ``dtucenter.cluster``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from collections.abc import Collection
from pathlib import Path
from typing import IO

import attrs
from sqlalchemy import ColumnElement, Engine, ScalarSelect, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dtucenter.store import audit
from dtucenter.store.models import Dtu, DtuHandover, LinkOwner, Node
from dtucenter.store.queries import rowcount

#: A dead node's row is kept this long, for ``GET /api/status`` to show it gone; then forgotten.
FORGET_DEAD_NODES_AFTER = dt.timedelta(days=1)


class NodeConflict(Exception):
    """This node cannot join: the message says why, in one line, for the operator."""


@attrs.frozen
class NodeInfo:
    id: str
    url: str | None
    host: str
    pid: int
    started: dt.datetime
    renewed: dt.datetime
    lease_until: dt.datetime
    alive: bool
    dtus_online: int
    #: The dialled links it runs.
    links: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            key: (value.isoformat() if isinstance(value, dt.datetime) else value)
            for key, value in attrs.asdict(self).items()
        }


def _alive(now: dt.datetime) -> ColumnElement[bool]:
    return and_(Node.lease_until > now, Node.stopped.is_(False))


def live_node_ids(now: dt.datetime) -> ScalarSelect[str]:
    """A subquery of the ids of live nodes."""
    return select(Node.id).where(_alive(now)).scalar_subquery()


def held_by_other_nodes(node: str, now: dt.datetime) -> ScalarSelect[int]:
    """A subquery of the PSNs online on live nodes other than ``node``."""
    return select(Dtu.psn).where(Dtu.node != node, Dtu.node.in_(live_node_ids(now))).scalar_subquery()


def register(
    session: Session, node: str, url: str | None, host: str, pid: int, now: dt.datetime, lease: float,
    alone: bool = False,
) -> None:
    """Join the cluster as ``node``, or refuse (NodeConflict) when a live node has that id.

    A node of that id whose lease runs but that was a process of this host that no longer exists
    (it crashed and is being restarted) is replaced at once rather than after its lease.
    ``alone``: this node knows it is the only one (it holds the SQLite file's lock), so any other
    node is a crashed earlier run: dead now, not once its lease lapses.
    """
    if alone:
        session.execute(update(Node).where(Node.id != node, Node.stopped.is_(False)).values(stopped=True))
    row = session.get(Node, node, with_for_update=True)
    until = now + dt.timedelta(seconds=lease)
    if row is None:
        session.add(Node(id=node, url=url, host=host, pid=pid, started=now, renewed=now, lease_until=until))
        return
    if row.lease_until > now and not row.stopped and not (row.host == host and not _process_exists(row.pid)):
        raise NodeConflict(
            f"node id {node!r} is taken by a running node (host {row.host}, pid {row.pid}, its lease renewed "
            f"{row.renewed.isoformat(timespec='seconds')}): give each node its own --node-id, or wait "
            f"{(row.lease_until - now).total_seconds():.0f}s if that node is gone"
        )
    row.url, row.host, row.pid = url, host, pid
    row.started = row.renewed = now
    row.lease_until = until
    row.stopped = False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@attrs.frozen
class Renewal:
    """What one renewal found: whether this node still held its lease, and what it cleared of dead nodes."""

    held: bool
    dtus_of_dead_nodes: int
    dead_nodes: tuple[str, ...]


def renew(session: Session, node: str, now: dt.datetime, lease: float, url: str | None = None) -> Renewal:
    """Extend this node's lease; mark the DTUs of dead nodes offline; forget nodes long dead.

    ``held`` is False when the lease had lapsed or another process took the row: the caller
    must then let go of what it holds (its DTUs and links), for others may have taken them; it is
    live again from this renewal on.
    """
    held = rowcount(session.execute(
        update(Node)
        .where(Node.id == node, Node.lease_until > now, Node.stopped.is_(False))
        .values(renewed=now, lease_until=now + dt.timedelta(seconds=lease), url=url)
    )) == 1
    if not held:
        rejoin(session, node, now, lease, url)
    dead = tuple(session.scalars(
        select(Node.id).where(or_(Node.lease_until <= now, Node.stopped.is_(True)))
    ))
    cleared = 0
    if dead:
        orphaned = list(session.scalars(select(Dtu.psn).where(Dtu.node.in_(dead))))
        if orphaned:
            audit.interrupt_pending(session, now, psns=orphaned)
            cleared = rowcount(session.execute(
                update(Dtu).where(Dtu.psn.in_(orphaned)).values(online=False, node=None)
            ))
        session.execute(delete(DtuHandover).where(DtuHandover.node.in_(dead)))
    session.execute(delete(Node).where(Node.lease_until < now - FORGET_DEAD_NODES_AFTER))
    return Renewal(held, cleared, dead)


def rejoin(session: Session, node: str, now: dt.datetime, lease: float, url: str | None) -> None:
    """After a lapsed lease (the database was out of reach): live again, holding nothing yet."""
    session.execute(
        update(Node).where(Node.id == node)
        .values(renewed=now, lease_until=now + dt.timedelta(seconds=lease), stopped=False, url=url)
    )


def leave(session: Session, node: str, now: dt.datetime) -> None:
    """A clean stop: its DTUs offline, its links free, itself dead at once."""
    session.execute(update(Dtu).where(Dtu.node == node).values(online=False, node=None))
    session.execute(delete(LinkOwner).where(LinkOwner.node == node))
    session.execute(delete(DtuHandover).where(DtuHandover.node == node))
    session.execute(update(Node).where(Node.id == node).values(stopped=True, lease_until=now))


def mark_left_over_offline(session: Session, node: str, now: dt.datetime) -> int:
    """At start-up: what this node's last run and dead nodes left marked online (no connection
    survives a restart); the DTUs of live nodes are theirs. Also those of no node, which a
    release before clusters left."""
    return rowcount(session.execute(
        update(Dtu)
        .where(Dtu.online.is_(True), or_(Dtu.node.is_(None), Dtu.node == node, Dtu.node.not_in(live_node_ids(now))))
        .values(online=False, node=None)
    ))


def mark_own_offline(session: Session, node: str) -> int:
    """At a stop: the DTUs this node held."""
    return rowcount(session.execute(update(Dtu).where(Dtu.node == node).values(online=False, node=None)))


def list_nodes(session: Session, now: dt.datetime) -> list[NodeInfo]:
    """Every node known, live ones first, each with how many DTUs and which links it holds now
    (a dead node's links until another takes them)."""
    counts: dict[str | None, int] = dict(
        session.execute(select(Dtu.node, func.count()).where(Dtu.node.is_not(None)).group_by(Dtu.node)).all()
    )
    links: dict[str, list[str]] = {}
    for link, holder in session.execute(select(LinkOwner.link, LinkOwner.node).order_by(LinkOwner.link)):
        links.setdefault(holder, []).append(link)
    rows = session.scalars(select(Node).order_by(Node.id))
    nodes = [
        NodeInfo(
            id=row.id, url=row.url, host=row.host, pid=row.pid, started=row.started, renewed=row.renewed,
            lease_until=row.lease_until, alive=row.lease_until > now and not row.stopped,
            dtus_online=counts.get(row.id, 0), links=tuple(links.get(row.id, ())),
        )
        for row in rows
    ]
    return sorted(nodes, key=lambda n: not n.alive)


def holder(session: Session, psn: int, now: dt.datetime) -> NodeInfo | None:
    """The live node a DTU is online on, if any."""
    row = session.execute(
        select(Node).join(Dtu, Dtu.node == Node.id).where(Dtu.psn == psn, _alive(now))
    ).scalar_one_or_none()
    return None if row is None else _live_info(row)


def _live_info(row: Node) -> NodeInfo:
    """A live node as a lookup answers it (without its counts)."""
    return NodeInfo(row.id, row.url, row.host, row.pid, row.started, row.renewed, row.lease_until, True, 0)


def link_holder(session: Session, link: str, now: dt.datetime) -> NodeInfo | None:
    """The live node running a dialled link, if any."""
    row = session.execute(
        select(Node).join(LinkOwner, LinkOwner.node == Node.id).where(LinkOwner.link == link, _alive(now))
    ).scalar_one_or_none()
    return None if row is None else _live_info(row)


def take_handovers(session: Session, node: str) -> list[int]:
    """The PSNs that logged in on another node since the last call, whose older connection here must go.

    Only those whose row still names another node: one that came back here meanwhile stays.
    """
    psns = list(session.scalars(delete(DtuHandover).where(DtuHandover.node == node).returning(DtuHandover.psn)))
    if not psns:
        return []
    still_here = set(session.scalars(select(Dtu.psn).where(Dtu.psn.in_(psns), Dtu.node == node)))
    return sorted(set(psns) - still_here)


def claim_links(session: Session, node: str, wanted: Collection[str], now: dt.datetime) -> set[str]:
    """Take each link of ``wanted`` that no live node holds; let go of those no longer wanted.

    Returns the links this node holds now. Two nodes claiming one link at once: the row
    update of one waits for the other's, and then no longer matches (its holder is live).
    """
    session.execute(delete(LinkOwner).where(LinkOwner.node == node, LinkOwner.link.not_in(wanted)))
    if not wanted:
        return set()
    known = set(session.scalars(select(LinkOwner.link).where(LinkOwner.link.in_(wanted))))
    new = sorted(set(wanted) - known)
    if new:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        session.execute(
            dialect.insert(LinkOwner).values([{"link": link, "node": node, "since": now} for link in new])
            .on_conflict_do_nothing()
        )
    session.execute(
        update(LinkOwner)
        .where(LinkOwner.link.in_(wanted), LinkOwner.node != node, LinkOwner.node.not_in(live_node_ids(now)))
        .values(node=node, since=now)
    )
    return set(session.scalars(select(LinkOwner.link).where(LinkOwner.node == node)))


# -- one center per SQLite file ------------------------------------------------------------------


class DatabaseInUse(Exception):
    """Another center runs on this SQLite file."""


def hold_sqlite_file(engine: Engine) -> IO[bytes] | None:
    """For a center on SQLite: an exclusive lock on ``DB.lock`` beside the file, held while the
    returned file stays open (the process's life); None for any other database.

    SQLite is for one node: two centers on one file would each believe the DTUs and links
    theirs. ``flock`` is released by the kernel when the process ends, however it ends, and is
    kept across twistd's fork into the background.
    """
    if engine.dialect.name != "sqlite":
        return None
    database = Path(engine.url.database or "").absolute()
    lock_path = database.with_name(database.name + ".lock")
    lock = open(lock_path, "a+b")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip()
        lock.close()
        raise DatabaseInUse(
            f"another center runs on {database} ({holder or 'see ' + str(lock_path)}): one SQLite database "
            f"serves one center; for several nodes use PostgreSQL (docs/deployment.md, \"Several nodes\")"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n".encode())
    lock.flush()
    return lock
