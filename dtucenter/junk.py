"""What a connection's junk costs: counted, summarised at a bounded rate, and cut off.

A peer that streams junk must cost the center a count per kind, not a log line
per bad frame, and a stream that is mostly junk must end. Both protocol halves
(DTU sessions, Modbus links) keep one :class:`JunkWindow` and one
:class:`ProblemSummary` per connection and log what these say is due.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IReactorTime

#: A connection is mostly junk when, over the window, it sent more junk than this...
DEFAULT_JUNK_LIMIT = 256 * 1024
#: ...and more junk than valid bytes, over this many seconds.
DEFAULT_JUNK_WINDOW = 60.0
#: At most one summary line per connection per this many seconds.
DEFAULT_REPORT_INTERVAL = 60.0


class JunkWindow:
    """Junk and valid bytes of one stream over a sliding window.

    Two fixed buckets of ``window`` seconds, the older one weighted by how much
    of it still overlaps the window (the estimate EMQX and NGINX use for rate
    limits): constant memory and time per read.
    """

    def __init__(self, clock: IReactorTime, *, window: float = DEFAULT_JUNK_WINDOW,
                 limit: int = DEFAULT_JUNK_LIMIT) -> None:
        self._clock = clock
        self.window = window
        self.limit = limit
        self._started = clock.seconds()
        self._current = [0, 0]  # junk, valid
        self._previous = [0, 0]

    def add(self, junk: int, valid: int) -> None:
        self._roll()
        self._current[0] += junk
        self._current[1] += valid

    def totals(self) -> tuple[int, int]:
        """Junk and valid bytes in the last ``window`` seconds, estimated."""
        self._roll()
        weight = max(0.0, 1.0 - (self._clock.seconds() - self._started) / self.window)
        junk = self._current[0] + int(self._previous[0] * weight)
        valid = self._current[1] + int(self._previous[1] * weight)
        return junk, valid

    @property
    def mostly_junk(self) -> bool:
        junk, valid = self.totals()
        return junk > self.limit and junk > valid

    def _roll(self) -> None:
        elapsed = self._clock.seconds() - self._started
        if elapsed < self.window:
            return
        # One window on: the current bucket becomes the previous one; more: both are stale.
        self._previous = self._current if elapsed < 2 * self.window else [0, 0]
        self._current = [0, 0]
        self._started += self.window * (elapsed // self.window)


class ProblemSummary:
    """A connection's problems counted per kind, and when a summary of them is due.

    A summary is due at the first problem and then at most once per ``interval``
    seconds; the owner logs it (with :meth:`take`) when :attr:`due`, and once
    more when the connection ends if anything is left untold.
    """

    def __init__(self, clock: IReactorTime, *, interval: float = DEFAULT_REPORT_INTERVAL) -> None:
        self._clock = clock
        self.interval = interval
        #: Every problem since the connection began, per kind.
        self.totals: Counter[str] = Counter()
        self._untold: Counter[str] = Counter()
        self._since = clock.seconds()
        self._told_at: float | None = None
        #: The first problem not told yet, as text: an example for the summary line.
        self.example = ""

    def add(self, kind: str, count: int = 1, example: object = None) -> None:
        if not count:
            return
        self.totals[kind] += count
        if not self._untold:
            self._since = self._clock.seconds()
        self._untold[kind] += count
        if example is not None and not self.example:
            self.example = str(example)

    @property
    def untold(self) -> bool:
        return bool(self._untold)

    @property
    def due(self) -> bool:
        if not self._untold:
            return False
        return self._told_at is None or self._clock.seconds() - self._told_at >= self.interval

    def take(self) -> tuple[Counter[str], float, str]:
        """The untold counts, the seconds they span, an example; they are told from now on."""
        now = self._clock.seconds()
        told, self._untold = self._untold, Counter()
        start = self._since if self._told_at is None else self._told_at
        example, self.example = self.example, ""
        self._told_at = now
        return told, now - start, example


def describe_problems(counts: Counter[str], skipped_kind: str) -> str:
    """``"5,321 bad frames (BadChecksum 5,000, OversizedFrame 321), 1.2 MB skipped"``."""
    frames = {kind: n for kind, n in counts.items() if kind != skipped_kind}
    parts = []
    if frames:
        detail = ", ".join(f"{kind} {n:,}" for kind, n in sorted(frames.items()))
        total = sum(frames.values())
        parts.append(f"{total:,} bad frame{'s' if total != 1 else ''} ({detail})")
    skipped = counts.get(skipped_kind, 0)
    if skipped:
        parts.append(f"{format_bytes(skipped)} skipped")
    return ", ".join(parts) or "nothing"


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"
