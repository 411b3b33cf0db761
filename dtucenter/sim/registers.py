"""The register table behind a virtual DTU: (dev, addr) -> value, drifting over time."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from dtucenter.dtu import wire

INT16_MIN, INT16_MAX = -32768, 32767


class RegisterTable:
    """Values a DTU would read from the slaves on its serial bus.

    Every register exists: one never written starts at a value derived from
    its address, as a meter's register would hold something. Drift is a
    bounded random walk, so consecutive uploads differ the way real
    readings do.
    """

    def __init__(self, rng: random.Random, drift_step: int = 3) -> None:
        self._rng = rng
        self._drift_step = drift_step
        self._values: dict[tuple[int, int], int] = {}

    def get(self, dev: int, addr: int) -> int:
        key = (dev, addr)
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = (dev * 1000 + addr * 10) % 30000
        return value

    def set(self, dev: int, addr: int, value: int) -> None:
        if not INT16_MIN <= value <= INT16_MAX:
            raise ValueError(f"register value {value} out of -32768..32767")
        self._values[(dev, addr)] = value

    def read(self, registers: Iterable[wire.Register]) -> tuple[int, ...]:
        return tuple(self.get(r.dev, r.addr) for r in registers)

    def nudge(self, registers: Sequence[wire.Register], probability: float) -> None:
        """With ``probability``, move one register by a small step: the cheap drift of periodic uploads."""
        if not registers or self._rng.random() >= probability:
            return
        r = registers[self._rng.randrange(len(registers))]
        value = self.get(r.dev, r.addr) + self._rng.randint(-self._drift_step, self._drift_step)
        self._values[(r.dev, r.addr)] = min(INT16_MAX, max(INT16_MIN, value))

    def drift(self, registers: Iterable[wire.Register], probability: float) -> bool:
        """Move each register by a small step with ``probability``; True if any changed."""
        changed = False
        rng = self._rng
        step = self._drift_step
        for r in registers:
            if rng.random() >= probability:
                continue
            value = self.get(r.dev, r.addr) + rng.randint(-step, step)
            value = min(INT16_MAX, max(INT16_MIN, value))
            if value != self._values[(r.dev, r.addr)]:
                self._values[(r.dev, r.addr)] = value
                changed = True
        return changed


def default_register_list(count: int) -> tuple[wire.Register, ...]:
    """Slave 1, holding registers 0..count-1: what a DTU fresh from the box uploads."""
    return tuple(wire.Register(1, addr) for addr in range(count))
