"""Operator commands to DTUs by PSN, each one recorded in the audit trail.

The HTTP API (and anything else that acts for an operator) goes through
``Control.run``: it finds the DTU's live session, queues the command there
and writes who asked, what, when it went out and how it ended.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dtucenter.dtu.center import DTUCenter
from dtucenter.dtu.commands import Command, CommandError, DTUOffline, Ticket
from dtucenter.dtu.ports import CommandTrail

log = Logger()


class UnknownDTU(LookupError):
    """No DTU with this PSN in the database."""


class Control(Service):
    def __init__(self, center: DTUCenter, trail: CommandTrail) -> None:
        self.center = center
        self.trail = trail

    def startService(self) -> None:
        super().startService()
        d = self.trail.interrupt_pending(self.center.now())
        d.addCallbacks(self._interrupted, lambda f: log.failure("Could not close interrupted audit records", f))

    def _interrupted(self, count: int) -> None:
        if count:
            log.warn("{count} commands were pending when the center last stopped; marked interrupted", count=count)

    async def run(self, psn: int, command: Command, who: str) -> Any:
        """Send ``command`` to DTU ``psn``; the result, or CommandError / UnknownDTU."""
        command.check(self.center.settings.dialect)
        session = self.center.sessions.get(psn)
        if session is None:
            await self._offline(psn, command, who)
        assert session is not None
        ticket = session.commands.submit(command)
        record = self.trail.record_command(psn, command.KIND, command.to_json(), who, ticket.queued)
        try:
            result = await ticket.result
        except Exception as e:
            outcome = e.outcome if isinstance(e, CommandError) else "error"
            await self._finish(record, ticket, outcome, error=str(e) or type(e).__name__)
            raise
        await self._finish(record, ticket, "ok", result=result.to_json())
        return result

    async def _offline(self, psn: int, command: Command, who: str) -> None:
        if not await self.center.records.dtu_exists(psn):
            raise UnknownDTU(f"no DTU {psn}")
        error = DTUOffline(f"DTU {psn} is offline")
        await self.record_failed(psn, command, who, error)
        raise error

    async def record_failed(self, psn: int, command: Command, who: str, error: CommandError) -> None:
        """A command that never reached the DTU, in the audit trail as asked and ended at once."""
        now = self.center.now()
        await self._audit(
            self.trail.record_command(psn, command.KIND, command.to_json(), who, queued=now,
                                      outcome=error.outcome, finished=now, error=str(error)),
        )

    async def _finish(self, record: Deferred[int], ticket: Ticket, outcome: str, **details: Any) -> None:
        try:
            record_id = await record
        except Exception:
            log.failure("Could not record a {kind} command in the audit trail", kind=ticket.command.KIND)
            return
        await self._audit(
            self.trail.finish_command(record_id, ticket.sent, ticket.finished or self.center.now(), outcome,
                                      **details)
        )

    async def _audit(self, write: Awaitable[Any]) -> None:
        """The answer matters more than its record: a failed audit write is logged, not raised."""
        try:
            await write
        except Exception:
            log.failure("Could not write the audit trail")
