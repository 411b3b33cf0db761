"""The audit trails of commands and of DTU record edits, as plain functions of a Session (like ``queries``)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection
from typing import Any

import attrs
from sqlalchemy import ScalarSelect, and_, select, update
from sqlalchemy.orm import Session

from dtucenter.store.models import CommandRecord, DtuEdit
from dtucenter.store.queries import rowcount

PENDING = "pending"
INTERRUPTED = "interrupted"


@attrs.frozen
class CommandInfo:
    id: int
    psn: int
    kind: str
    request: Any
    who: str
    queued: dt.datetime
    sent: dt.datetime | None
    finished: dt.datetime | None
    outcome: str
    result: Any
    error: str | None

    @classmethod
    def of(cls, row: CommandRecord) -> CommandInfo:
        return cls(
            id=row.id, psn=row.psn, kind=row.kind, request=json.loads(row.request), who=row.who,
            queued=row.queued, sent=row.sent, finished=row.finished, outcome=row.outcome,
            result=None if row.result is None else json.loads(row.result), error=row.error,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            key: (value.isoformat() if isinstance(value, dt.datetime) else value)
            for key, value in attrs.asdict(self).items()
        }


def record_command(
    session: Session,
    psn: int,
    kind: str,
    request: dict[str, Any],
    who: str,
    queued: dt.datetime,
    outcome: str = PENDING,
    finished: dt.datetime | None = None,
    error: str | None = None,
) -> int:
    """Add a row for a command; returns its id for ``finish_command``."""
    row = CommandRecord(
        psn=psn, kind=kind, request=json.dumps(request), who=who[:100], queued=queued,
        finished=finished, outcome=outcome, error=error,
    )
    session.add(row)
    session.flush()
    return row.id


def finish_command(
    session: Session,
    record_id: int,
    sent: dt.datetime | None,
    finished: dt.datetime,
    outcome: str,
    result: Any = None,
    error: str | None = None,
) -> None:
    session.execute(
        update(CommandRecord)
        .where(CommandRecord.id == record_id)
        .values(
            sent=sent, finished=finished, outcome=outcome, error=error,
            result=None if result is None else json.dumps(result),
        )
    )


def interrupt_pending(
    session: Session, now: dt.datetime, busy_elsewhere: ScalarSelect[int] | None = None,
    psns: Collection[int] | None = None,
) -> int:
    """At start-up: a command still pending was cut short by the last shutdown or crash.

    On a cluster, except those to the DTUs ``busy_elsewhere`` (held by other live nodes, which
    are running them); or only those to ``psns`` (the DTUs of a node found dead).
    """
    pending = CommandRecord.outcome == PENDING
    if busy_elsewhere is not None:
        pending = and_(pending, CommandRecord.psn.not_in(busy_elsewhere))
    if psns is not None:
        pending = and_(pending, CommandRecord.psn.in_(psns))
    return rowcount(session.execute(
        update(CommandRecord)
        .where(pending)
        .values(outcome=INTERRUPTED, finished=now, error="the center stopped before the command finished")
    ))


def list_commands(session: Session, psn: int, limit: int) -> list[CommandInfo]:
    """Newest first."""
    rows = session.scalars(
        select(CommandRecord).where(CommandRecord.psn == psn).order_by(CommandRecord.id.desc()).limit(limit)
    )
    return [CommandInfo.of(row) for row in rows]


# -- DTU record edits ------------------------------------------------------------------------------


@attrs.frozen
class DtuEditInfo:
    id: int
    psn: int
    action: str
    fields: Any
    who: str
    time: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "psn": self.psn, "action": self.action, "fields": self.fields, "who": self.who,
            "time": self.time.isoformat(),
        }


def record_dtu_edit(
    session: Session, psn: int, action: str, fields: dict[str, Any], who: str, time: dt.datetime
) -> None:
    """``action`` is create, update or delete; a password given is recorded as set, never as itself."""
    shown = {key: ("(set)" if key == "password" else value) for key, value in fields.items()}
    session.add(DtuEdit(psn=psn, action=action, fields=json.dumps(shown), who=who[:100], time=time))


def list_dtu_edits(session: Session, psn: int, limit: int) -> list[DtuEditInfo]:
    """Newest first."""
    rows = session.scalars(select(DtuEdit).where(DtuEdit.psn == psn).order_by(DtuEdit.id.desc()).limit(limit))
    return [DtuEditInfo(r.id, r.psn, r.action, json.loads(r.fields), r.who, r.time) for r in rows]
