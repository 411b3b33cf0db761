"""This center as one node of a cluster sharing a PostgreSQL database (docs/architecture.md, "Cluster").

The node registers itself in ``nodes`` at start and renews its lease every
third of it. Each renewal also clears what dead nodes left (their DTUs
offline) and claims the dialled links no live node holds, so that each runs
on exactly one node and moves within about a lease when its node dies. Every
second the node looks for DTUs that logged in on another node since, and
drops its older connection to them. On SQLite there is one node: it registers
the same way, so the API describes it alike, but there is nobody to hand over to.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import socket
from functools import partial

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.dtu.center import DTUCenter
from dtucenter.isotime import utc_now
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store import nodes
from dtucenter.store.facade import Store

log = Logger()

#: Seconds between looks for DTUs that logged in on another node (one small indexed query each).
HANDOVER_POLL = 1.0

def generated_node_id() -> str:
    """The host's name and a random suffix: unique, and says where the node runs."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:50] or "node"
    return f"{host}-{secrets.token_hex(3)}"


def join(engine: Engine, node: str, url: str | None, lease: float, now: dt.datetime, alone: bool) -> None:
    """Register this node, before anything else starts; NodeConflict when its id is a live node's.
    ``alone``: no other node can be running (``nodes.register``)."""
    with Session(engine) as session, session.begin():
        nodes.register(session, node, url, socket.gethostname()[:100], os.getpid(), now, lease, alone)


class ClusterNode(Service):
    """Keeps this node's lease, its links' claims and the DTUs other nodes took over up to date."""

    def __init__(
        self, node: str, store: Store, clock: IReactorTime, lease: float, center: DTUCenter,
        bridge: ModbusBridge | None = None, *, shared: bool = True, url: str | None = None,
    ) -> None:
        self.node = node
        #: Where the other nodes reach this node's API (set once it listens, unless configured).
        self.url = url
        self.store = store
        self.clock = clock
        self.lease = lease
        self.center = center
        self.bridge = bridge
        #: Other nodes may share the database (PostgreSQL): look for handovers.
        self.shared = shared
        self._renewer = LoopingCall(self._renew)
        self._renewer.clock = clock
        self._handovers = LoopingCall(self._take_handovers)
        self._handovers.clock = clock
        #: Clock seconds of the last renewal that the database confirmed.
        self._renewed_at = clock.seconds()
        self._renewing = False
        self._holding_links: set[str] = set()

    def startService(self) -> None:
        super().startService()
        log.info("Cluster node {node}: lease {lease:g}s", node=self.node, lease=self.lease)
        self._renewed_at = self.clock.seconds()
        self._renewer.start(self.lease / 3, now=True)
        if self.shared:
            self._handovers.start(HANDOVER_POLL, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for loop in (self._renewer, self._handovers):
            if loop.running:
                loop.stop()
        if self.bridge is not None:
            self.bridge.hold_links(set())
        return self.store.write(partial(nodes.leave, node=self.node, now=utc_now(self.clock))).addErrback(
            lambda f: log.failure("Cluster node {node}: could not leave the cluster cleanly", f, node=self.node)
        )

    # -- the lease ---------------------------------------------------------------------

    def _renew(self) -> None:
        """A tick: one renewal at a time; while the database does not answer, the lease runs out
        here too, and then this node lets its links go before another takes them."""
        if self._renewing:
            self._check_lapsed()
            return
        self._renewing = True
        wanted = self.bridge.dialled_links() if self.bridge is not None else []
        started = self.clock.seconds()
        # Beside the writer's group commits, not behind them: under an ingest backlog a renewal
        # queued there came too late, and the others took this busy node for dead.
        d = self.store.maintain(partial(self._renewal, wanted=wanted, now=utc_now(self.clock)))
        d.addCallback(self._renewed, started)
        d.addErrback(self._not_renewed)

    def _renewal(self, session: Session, wanted: list[str], now: dt.datetime) -> tuple[nodes.Renewal, set[str]]:
        renewal = nodes.renew(session, self.node, now, self.lease, self.url)
        held = nodes.claim_links(session, self.node, wanted, now) if wanted or self._holding_links else set()
        return renewal, held

    def _renewed(self, outcome: tuple[nodes.Renewal, set[str]], started: float) -> None:
        self._renewing = False
        renewal, held = outcome
        if not renewal.held:
            log.warn(
                "Cluster node {node}: its lease had lapsed (the database was out of reach for over {lease:g}s): "
                "the others took it for dead, so it drops its DTUs' connections (they log in again) "
                "and its links before taking part again",
                node=self.node, lease=self.lease,
            )
            for psn in list(self.center.sessions):
                self.center.let_go(psn, "this node's lease lapsed")
            self._hold(set())
            return  # renew() has made it live again: links are claimed anew at the next tick
        self._renewed_at = started
        if renewal.dtus_of_dead_nodes:
            log.info(
                "Cluster: {count} DTUs of nodes gone ({nodes}) marked offline",
                count=renewal.dtus_of_dead_nodes, nodes=", ".join(renewal.dead_nodes),
            )
        self._hold(held)

    def _not_renewed(self, failure: Failure) -> None:
        self._renewing = False
        log.failure("Cluster node {node}: could not renew its lease", failure, node=self.node)
        self._check_lapsed()

    def _check_lapsed(self) -> None:
        if self._holding_links and self.clock.seconds() - self._renewed_at >= self.lease:
            log.warn(
                "Cluster node {node}: lease not renewed for {lease:g}s; letting its links go",
                node=self.node, lease=self.lease,
            )
            self._hold(set())

    def _hold(self, held: set[str]) -> None:
        if self.bridge is None:
            return
        for link in sorted(held - self._holding_links):
            log.info("Cluster node {node} holds link {link}", node=self.node, link=link)
        self._holding_links = held
        self.bridge.hold_links(held)

    # -- DTUs another node took ------------------------------------------------------------

    def _take_handovers(self) -> Deferred[None]:
        d = self.store.maintain(partial(nodes.take_handovers, node=self.node)).addCallback(self._hand_over)
        # Logged and carried on: the next second asks again.
        d.addErrback(lambda f: log.failure("Cluster node {node}: could not read handovers", f, node=self.node))
        return d

    def _hand_over(self, psns: list[int]) -> None:
        for psn in psns:
            self.center.let_go(psn, "replaced by a newer login on another node")

    # -- what the API asks --------------------------------------------------------------------

    def list_nodes(self) -> Deferred[list[nodes.NodeInfo]]:
        return self.store.read(partial(nodes.list_nodes, now=utc_now(self.clock)))
