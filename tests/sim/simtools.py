"""Helpers shared by the simulator's end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater


@inlineCallbacks
def wait_for(condition: Callable[[], bool], what: str, tries: int = 200) -> Any:
    """Checks ``condition`` every 50 ms (the reactor runs meanwhile); fails after ``tries``."""
    for _ in range(tries):
        if condition():
            return
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")
