"""The store as the DTU half uses it: ``dtucenter.dtu.ports``' DtuRecords and CommandTrail.

Like ``recorder.MeterRecorder`` for the Modbus half, this implements the
interfaces the protocol package defines, by structure: it imports nothing
from ``dtucenter.dtu`` and speaks plain types (tests/test_layering.py holds
that). Each method is one job for the ``Store`` façade's threads.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred

from dtucenter.store import audit, nodes, queries
from dtucenter.store.facade import Store


class DtuStore:
    """``node``: the id of this center in the cluster (``nodes``); the DTUs it holds are marked with it."""

    def __init__(self, store: Store, node: str = "local") -> None:
        self.node = node
        self._write = store.write
        self._read = store.read
        #: The upload path, taken once: a call through this class per upload would show at ingest rates.
        self.add_samples = store.add_samples

    # -- DtuRecords ------------------------------------------------------------------------

    def authenticate_many(
        self, attempts: Sequence[queries.LoginAttempt], now: dt.datetime
    ) -> Deferred[list[queries.LoginOutcome]]:
        return self._write(partial(queries.authenticate_many, attempts=attempts, now=now, node=self.node))

    def replace_register_list(
        self, psn: int, send_test_time: int, registers: tuple[tuple[int, int], ...]
    ) -> Deferred[None]:
        return self._write(
            partial(queries.replace_register_list, psn=psn, send_test_time=send_test_time, registers=registers)
        )

    def mark_offline_many(self, last_seen: Mapping[int, dt.datetime]) -> Deferred[None]:
        return self._write(partial(queries.mark_offline_many, last_seen=last_seen, node=self.node))

    def mark_left_over_offline(self, now: dt.datetime) -> Deferred[int]:
        return self._write(partial(nodes.mark_left_over_offline, node=self.node, now=now))

    def mark_own_offline(self) -> Deferred[int]:
        return self._write(partial(nodes.mark_own_offline, node=self.node))

    def record_last_seen(self, seen: Mapping[int, dt.datetime]) -> Deferred[None]:
        return self._write(partial(queries.record_last_seen, seen=seen))

    def dtu_exists(self, psn: int) -> Deferred[bool]:
        def exists(session: Session) -> bool:
            return queries.get_dtu(session, psn) is not None

        return self._read(exists)

    # -- CommandTrail ------------------------------------------------------------------------

    def record_command(
        self, psn: int, kind: str, request: dict[str, Any], who: str, queued: dt.datetime,
        outcome: str | None = None, finished: dt.datetime | None = None, error: str | None = None,
    ) -> Deferred[int]:
        return self._write(partial(
            audit.record_command, psn=psn, kind=kind, request=request, who=who, queued=queued,
            outcome=audit.PENDING if outcome is None else outcome, finished=finished, error=error,
        ))

    def finish_command(
        self, record_id: int, sent: dt.datetime | None, finished: dt.datetime, outcome: str,
        result: Any = None, error: str | None = None,
    ) -> Deferred[None]:
        return self._write(partial(
            audit.finish_command, record_id=record_id, sent=sent, finished=finished, outcome=outcome,
            result=result, error=error,
        ))

    def interrupt_pending(self, now: dt.datetime) -> Deferred[int]:
        # Not the commands other live nodes of the cluster are running now.
        return self._write(
            lambda session: audit.interrupt_pending(session, now, nodes.held_by_other_nodes(self.node, now))
        )
