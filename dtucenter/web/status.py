"""GET /api/status: is the center healthy, how many DTUs are online, what has it counted, how polling goes.

The whole answer is for admins; another account gets the version and whether the store is healthy.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import attrs

from dtucenter import __version__
from dtucenter.dtu.center import DTUCenter
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store import nodes
from dtucenter.store.facade import Store
from dtucenter.web.router import Call, Router


class StatusApi:
    def __init__(
        self, center: DTUCenter, store: Store, bridge: ModbusBridge | None = None, node: str | None = None
    ) -> None:
        self.center = center
        self.store = store
        self.bridge = bridge
        #: This center's id among the cluster's nodes.
        self.node = node

    def install(self, router: Router) -> None:
        router.add("GET", "/api/status", self.status)

    def _mismatches(self) -> dict[str, Any]:
        count, psns = self.center.mismatched_psns()
        return {"dtus": count, "psns": psns}

    async def status(self, call: Call) -> Any:
        call.query(())
        center, store = self.center, self.store
        now = center.now()
        if not call.caller.admin:
            # Fleet-wide counts are the operator's business, not a customer's.
            return {"version": __version__, "account": call.caller.account, "store": {"healthy": store.healthy}}
        cluster = await store.read(partial(nodes.list_nodes, now=now))
        return {
            "version": __version__,
            "node": self.node,
            "started": center.started.isoformat() if center.started else None,
            "uptime_s": round((now - center.started).total_seconds(), 3) if center.started else 0,
            "dtus_online": len(center.sessions),
            "nodes": [node.to_json() for node in cluster],
            "counters": dict(sorted(center.stats.items())),
            "register_list_mismatches": self._mismatches(),
            "store": {"healthy": store.healthy, "backlog_rows": store.backlog, **attrs.asdict(store.stats)},
            "modbus": self.bridge.polling_summary() if self.bridge is not None else None,
        }
