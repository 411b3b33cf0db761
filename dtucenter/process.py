"""The center as a process of its own under twistd: a bounded log file, and what each signal does.

Only ``twistd dtucenter`` uses this (through ``dtucenter.tap.makeService``); tests that run the
center inside their own process leave their signal handlers and logging alone.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver, Logger, textFileLogObserver
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from dtucenter.config import Settings

log = Logger()

#: twistd's name for the log file of a daemon given no ``--logfile``.
TWISTD_DEFAULT_LOGFILE = "twistd.log"


def bounded_log_file(twistd_options: Mapping[str, Any], rotate_length: int, keep: int) -> LogFile | None:
    """The log file twistd would open for these options, rotated at ``rotate_length`` bytes
    and with at most ``keep`` rotated files; None where twistd logs elsewhere.

    Mirrors ``twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver``, whose own
    LogFile keeps every rotated file for ever. Elsewhere means: ``--logger`` (the operator's
    own observer), ``--syslog``, or stdout (``--logfile=-``, or ``-n`` without ``--logfile``).
    """
    logfile: str = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if twistd_options.get("logger") or twistd_options.get("syslog") or logfile == "-" or (nodaemon and not logfile):
        return None
    bounded: LogFile = LogFile.fromFullPath(
        logfile or TWISTD_DEFAULT_LOGFILE, rotateLength=rotate_length, maxRotatedFiles=keep
    )
    return bounded


class OwnProcess(MultiService):
    """Wraps the center's top service for twistd, which attaches it to its application.

    - Gives the application a log observer writing to ``log_file`` (when not None), which
      twistd's logger then uses instead of its own unbounded file; SIGUSR1 rotates it, as
      twistd's own file.
    - SIGTERM and SIGINT stop the reactor, which stops every service (connections closed,
      queued writes flushed), and the process exits with status 0: twistd would re-raise the
      signal at exit, which reads as a crash to a supervisor.
    - SIGHUP does not kill: it reopens the log file (for external rotation tools), then
      reloads the config file (``reload``: ``dtucenter.reload.Reloader.reload``).
    - Says when everything has stopped, the last line of a clean stop.
    """

    def __init__(
        self, center: MultiService, reactor: Any, log_file: LogFile | None,
        reload: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.log_file = log_file
        self._reload = reload
        self._stopping = False
        center.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd's AppLogger.start asks the application for an ILogObserver component after this.
        if self.log_file is not None and isinstance(parent, Componentized):
            # A LogFile is file-like enough (write, flush): twistd passes its own to this very function.
            observer = textFileLogObserver(self.log_file)  # type: ignore[arg-type]
            parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        if self.log_file is not None and not signal.getsignal(signal.SIGUSR1):
            signal.signal(signal.SIGUSR1, self._rotate)
        signal.signal(signal.SIGHUP, self._hangup)
        # After the reactor's own SIGTERM and SIGINT handlers, which it installs as it starts running.
        self._reactor.callWhenRunning(self._install_stop_handlers)
        super().privilegedStartService()

    def _install_stop_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._shut_down)
        signal.signal(signal.SIGINT, self._shut_down)

    # Python runs these between two bytecodes of the reactor thread; the work itself is
    # passed to the reactor, which callFromThread also wakes.

    def _shut_down(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._stop_reactor, signal.Signals(number).name)

    def _stop_reactor(self, name: str) -> None:
        if self._stopping:
            log.info("received {signal}, already shutting down", signal=name)
            return
        self._stopping = True
        log.info("received {signal}, shutting down", signal=name)
        self._reactor.stop()

    def _hangup(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._reopen_log_and_reload)

    def _reopen_log_and_reload(self) -> None:
        self._reopen_log()
        if self._reload is not None:
            self._reload()  # logs its own outcome and errors

    def apply_log_settings(self, settings: Settings) -> None:
        """A reload's ``log_rotate_size`` and ``log_keep``, for the next rotation."""
        if self.log_file is not None:
            self.log_file.rotateLength = settings.log_rotate_size
            self.log_file.maxRotatedFiles = settings.log_keep

    def _reopen_log(self) -> None:
        if self.log_file is None:
            log.info("received SIGHUP: no log file to reopen (logging to stdout, syslog or an observer of its own)")
            return
        self.log_file.reopen()
        log.info("received SIGHUP: reopened the log file {path}", path=self.log_file.path)

    def _rotate(self, number: int, frame: FrameType | None) -> None:
        if self.log_file is not None:
            self._reactor.callFromThread(self.log_file.rotate)

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = maybeDeferred(super().stopService)

        def said(_: object) -> None:
            log.info("dtucenter stopped")

        return stopped.addCallback(said)
