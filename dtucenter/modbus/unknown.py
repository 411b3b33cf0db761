"""What the shared listener does with a registration no link takes: a rule's or the policy's
adoption on first contact, a pending device whose connection is held open, or a refusal.

A held connection is kept open with what it sends dropped (heartbeats included), so that
once the device is adopted (through the API, the CLI's next start, or a rule) the bridge
hands the very same connection to the new link's master: the DTU does not have to
reconnect. Held connections are bounded in all and per source host; past a bound the
connection is closed (its device stays pending, and the DTU redials).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.discovery import MODBUS, PendingBook, PendingDevice
from dtucenter.modbus.rules import (
    MAX_RULE_REGISTRATION,
    Adoption,
    RegistrationRule,
    UnknownPolicy,
    rule_for_received,
)

if TYPE_CHECKING:
    from dtucenter.modbus.links import Link

log = Logger()


class Holdable(Protocol):
    """A connection the listener can keep open and later hand to a link."""

    host: str
    peer: str

    def hand_to(self, link: Link) -> None: ...

    def close(self) -> None: ...


class Adopter(Protocol):
    """Makes the link (and its meter) for an adoption on first contact: rows first, then the
    bridge's ``add_link``, which hands the held connection over. Fires once done."""

    def adopt_registration(self, registration: bytes, adoption: Adoption, why: str) -> defer.Deferred[None]: ...


@attrs.frozen
class HeldLimits:
    total: int = 1_000
    per_host: int = 100


class UnknownRegistrations:
    """Decides about each unknown registration on the shared listener and keeps the held connections."""

    def __init__(
        self, policy: UnknownPolicy, rules: Sequence[RegistrationRule], book: PendingBook | None,
        limits: HeldLimits = HeldLimits(), listener: str = "modbus",
    ) -> None:
        self.policy = policy
        self.rules = tuple(rules)
        self.book = book
        self.limits = limits
        self.listener = listener
        self.adopter: Adopter | None = None
        self._held: dict[bytes, Holdable] = {}
        self._held_per_host: Counter[str] = Counter()
        if book is not None:
            book.when_forgotten(self._forgotten)

    @property
    def considered(self) -> bool:
        """Whether an unknown registration is worth reading to its end (else it is refused at once)."""
        holds = self.policy.action == "pending" and self.book is not None
        return holds or self.policy.adoption is not None or bool(self.rules)

    @property
    def held(self) -> int:
        return len(self._held)

    def decide(self, received: bytes, connection: Holdable) -> bool:
        """``received`` (what the connection sent, bounded) names an unknown device: hold the
        connection (True), or say it is to be refused (False)."""
        matched = rule_for_received(self.rules, received)
        if matched is not None:
            registration, rule = matched
            return self._adopt(registration, rule.adoption(), f"rule {rule.match.written}", connection)
        registration = received[:MAX_RULE_REGISTRATION]
        if self.policy.adoption is not None:
            return self._adopt(registration, self.policy.adoption, f"policy {self.policy}", connection)
        if self.policy.action != "pending" or self.book is None:
            return False
        device = self.book.sighted(
            MODBUS, registration, host=connection.host, peer=connection.peer, listener=self.listener,
            first_bytes=received,
        )
        return device is not None and self._hold(registration, connection)

    def take(self, registration: bytes) -> Holdable | None:
        """The connection held for ``registration``, released to be handed to its new link."""
        connection = self._held.pop(registration, None)
        if connection is not None:
            self._count_off(connection)
        return connection

    def claim(self, registration: bytes) -> Holdable | None:
        """A link now takes ``registration`` (adopted, or made through the API or a reload): it is
        no longer pending, and its held connection, if any, is released to be handed to the link."""
        connection = self.take(registration)
        if self.book is not None:
            device = self.book.find(MODBUS, registration)
            if device is not None:
                self.book.forget(device.id)
        return connection

    def release(self, connection: Holdable) -> None:
        """A held connection went away."""
        for registration, held in self._held.items():
            if held is connection:
                del self._held[registration]
                self._count_off(connection)
                return

    def _hold(self, registration: bytes, connection: Holdable) -> bool:
        older = self.take(registration)
        if older is not None:
            older.close()  # the DTU redialled; the newer connection is the live one
        if len(self._held) >= self.limits.total or self._held_per_host[connection.host] >= self.limits.per_host:
            return False
        self._held[registration] = connection
        self._held_per_host[connection.host] += 1
        return True

    def _count_off(self, connection: Holdable) -> None:
        self._held_per_host[connection.host] -= 1
        if not self._held_per_host[connection.host]:
            del self._held_per_host[connection.host]

    def _adopt(self, registration: bytes, adoption: Adoption, why: str, connection: Holdable) -> bool:
        if self.adopter is None:
            return False
        adopting = registration in self._held  # a redial while its link is being made
        if not self._hold(registration, connection):
            return False
        if adopting:
            return True

        def failed(failure: Failure) -> None:
            log.warn("Could not adopt {registration!r} ({why}): {error}",
                     registration=registration, why=why, error=failure.getErrorMessage())
            held = self.take(registration)
            if held is not None:
                held.close()

        self.adopter.adopt_registration(registration, adoption, why).addErrback(failed)
        return True

    def _forgotten(self, device: PendingDevice) -> None:
        """A pending device dropped or expired: its held connection goes too (an adopted one was taken before)."""
        if device.kind == MODBUS:
            held = self.take(device.registration)
            if held is not None:
                held.close()
