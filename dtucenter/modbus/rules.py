"""Registration rules: which unknown registrations may become links, and with what meter.

A ``[[rule]]`` matches a family of registrations, by prefix or by regular
expression, and names the template (and unit id and interval) of the meter a
new link would get::

    [[rule]]
    match = "regex:^[0-9]{15}$"   # an IMEI
    template = "eastron-sdm120"
    unit = 1
    interval = 60

The matching here is sans-IO and bounded: a pattern is compiled once, when the
file is read; a registration longer than :data:`MAX_RULE_REGISTRATION` matches
no rule, so the work per connection is bounded and the link named after it
fits a name column. Creating links on first contact needs links that live in
the database; until then the center reads and checks the rules but does not
apply them (docs/modbus.md).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from dtucenter.modbus.filter import decode_packet_option
from dtucenter.modbus.templates import template_name
from dtucenter.setting import MAX_NAME, choice, describe, integer, positive, setting, text

_HEX = "hex:"

#: Longest registration a rule matches: the link made from it is named after it, and a
#: registration in ``hex:`` spelling must still fit a name.
MAX_RULE_REGISTRATION = (MAX_NAME - len(_HEX)) // 2

_PRINTABLE = frozenset((string.ascii_letters + string.digits + string.punctuation + " ").encode())


@attrs.frozen
class RegistrationMatch:
    """``prefix:TEXT`` (or ``prefix:hex:0A0B``), or ``regex:PATTERN``: what a rule's ``match`` says."""

    written: str
    prefix: bytes | None = None
    pattern: re.Pattern[str] | None = None

    def matches(self, registration: bytes) -> bool:
        """Whether ``registration`` belongs to the family; a regular expression must match all of it."""
        if not registration or len(registration) > MAX_RULE_REGISTRATION:
            return False
        if self.prefix is not None:
            return registration.startswith(self.prefix)
        assert self.pattern is not None
        # latin-1 maps each byte to one character: any registration is text, none is refused.
        return self.pattern.fullmatch(registration.decode("latin-1")) is not None


def registration_match(value: Any) -> RegistrationMatch:
    if not isinstance(value, str):
        raise ValueError(f'must be "prefix:..." or "regex:...", got {describe(value)}')
    kind, colon, rest = value.partition(":")
    if not colon or kind not in ("prefix", "regex") or not rest:
        raise ValueError(f'must be "prefix:..." or "regex:...", got {value!r}')
    if kind == "prefix":
        prefix = decode_packet_option(text(rest))
        if len(prefix) > MAX_RULE_REGISTRATION:
            raise ValueError(f"the prefix is {len(prefix)} bytes, longer than any registration a rule matches"
                             f" ({MAX_RULE_REGISTRATION})")
        return RegistrationMatch(value, prefix=prefix)
    try:
        # ASCII: \d is 0-9 and \w is [a-zA-Z0-9_], as the operator who wrote it for a DTU means.
        return RegistrationMatch(value, pattern=re.compile(rest, re.ASCII))
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None


@attrs.frozen
class RegistrationRule:
    """One ``[[rule]]``: an unknown registration it matches becomes a link with one templated meter."""

    match: RegistrationMatch = attrs.field(
        metadata=setting(registration_match, '"prefix:TEXT" or "regex:PATTERN": the registrations it applies to.')
    )
    template: str = attrs.field(metadata=setting(template_name, "The template of the new link's meter."))
    unit: int = attrs.field(default=1, metadata=setting(integer(0, 255), "The meter's unit id (1..247 on rtu)."))
    interval: float = attrs.field(default=10.0, metadata=setting(positive, "Seconds between the meter's polls."))
    protocol: str = attrs.field(
        default="rtu", metadata=setting(choice("rtu", "tcp"), "The new link's framing: rtu, or tcp for MBAP.")
    )
    account: str | None = attrs.field(
        default=None, metadata=setting(text, "The account the new link and meter belong to (default the first admin).")
    )

    def adoption(self) -> Adoption:
        return Adoption(self.account, self.template, self.unit, self.interval, self.protocol)


@attrs.frozen
class Adoption:
    """What an unknown registration becomes on first contact: a link named after it, owned by
    ``account`` (None: the first admin), with one meter from ``template`` (None: no meter)."""

    account: str | None
    template: str | None
    unit: int = 1
    interval: float = 10.0
    protocol: str = "rtu"


UNKNOWN_POLICIES = ("reject", "pending", "adopt")


@attrs.frozen
class UnknownPolicy:
    """``reject``, ``pending`` or ``adopt:ACCOUNT[:TEMPLATE]``: what the shared listener does
    with a registration no link and no rule takes."""

    action: str
    adoption: Adoption | None = None

    def __str__(self) -> str:
        if self.adoption is None:
            return self.action
        template = f":{self.adoption.template}" if self.adoption.template else ""
        return f"adopt:{self.adoption.account}{template}"


def unknown_policy(value: Any) -> UnknownPolicy:
    if isinstance(value, UnknownPolicy):
        return value
    written = text(value)
    action, _, rest = written.partition(":")
    if action in ("reject", "pending") and not rest:
        return UnknownPolicy(action)
    if action != "adopt" or not rest:
        raise ValueError(f"must be reject, pending or adopt:ACCOUNT[:TEMPLATE], got {written!r}")
    account, _, template = rest.partition(":")
    if not account:
        raise ValueError(f"adopt: names no account, in {written!r}")
    return UnknownPolicy("adopt", Adoption(account, template_name(template) if template else None))


def first_matching_rule(rules: Iterable[RegistrationRule], registration: bytes) -> RegistrationRule | None:
    """The first rule, in file order, whose match takes ``registration``."""
    return next((rule for rule in rules if rule.match.matches(registration)), None)


def rule_for_received(rules: Sequence[RegistrationRule], received: bytes) -> tuple[bytes, RegistrationRule] | None:
    """The longest start of what an unknown connection sent that a rule takes, and that rule.

    A DTU may send its heartbeat or data right behind its registration; the rule's match
    says where the registration ends. Bounded: at most MAX_RULE_REGISTRATION starts are tried.
    """
    if not rules:
        return None
    for length in range(min(len(received), MAX_RULE_REGISTRATION), 0, -1):
        rule = first_matching_rule(rules, received[:length])
        if rule is not None:
            return received[:length], rule
    return None


def registration_name(registration: bytes) -> str:
    """The name of a link made for ``registration``: its text when printable, else ``hex:`` and its bytes."""
    printable = all(byte in _PRINTABLE for byte in registration) and registration.strip() == registration
    # A printable registration spelled like hex would be another one's name.
    if registration and printable and not registration.startswith(_HEX.encode()):
        return registration.decode("ascii")
    return _HEX + registration.hex().upper()
