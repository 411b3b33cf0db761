"""Answers written a piece at a time at the pace the client reads them: event streams and CSV exports.

``Paced`` is the request's push producer: twisted.web pauses it when the
connection's send buffer fills and resumes it when the client has read, so
a writer that waits on ``drained()`` between pieces never buffers more than
one piece for a slow client.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from zope.interface import implementer


@implementer(IPushProducer)
class Paced:
    """Registered as ``request``'s streaming producer; ``paused`` while the client is behind."""

    def __init__(self, request: server.Request, on_resume: Callable[[], None] | None = None) -> None:
        self.request = request
        #: Called when the client has caught up, to write what waited meanwhile.
        self.on_resume = on_resume
        self.paused = False
        #: The client went away (or the request was finished): write nothing more.
        self.stopped = False
        self._waiting: list[Deferred[None]] = []
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(lambda _: self.stopProducing())

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.on_resume is not None and not self.stopped:
            self.on_resume()
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def gone(self) -> bool:
        """Whether to stop writing: the client went away or the answer is finished (a call, read anew each time)."""
        return self.stopped

    def drained(self) -> Deferred[None]:
        """Fires once the client has caught up (at once if it has), or it went away: check ``gone()``."""
        if not self.paused or self.stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def finish(self) -> None:
        """Ends the answer, unless the client is gone already."""
        if not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()
