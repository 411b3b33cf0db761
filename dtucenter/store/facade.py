"""The non-blocking store: database work on threads, writes group-committed.

Every write goes through one writer thread. Whatever is submitted while a
commit is running waits and goes into the next one (and while only rows keep
coming, the next starts COMMIT_INTERVAL after the last one started at the
earliest), so thousands of DTUs uploading at once cost a few transactions a
second, not thousands, and a quiet center still commits at once. Callers get
Deferreds, or on the upload path a plain callback (``add_rows_then``), that
fire only after the commit, which is what lets a session acknowledge only
stored data.

When the database fails (down, locked, disk full) the batch is kept and
callers keep waiting: nothing is dropped. The writer then probes the
database with a ``SELECT 1`` at a short interval (backing off from
RETRY_FIRST to RETRY_MAX, never more) and retries the batch only once the
probe answers, so uploads resume within about RETRY_MAX of the database
coming back, however long it was away, and a dead database costs a cheap
connection attempt a second, not a re-sent batch. The first failure of an
outage is logged in full, the rest are summarised every SUMMARY_INTERVAL.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import attrs
from sqlalchemy import Connection, Engine, LargeBinary, Table
from sqlalchemy.engine.interfaces import DBAPIModule
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dtucenter.latency import Histogram
from dtucenter.store.meters import METER_SAMPLE_COLUMNS
from dtucenter.store.models import MeterSample, Sample
from dtucenter.store.queries import SAMPLE_ROW_COLUMNS, SampleRow, table_of

T = TypeVar("T")
Job = Callable[[Session], Any]
#: Told how rows given to ``add_rows_then`` ended: None once committed, else why they never will be.
Settle = Callable[[Failure | None], None]
#: Rows to insert, by table; one entry of the row queue moves and commits as a whole.
RowsByTable = dict[Table, list[Any]]
SAMPLES = table_of(Sample)
METER_SAMPLES = table_of(MeterSample)

log = Logger()

#: Seconds from the start of one commit to the start of the next at least, while only rows wait: a
#: commit costs about 0.4 ms of CPU whatever it holds (SQLAlchemy's session, SQLite's WAL commit and
#: fsync), which at a few thousand uploads a second was a sixth of what an upload cost. A quiet store
#: still commits at once; a busy one at most 1/COMMIT_INTERVAL times a second (benchmarks/findings.md).
COMMIT_INTERVAL = 0.02
#: Rows per transaction at most; more waits for the next one.
MAX_BATCH_ROWS = 50_000
#: Jobs (logins, offline marks...) per transaction at most: each may lock a DTU row, and a
#: transaction holds its locks until it commits, which other nodes of a cluster may wait for.
MAX_BATCH_JOBS = 1000
#: Seconds before the first probe of a database that failed a write, doubling up to RETRY_MAX.
RETRY_FIRST = 0.1
#: Seconds between probes at most: how long the center may lag behind a database that came back.
RETRY_MAX = 1.0
#: Seconds between the log lines that say the database is still failing.
SUMMARY_INTERVAL = 60.0


#: SQLSTATEs of a transaction PostgreSQL ended because it crossed another's: a deadlock, a serialization failure.
LOST_TO_ANOTHER_WRITER = frozenset({"40P01", "40001"})


def lost_to_another_writer(error: BaseException | None) -> bool:
    """The transaction crossed another writer's (another node of a cluster locking the same rows in
    another order): nothing is wrong with the database or the work, only with doing them together."""
    original = getattr(error, "orig", None)
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    return code in LOST_TO_ANOTHER_WRITER


def is_transient(error: BaseException | None) -> bool:
    """A failure of the database rather than of the work: worth retrying as is."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


@attrs.define
class _Batch:
    jobs: list[tuple[Job, Deferred[Any]]] = attrs.Factory(list)
    rows: RowsByTable = attrs.Factory(dict)
    row_count: int = 0
    row_waiters: list[Settle] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.row_waiters)

    def add_rows(self, table: Table, rows: list[Any]) -> None:
        table_rows = self.rows.get(table)
        if table_rows is None:
            self.rows[table] = list(rows)
        else:
            table_rows.extend(rows)
        self.row_count += len(rows)


@attrs.define
class StoreStats:
    commits: int = 0
    rows_committed: int = 0
    jobs_committed: int = 0
    #: Failed commits and failed probes.
    failures: int = 0
    #: Batches sent again after a failure: once the database answers a probe, or in parts to find a bad job.
    retries: int = 0
    largest_batch: int = 0


@attrs.define
class _Outage:
    """The database failing: since when, how often, what it said last; for the summaries."""

    started: float
    next_summary: float
    attempts: int = 1
    last_error: str = ""


def _abandoned_error() -> ConnectionError:
    return ConnectionError("store stopped before the database came back")


def _first_line(error: BaseException | None) -> str:
    """What a summary says of an error: drivers' messages run to several lines."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else repr(error)


def _settle_all(waiters: list[Settle], failure: Failure | None) -> None:
    """Tell each of ``waiters`` in order; one that raises is logged and the others are still told.

    A waiter is the owner's callback, not a Deferred that would swallow its error: an error
    here must not stop the store from settling the rest of a commit and going on.
    """
    for settle in waiters:
        try:
            settle(failure)
        except Exception:
            log.failure("A writer of rows failed on hearing how they ended")


def _fire(d: Deferred[None], failure: Failure | None) -> None:
    """``add_rows``' Deferred told as a waiter of ``add_rows_then``."""
    if failure is None:
        d.callback(None)
    else:
        d.errback(failure)


def _copy_failed(connection: Connection, cursor: Any, statement: str, error: DBAPIModule.Error) -> DBAPIError:
    """A driver's error from a COPY as SQLAlchemy would have raised it for a statement it ran.

    The store tells a database that failed (retried) from work that failed (not retried) by
    SQLAlchemy's classes (:func:`is_transient`), and SQLAlchemy wraps only what it runs itself:
    here a lost connection is also invalidated, as SQLAlchemy does, so that it is not reused.
    """
    dialect = connection.dialect
    disconnected = dialect.is_disconnect(error, connection.connection.dbapi_connection, cursor)
    if disconnected:
        connection.invalidate(error)
    wrapped = DBAPIError.instance(
        statement, None, error, dialect.loaded_dbapi.Error, connection_invalidated=disconnected, dialect=dialect,
    )
    assert isinstance(wrapped, DBAPIError)  # only a non-driver error comes back unwrapped
    return wrapped


class _MultiRowInsert:
    """Inserts rows of one table with as few statements as possible.

    SQLAlchemy's Core insert with a list of dicts runs its type processors
    row by row, and the driver's executemany steps SQLite once per row,
    giving up and retaking the GIL each time: with the reactor thread busy
    every retake waits for the interpreter's switch interval, so a commit
    of a few hundred rows took tens of milliseconds (docs/performance.md).
    Here a value shared by consecutive rows (the time of an upload batch or
    of a meter's poll) is bound once and, where the driver's paramstyle
    allows (SQLite's qmark, psycopg's format), rows go in multi-row
    ``INSERT ... VALUES (..), (..)`` statements of power-of-two sizes, so a
    batch of any size is a handful of cached statements.

    On PostgreSQL through psycopg 3 (``postgresql+psycopg://``) the rows go in one
    ``COPY ... FROM STDIN`` instead: no SQL to parse and plan per statement, the
    rows streamed as psycopg's C code formats them (docs/performance.md measures
    it). The COPY runs in the batch's transaction like the inserts, so a
    batch is committed whole or not at all, and its failure is the store's to retry
    or to fail as for an insert (:func:`_copy_failed`).

    Rows are tuples in ``columns`` order.
    """

    #: Host parameters per statement at most: SQLite allows 32,766.
    MAX_PARAMETERS = 32_000

    def __init__(self, engine: Engine, table: Table, columns: tuple[str, ...]) -> None:
        dialect = engine.dialect
        compiled = table.insert().compile(dialect=dialect, column_keys=list(columns))
        self.columns = columns
        self.sql = str(compiled)
        self.positional = bool(compiled.positional)
        if self.positional and list(compiled.positiontup or ()) != list(columns):
            raise RuntimeError(f"unexpected parameter order {compiled.positiontup} for {self.sql}")
        self.multi_row = self.positional and dialect.paramstyle in ("qmark", "format")
        self.max_rows = 1 << ((self.MAX_PARAMETERS // len(columns)).bit_length() - 1)
        head, _, group = self.sql.rpartition("VALUES ")
        self._head, self._group = head + "VALUES ", group.strip()
        self._statements: dict[int, str] = {}
        # Binary columns go as the bytes they are: every driver here (sqlite3, psycopg2, psycopg 3, also
        # for COPY) takes bytes for a BLOB/bytea, and SQLAlchemy's processor only wraps each value in the
        # driver's Binary (a memoryview on SQLite): a call and an object per value, on the writer thread.
        self._processors = [
            (index, processor) for index, name in enumerate(columns)
            if not isinstance(table.c[name].type, LargeBinary)
            and (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        self.copy = dialect.name == "postgresql" and dialect.driver == "psycopg"
        preparer = dialect.identifier_preparer
        # The text format, not the binary one: the server parses and checks every value as for an
        # INSERT (a binary int2 is whatever two bytes psycopg packs: 70000 arrived as 4464), at a
        # client cost of about 2 us a row (binary: 0.5).
        self.copy_sql = (
            f"COPY {preparer.format_table(table)} ({', '.join(preparer.quote(name) for name in columns)}) FROM STDIN"
        )

    def __call__(self, session: Session, rows: list[tuple[Any, ...]]) -> None:
        params = self._bind(rows)
        connection = session.connection()
        if self.copy:
            self._copy(connection, params)
            return
        if not self.multi_row:
            connection.exec_driver_sql(self.sql, params if self.positional else [
                dict(zip(self.columns, row, strict=False)) for row in params])
            return
        start = 0
        while start < len(params):
            size = min(self.max_rows, 1 << ((len(params) - start).bit_length() - 1))
            chunk = params[start : start + size]
            connection.exec_driver_sql(self._statement(size), tuple(value for row in chunk for value in row))
            start += size

    def _copy(self, connection: Connection, params: list[tuple[Any, ...]]) -> None:
        raw = connection.connection  # the pooled DBAPI connection, in the session's transaction
        cursor = raw.cursor()
        try:
            with cursor.copy(self.copy_sql) as copy:
                for row in params:
                    copy.write_row(row)
        except connection.dialect.loaded_dbapi.Error as e:
            raise _copy_failed(connection, cursor, self.copy_sql, e) from e
        finally:
            cursor.close()

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = self._head + ", ".join([self._group] * rows)
        return sql

    def _bind(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if not self._processors:
            return rows
        # Per column, the last value seen and its bound form: one time for many rows.
        last = [(index, processor, None, None) for index, processor in self._processors]
        params: list[tuple[Any, ...]] = []
        for row in rows:
            bound = list(row)
            for slot, (index, processor, seen, seen_bound) in enumerate(last):
                value = bound[index]
                if value is None:
                    continue
                if value is seen:
                    bound[index] = seen_bound
                else:
                    bound[index] = value_bound = processor(value)
                    last[slot] = (index, processor, value, value_bound)
            params.append(tuple(bound))
        return params


class Store(Service):
    """Runs jobs (functions of a Session) off the reactor thread.

    ``write`` and ``add_rows`` (``add_samples``) are serialised on one writer thread and
    group-committed; ``read`` runs on a small pool of reader threads.
    """

    def __init__(self, engine: Engine, reactor: IReactorThreads, clock: IReactorTime | None = None,
                 max_readers: int = 4) -> None:
        self.engine = engine
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self._writer = ThreadPool(1, 1, "dtucenter-db-writer")
        self._readers = ThreadPool(0, max_readers, "dtucenter-db-reader")
        self._queued_jobs: deque[tuple[Job, Deferred[Any]]] = deque()
        #: One entry per add_rows call (a connection's uploads, a meter's poll), or a whole failed batch put back.
        self._queued_rows: deque[tuple[RowsByTable, int, Settle]] = deque()
        self._queued_row_count = 0
        self._in_flight: _Batch | None = None
        self._retry_delay = RETRY_FIRST
        self._retry_call: Any = None
        self._idle_waiters: list[Deferred[None]] = []
        #: Rows ever given to add_rows, and how many of them were committed or failed since: rows
        #: go through in the order they came, so the first ``_rows_settled`` of them are settled.
        self._rows_submitted = 0
        self._rows_settled = 0
        #: flushed() callers: the row count they wait to see settled.
        self._flush_waiters: list[tuple[int, Deferred[None]]] = []
        self._isolate = 0
        #: A kick is due at the reactor's next turn (add_rows_then).
        self._kick_due = False
        #: Rows wait for this call to start the next commit (COMMIT_INTERVAL).
        self._window: Any = None
        #: Tables whose rows go through _MultiRowInsert; other tables' rows through SQLAlchemy.
        self._fast_inserts = {
            SAMPLES: _MultiRowInsert(engine, SAMPLES, SAMPLE_ROW_COLUMNS),
            METER_SAMPLES: _MultiRowInsert(engine, METER_SAMPLES, METER_SAMPLE_COLUMNS),
        }
        self.stats = StoreStats()
        #: Seconds from handing a batch to the writer thread to its commit, for committed batches.
        self.commit_durations = Histogram()
        self._batch_started = 0.0
        self.healthy = True
        self._outage: _Outage | None = None
        #: stopService gave up on the database: what fails now is not retried.
        self._abandoned = False
        #: Seconds stopService waits for the database to take what is queued.
        self.shutdown_grace = 30.0

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._writer.start()
        self._readers.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self.when_idle()
        # A database that is down at shutdown must not hang the process. What is
        # still queued was never acknowledged, so the DTUs will send it again.
        d.addTimeout(self.shutdown_grace, self._clock, onTimeoutCancel=self._abandon_queue)

        def stop_pools(_: object) -> None:
            self._writer.stop()
            self._readers.stop()
            self.engine.dispose()

        d.addBoth(stop_pools)
        return d

    def _abandon_queue(self, result: object, timeout: float) -> None:
        self._abandoned = True
        waiting_to_retry = self._retry_call is not None
        self.cancel_retry()
        if waiting_to_retry and self._in_flight is not None:
            # Not on the writer thread, so ours to fail; one on the thread reports back itself.
            self._requeue(self._in_flight)
            self._in_flight = None
        jobs, rows = len(self._queued_jobs), self._queued_row_count
        if self._in_flight is not None:  # on the writer thread: it fails when it reports back
            jobs, rows = jobs + len(self._in_flight.jobs), rows + self._in_flight.row_count
        log.error(
            "Stopping with the database unwritable for {timeout}s: {jobs} jobs and {rows} unacknowledged rows dropped",
            timeout=timeout, jobs=jobs, rows=rows,
        )
        error = _abandoned_error()
        while self._queued_jobs:
            self._queued_jobs.popleft()[1].errback(error)
        _settle_all([settle for _, _, settle in self._queued_rows], Failure(error))
        self._queued_rows.clear()
        # Those still on the writer thread settle when it reports back.
        self._settled(self._queued_row_count)
        self._queued_row_count = 0

    def when_idle(self) -> Deferred[None]:
        """Fires once everything submitted so far is committed."""
        if not self._busy():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def flushed(self) -> Deferred[None]:
        """Fires once every row given to ``add_rows`` before this call is committed (or given up).

        Unlike ``when_idle`` it does not wait for rows that come later, so it
        fires under any load: what reads the sample tables up to a time (the
        roll-ups, store/retention.py) waits on it to see every row queued before then.
        """
        target = self._rows_submitted
        if self._rows_settled >= target:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._flush_waiters.append((target, d))
        return d

    def _settled(self, rows: int) -> None:
        self._rows_settled += rows
        if not self._flush_waiters:
            return
        ready = [d for target, d in self._flush_waiters if target <= self._rows_settled]
        self._flush_waiters = [(target, d) for target, d in self._flush_waiters if target > self._rows_settled]
        for d in ready:
            d.callback(None)

    def _busy(self) -> bool:
        return bool(self._in_flight or self._queued_jobs or self._queued_rows)

    # -- submitting -------------------------------------------------------------

    def write(self, job: Callable[[Session], T]) -> Deferred[T]:
        """Run ``job`` in the next write transaction; fires with its result after the commit."""
        d: Deferred[T] = Deferred()
        self._queued_jobs.append((job, d))
        self._kick()
        return d

    def add_samples(self, rows: list[SampleRow]) -> Deferred[None]:
        """Insert DTU upload rows (``SampleRow``); fires after they are committed."""
        return self.add_rows(SAMPLES, rows)

    def add_rows(self, table: Table, rows: list[Any]) -> Deferred[None]:
        """Insert rows into ``table`` in the next group commit; fires after they are committed.

        Many small inserts (an upload, a meter's poll) become one insert per
        table and transaction, which is what keeps thousands a second cheap.
        Rows are dicts of column values, except for ``samples`` and
        ``meter_samples``: tuples in ``SAMPLE_ROW_COLUMNS`` and
        ``METER_SAMPLE_COLUMNS`` order, for the bulk insert above.
        """
        d: Deferred[None] = Deferred()
        self.add_rows_then(table, rows, partial(_fire, d))
        return d

    def add_samples_then(self, rows: list[SampleRow], settle: Settle) -> None:
        """``add_samples`` for the upload path: ``settle`` is told the outcome, no Deferred."""
        self.add_rows_then(SAMPLES, rows, settle)

    def add_rows_then(self, table: Table, rows: list[Any], settle: Settle) -> None:
        """``add_rows``, but ``settle(None)`` is called after the commit (or ``settle(failure)``).

        The hot paths' way: the waiters of a group commit are told in one loop, in the order
        they came, with no Deferred and its callback chain per caller (docs/performance.md).
        """
        count = len(rows)
        self._queued_rows.append(({table: rows}, count, settle))
        self._queued_row_count += count
        self._rows_submitted += count
        if self._in_flight is None and self._retry_call is None and self._window is None and not self._kick_due:
            # An idle writer starts once the reactor has read what this turn of its loop brought:
            # the uploads of every connection that was readable go in one commit, not one each.
            self._kick_due = True
            self._reactor.callFromThread(self._kick_soon)

    def _kick_soon(self) -> None:
        self._kick_due = False
        self._kick()

    def read(self, job: Callable[[Session], T]) -> Deferred[T]:
        def run() -> T:
            with Session(self.engine) as session:
                return job(session)

        return deferToThreadPool(self._reactor, self._readers, run)

    def maintain(self, job: Callable[[Session], T]) -> Deferred[T]:
        """Run ``job`` in a transaction of its own on a reader thread, committed when it returns.

        For background upkeep (roll-ups, expiry): beside the writer, not in its
        group commits, so a slow or failing upkeep step never holds up an upload's
        acknowledgement; keep each step short, as on SQLite it takes the write lock.
        """
        def run() -> T:
            with Session(self.engine) as session, session.begin():
                return job(session)

        return deferToThreadPool(self._reactor, self._readers, run)

    @property
    def backlog(self) -> int:
        """Rows waiting for a transaction, for the operator's eyes."""
        return self._queued_row_count

    @property
    def queued_jobs(self) -> int:
        """Write jobs (not rows) waiting for a transaction."""
        return len(self._queued_jobs)

    # -- the writer ---------------------------------------------------------------

    def _kick(self) -> None:
        if self._in_flight is None and self._retry_call is None:
            if self._window is not None:
                if not self._queued_jobs:
                    return  # rows wait for the window to close; a job (a login) does not
                self._window.cancel()
                self._window = None
            self._start_batch(self._take_batch())

    def _window_closed(self) -> None:
        self._window = None
        self._kick()

    def _take_batch(self) -> _Batch:
        batch = _Batch()
        if self._isolate > 0:
            # A mixed batch failed for a reason of its own: find the culprit by committing parts alone.
            self._isolate -= 1
            if self._queued_jobs:
                batch.jobs.append(self._queued_jobs.popleft())
                return batch
        else:
            while self._queued_jobs and len(batch.jobs) < MAX_BATCH_JOBS:
                batch.jobs.append(self._queued_jobs.popleft())
        queue, waiters = self._queued_rows, batch.row_waiters
        while queue and (not batch.row_count or batch.row_count + queue[0][1] <= MAX_BATCH_ROWS):
            rows, count, settle = queue.popleft()
            self._queued_row_count -= count
            for table, table_rows in rows.items():
                batch.add_rows(table, table_rows)
            waiters.append(settle)
        return batch

    def _start_batch(self, batch: _Batch) -> None:
        if not batch:
            self._in_flight = None
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
            return
        self._in_flight = batch
        self._batch_started = self._clock.seconds()
        committed: Deferred[list[Any]] = deferToThreadPool(self._reactor, self._writer, self._commit, batch)
        committed.addCallbacks(self._committed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _commit(self, batch: _Batch) -> list[Any]:
        with Session(self.engine) as session, session.begin():
            results = [job(session) for job, _ in batch.jobs]
            for table, rows in batch.rows.items():
                insert = self._fast_inserts.get(table)
                if insert is not None:
                    insert(session, rows)
                else:
                    session.connection().execute(table.insert(), rows)
        return results

    def _committed(self, results: list[Any], batch: _Batch) -> None:
        outage, self._outage = self._outage, None
        if outage is not None:
            log.info(
                "Database is writable again after {seconds:.1f}s and {attempts} failed attempts; "
                "{rows} rows were waiting",
                seconds=self._clock.seconds() - outage.started, attempts=outage.attempts,
                rows=batch.row_count + self.backlog,
            )
        self.healthy = True
        self._retry_delay = RETRY_FIRST
        self.stats.commits += 1
        self.stats.rows_committed += batch.row_count
        self.stats.jobs_committed += len(batch.jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, batch.row_count)
        self.commit_durations.record(self._clock.seconds() - self._batch_started)
        self._in_flight = None
        # Counted first, so that what a waiter does next already sees these rows as settled.
        self._settled(batch.row_count)
        for (_, d), result in zip(batch.jobs, results, strict=False):
            d.callback(result)
        _settle_all(batch.row_waiters, None)
        wait = self._batch_started + COMMIT_INTERVAL - self._clock.seconds()
        if wait > 0 and self._queued_rows and not self._queued_jobs and self._queued_row_count < MAX_BATCH_ROWS:
            # Rows keep coming: let more of them join the next commit rather than pay a commit for a few.
            self._window = self._clock.callLater(wait, self._window_closed)
        else:
            self._kick()

    def _failed(self, failure: Failure, batch: _Batch) -> None:
        self.stats.failures += 1
        if lost_to_another_writer(failure.value) and not self._abandoned:
            # Retried at once, each job in a transaction of its own: a login or an offline mark
            # locks one DTU row, so alone it cannot close a cycle with the other writer again
            # (retried whole, both batches met again and again, for minutes).
            self.stats.retries += 1
            self._in_flight = None
            parts = len(batch.jobs) + (1 if batch.rows else 0)
            self._requeue(batch)
            if parts > 1:
                self._isolate = max(self._isolate, parts)
            log.info(
                "Database write of {jobs} jobs and {rows} rows crossed another writer's ({error}); "
                "retrying them one transaction each", jobs=len(batch.jobs), rows=batch.row_count,
                error=_first_line(failure.value),
            )
            self._kick()
            return
        if is_transient(failure.value) and self._abandoned:
            self._in_flight = None
            self._fail_batch(batch, Failure(_abandoned_error()))
            return
        if is_transient(failure.value):
            self.healthy = False
            if self._outage is None:
                now = self._clock.seconds()
                self._outage = _Outage(now, now + SUMMARY_INTERVAL, last_error=_first_line(failure.value))
                log.failure(
                    "Database write of {jobs} jobs and {rows} rows failed; probing the database every "
                    "{most:.0f}s at most and retrying once it answers",
                    failure, jobs=len(batch.jobs), rows=batch.row_count, most=RETRY_MAX,
                )
            else:
                self._note_failure(failure)
            self._schedule_probe(batch)
            return
        self._in_flight = None
        parts = len(batch.jobs) + (1 if batch.rows else 0)
        if parts > 1:
            self.stats.retries += 1
            self._requeue(batch)
            self._isolate = parts
        else:
            log.failure("Database write failed and will not be retried", failure)
            self._fail_batch(batch, failure)
        self._kick()

    def _fail_batch(self, batch: _Batch, failure: Failure) -> None:
        self._settled(batch.row_count)
        for _, d in batch.jobs:
            d.errback(failure)
        _settle_all(batch.row_waiters, failure)

    def _requeue(self, batch: _Batch) -> None:
        self._queued_jobs.extendleft(reversed(batch.jobs))
        if batch.rows:
            self._queued_rows.appendleft((batch.rows, batch.row_count, partial(_settle_all, batch.row_waiters)))
            self._queued_row_count += batch.row_count

    def _schedule_probe(self, batch: _Batch) -> None:
        self._retry_call = self._clock.callLater(self._retry_delay, self._probe, batch)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _probe(self, batch: _Batch) -> None:
        """Ask the database whether it answers at all before sending it the batch again."""
        self._retry_call = None
        answered: Deferred[None] = deferToThreadPool(self._reactor, self._writer, self._ping)
        answered.addCallbacks(lambda _: self._retry(batch), self._probe_failed, errbackArgs=(batch,))

    def _retry(self, batch: _Batch) -> None:
        self.stats.retries += 1
        self._start_batch(batch)

    def _ping(self) -> None:
        # A connection from the pool is checked (pool_pre_ping) or new: a dead one is replaced, not reused.
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def _probe_failed(self, failure: Failure, batch: _Batch) -> None:
        if self._abandoned:
            self._in_flight = None
            self._fail_batch(batch, Failure(_abandoned_error()))
            return
        self.stats.failures += 1
        self._note_failure(failure)
        self._schedule_probe(batch)

    def _note_failure(self, failure: Failure) -> None:
        """One more failed attempt in this outage: counted, and summarised now and then, never logged each."""
        outage = self._outage
        assert outage is not None  # only called once an outage began
        outage.attempts += 1
        outage.last_error = _first_line(failure.value)
        now = self._clock.seconds()
        if now >= outage.next_summary:
            outage.next_summary = now + SUMMARY_INTERVAL
            log.warn(
                "Database still failing after {seconds:.0f}s ({attempts} attempts; last: {error}); "
                "{rows} rows waiting",
                seconds=now - outage.started, attempts=outage.attempts, error=outage.last_error,
                rows=self.backlog + (self._in_flight.row_count if self._in_flight else 0),
            )

    def cancel_retry(self) -> None:
        """For tests and shutdown: stop waiting for a database that will not come back."""
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
