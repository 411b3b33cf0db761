from __future__ import annotations

import gc
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import attrs
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from twisted.logger import ILogObserver, LogEvent, LogLevel, eventAsText, formatEvent, globalLogPublisher
from zope.interface import implementer

from dtucenter.store.models import Base
from dtucenter.store.schema import VALUES_VIEW

#: A PostgreSQL URL the tests may wipe; .ci/run starts a server and sets it.
POSTGRES_URL = os.environ.get("DTUCENTER_TEST_POSTGRES")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against the embedded default and the production database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'center.db'}"
    return emptied(postgres_url())


def postgres_url() -> str:
    """The scratch PostgreSQL database's URL; the test is skipped without one (failed in CI)."""
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: DTUCENTER_TEST_POSTGRES is not set")
        pytest.skip("set DTUCENTER_TEST_POSTGRES to a scratch database URL to run against PostgreSQL")
    return POSTGRES_URL


def emptied(url: str) -> str:
    """``url``, its database emptied of the center's tables."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP VIEW IF EXISTS {VALUES_VIEW}")  # it depends on samples
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")  # else the next test's is at head
    engine.dispose()
    return url


@pytest.fixture
def postgres_urls() -> tuple[str, str]:
    """The scratch PostgreSQL database, emptied, through psycopg 3 (whose store COPYs samples) and
    through psycopg2 (whose store INSERTs them): the same database, both drivers."""
    url = make_url(postgres_url())
    psycopg = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    psycopg2 = url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return emptied(psycopg), psycopg2


# -- errors logged during a test fail it, as under trial -------------------------------------------

#: The first of the two events Twisted logs for a Deferred collected with a failure; the second carries the Failure.
_UNHANDLED_HEADER = "Unhandled error in Deferred:"


def _is_error(event: LogEvent) -> bool:
    if event.get("log_format") == _UNHANDLED_HEADER and "log_failure" not in event:
        return False
    return "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical)


def _describe(event: LogEvent) -> str:
    text = eventAsText(event, includeTimestamp=False).rstrip()
    if event.get("log_namespace") == "twisted.internet.defer" and "log_failure" in event:
        return f"{_UNHANDLED_HEADER} {text}"
    return text


@attrs.define
class _Expected:
    message: str | None
    error: type[BaseException] | None
    seen: int = 0

    def matches(self, event: LogEvent) -> bool:
        if self.error is not None:
            failure = event.get("log_failure")
            if failure is None or not failure.check(self.error):
                return False
        return self.message is None or self.message in (formatEvent(event) + " " + _describe(event))

    def __str__(self) -> str:
        parts = [self.error.__name__] if self.error else []
        if self.message is not None:
            parts.append(f"with {self.message!r}")
        return " ".join(parts)


@implementer(ILogObserver)
@attrs.define
class LoggedErrors:
    """Every error (a failure, or a level of error or above) logged while a test runs, from any thread."""

    events: list[LogEvent] = attrs.Factory(list)
    expected: list[_Expected] = attrs.Factory(list)

    def __call__(self, event: LogEvent) -> None:
        if _is_error(event):
            self.events.append(event)

    def expect(self, message: str | None = None, *, error: type[BaseException] | None = None) -> None:
        """The test logs this error on purpose: a text containing ``message`` and/or a Failure of type ``error``.

        Every logged error must match one expectation, and every expectation must match a logged error.
        """
        assert error is not None or message is not None, "expect an error type, a message or both"
        self.expected.append(_Expected(message, error))

    def problems(self, test_passed: bool) -> list[str]:
        found = []
        for event in self.events:
            matching = [e for e in self.expected if e.matches(event)]
            for expectation in matching:
                expectation.seen += 1
            if not matching:
                found.append(f"logged an unexpected error:\n{_describe(event)}")
        if test_passed:  # a test that failed or was skipped may not have got as far as the error
            found.extend(f"expected a logged error {e}, none was logged" for e in self.expected if not e.seen)
        return found


_CALL_PASSED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expected_errors(message=None, *, error=None): the test logs this error on purpose"
        " (LoggedErrors.expect); one mark per expected error",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


@pytest.fixture(autouse=True)
def expected_errors(request: pytest.FixtureRequest) -> Iterator[LoggedErrors]:
    """Fails the test (at its teardown) if it logged an error it did not declare, or did not log one it did.

    A test declares an error with ``@pytest.mark.expected_errors("text", error=SomeError)`` or by calling
    ``expected_errors.expect(...)`` on this fixture.

    Autouse, so it is set up before the test's other function-scoped fixtures and torn down after them: errors
    they log while starting or stopping count too. The observer sits on the global log publisher, which every
    thread logs to (the test and the reactor share the main thread under pytest-twisted; the store's threads
    log there as well). A Deferred that is dropped with a failure logs when it is freed, which for one in a
    reference cycle is only at a collection: so this collects before it looks.
    """
    logged = LoggedErrors()
    for mark in request.node.iter_markers("expected_errors"):
        logged.expect(*mark.args, **mark.kwargs)
    globalLogPublisher.addObserver(logged)
    try:
        yield logged
        gc.collect()
        # What outlived the test is frozen out of later collections, so the next teardown's collection
        # looks at that test's objects only (milliseconds instead of ~60 ms for the whole heap, as
        # tune_garbage_collector does for the center). A cycle frozen here is never collected: a leak of
        # the test run, bounded by what tests leave behind.
        gc.freeze()
    finally:
        globalLogPublisher.removeObserver(logged)
    problems = logged.problems(test_passed=request.node.stash.get(_CALL_PASSED, False))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
