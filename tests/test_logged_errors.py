"""The autouse ``expected_errors`` fixture (tests/conftest.py), run on a small test file in a pytest of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support import run_process

ROOT = Path(__file__).resolve().parents[1]

TESTS = '''
import gc

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.logger import Logger

log = Logger()


def divide_by_zero():
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("while dividing")


def test_logs_an_error():
    log.error("something broke")


def test_logs_a_failure():
    divide_by_zero()


def test_drops_a_failed_deferred_only_the_collector_frees():
    gc.disable()  # the fixture's own collection at teardown must find it
    d = defer.fail(KeyError("lost"))
    d.myself = d


@pytest_twisted.ensureDeferred
async def test_logs_an_error_from_the_reactor():
    await task.deferLater(reactor, 0, log.error, "from a delayed call")


@pytest_twisted.ensureDeferred
async def test_logs_an_error_from_a_thread():
    await threads.deferToThread(log.error, "from a worker thread")


def test_logs_below_error_only():
    log.info("all fine")
    log.warn("a little odd")


@pytest.mark.expected_errors("while dividing", error=ZeroDivisionError)
def test_marks_the_error_it_logs():
    divide_by_zero()


def test_declares_the_error_it_logs(expected_errors):
    expected_errors.expect("something broke")
    log.error("something broke")


@pytest.mark.expected_errors(error=ZeroDivisionError)
def test_expects_an_error_that_never_comes():
    pass


@pytest.mark.expected_errors(error=KeyError)
def test_logs_another_error_than_it_expects():
    divide_by_zero()


@pytest.mark.expected_errors(error=ZeroDivisionError)
def test_fails_before_its_expected_error():
    assert False, "failed first"
'''


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> pytest.LineMatcher:
    """One run of the small test file for all the checks below (a pytest start takes a second or two)."""
    where = tmp_path_factory.mktemp("logged_errors")
    (where / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (where / "test_small.py").write_text(TESTS)
    result = run_process(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "test_small.py"],
        cwd=where, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    return pytest.LineMatcher(result.stdout.splitlines())


def listed_as(output: pytest.LineMatcher, outcome: str) -> set[str]:
    """The tests ``-rA`` lists as PASSED, FAILED or ERROR."""
    return {line.split()[1].split("::")[1] for line in output.lines if line.startswith(f"{outcome} ")}


def test_an_error_logged_from_the_test_the_reactor_or_a_thread_fails_the_test(output: pytest.LineMatcher) -> None:
    assert listed_as(output, "ERROR") == {
        "test_logs_an_error",
        "test_logs_a_failure",
        "test_drops_a_failed_deferred_only_the_collector_frees",
        "test_logs_an_error_from_the_reactor",
        "test_logs_an_error_from_a_thread",
        "test_expects_an_error_that_never_comes",
        "test_logs_another_error_than_it_expects",
    }
    output.fnmatch_lines([
        "*ERROR at teardown of test_logs_an_error *",
        "logged an unexpected error:",
        "*something broke",
    ])
    output.fnmatch_lines([
        "*ERROR at teardown of test_drops_a_failed_deferred_only_the_collector_frees*",
        "logged an unexpected error:",
        "Unhandled error in Deferred: *",
        "*KeyError: 'lost'",
    ])
    output.fnmatch_lines(["*from a delayed call"])
    output.fnmatch_lines(["*from a worker thread"])


def test_an_expected_error_must_be_logged_and_no_other(output: pytest.LineMatcher) -> None:
    # A test whose teardown errs still passed its call, so it is in both lists.
    assert {"test_logs_below_error_only", "test_marks_the_error_it_logs", "test_declares_the_error_it_logs"} <= (
        listed_as(output, "PASSED") - listed_as(output, "ERROR")
    )
    output.fnmatch_lines([
        "*ERROR at teardown of test_expects_an_error_that_never_comes*",
        "expected a logged error ZeroDivisionError, none was logged",
    ])
    output.fnmatch_lines([
        "*ERROR at teardown of test_logs_another_error_than_it_expects*",
        "logged an unexpected error:",
        "*while dividing",
        "*",
        "*ZeroDivisionError*",
        "*",
        "expected a logged error KeyError, none was logged",
    ])


def test_a_test_that_failed_is_not_also_blamed_for_its_missing_error(output: pytest.LineMatcher) -> None:
    assert listed_as(output, "FAILED") == {"test_fails_before_its_expected_error"}
    output.fnmatch_lines(["E * AssertionError: failed first"])
    assert "test_fails_before_its_expected_error" not in listed_as(output, "ERROR")
