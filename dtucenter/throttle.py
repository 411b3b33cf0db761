"""Slowing down peers that keep failing to log in, for every listener that authenticates."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class LoginThrottle:
    """Slows down peers that keep failing to log in: after ``threshold`` failures
    in a row an address is refused outright for a while, twice as long on each
    further failure, up to ``max_block`` seconds. A good login forgives it."""

    def __init__(
        self, clock: IReactorTime, *, threshold: int = 3, block: float = 10.0,
        max_block: float = 600.0, max_tracked: int = 10_000,
    ) -> None:
        self._clock = clock
        self._threshold = threshold
        self._block = block
        self._max_block = max_block
        self._max_tracked = max_tracked
        self._failures: dict[str, tuple[int, float]] = {}  # host -> (count, blocked until)

    def blocked(self, host: str) -> bool:
        entry = self._failures.get(host)
        return entry is not None and self._clock.seconds() < entry[1]

    def failed(self, host: str) -> float:
        """Count a failure; returns for how long the host is now refused (0 if not)."""
        count, _ = self._failures.pop(host, (0, 0.0))
        count += 1
        block = 0.0
        if count >= self._threshold:
            block = min(self._block * 2 ** (count - self._threshold), self._max_block)
        if len(self._failures) >= self._max_tracked:
            # dicts keep insertion order and a failing host is re-inserted, so
            # the first entry is the one that failed longest ago.
            self._failures.pop(next(iter(self._failures)))
        self._failures[host] = (count, self._clock.seconds() + block)
        return block

    def succeeded(self, host: str) -> None:
        self._failures.pop(host, None)
