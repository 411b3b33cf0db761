"""A stand-in for the Store in Clock-driven tests: real queries, test-controlled commits."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from dtucenter.store import queries
from dtucenter.store.models import Sample


class HeldStore:
    """The Store's interface on a real database, without threads.

    Jobs run at once, but while ``hold`` is set their Deferreds wait for
    ``release`` (or ``fail``), which is how tests decide when a commit
    "finishes"; ``broken`` makes every write fail at once.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.hold = False
        self.broken = False
        self.held: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def write(self, job: Callable[[Session], Any]) -> Deferred[Any]:
        return self._submit(lambda: self._run(job))

    def read(self, job: Callable[[Session], Any]) -> Deferred[Any]:
        with Session(self.engine) as session:
            return succeed(job(session))

    def add_samples(self, rows: list[queries.SampleRow]) -> Deferred[None]:
        table_rows = [dict(zip(queries.SAMPLE_ROW_COLUMNS, row, strict=False)) for row in rows]
        return self._submit(lambda: self._run(lambda s: s.execute(Sample.__table__.insert(), table_rows) and None))

    def add_samples_then(self, rows: list[queries.SampleRow], settle: Callable[[Failure | None], None]) -> None:
        self.add_samples(rows).addBoth(lambda result: settle(result if isinstance(result, Failure) else None))

    def _run(self, job: Callable[[Session], Any]) -> Any:
        with Session(self.engine) as session, session.begin():
            return job(session)

    def _submit(self, work: Callable[[], Any]) -> Deferred[Any]:
        if self.broken:
            return fail(RuntimeError("disk on fire"))
        d: Deferred[Any] = Deferred()
        if self.hold:
            self.held.append((work, d))
        else:
            d.callback(work())
        return d

    def release(self) -> None:
        """End the hold and finish every held commit, in order."""
        self.hold = False
        while self.held:
            work, d = self.held.pop(0)
            d.callback(work())

    def fail(self) -> None:
        """The held commits fail as a database that went away would fail them."""
        held, self.held = self.held, []
        for _, d in held:
            d.errback(OperationalError("INSERT", {}, Exception("disk I/O error")))

    def samples(self, psn: int) -> list[int]:
        with Session(self.engine) as session:
            return [s.value for s in queries.query_samples(session, psn)]

    def add_dtu(self, psn: int, **fields: Any) -> None:
        self._run(lambda s: queries.upsert_dtu(s, psn, fields, dt.datetime.now(dt.UTC)))

    def dtu(self, psn: int) -> queries.DtuInfo | None:
        with Session(self.engine) as session:
            return queries.get_dtu(session, psn)
