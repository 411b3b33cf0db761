"""How a setting is declared: an attrs field whose metadata says how a value becomes it.

Every settings class (``dtucenter.config.Settings``, and the Modbus half's
classes in ``dtucenter/modbus/``) declares its file keys with :func:`setting`;
``dtucenter.config`` is the one reader that walks the TOML file and the
command line into them. This module sits below every package so that the
protocol packages can declare their settings without importing
``dtucenter.config``.

A converter takes a value as TOML or the command line gives it (the command
line gives text) and returns the setting's value, or raises ``ValueError``
whose message is only the problem, ``must be between 1 and 3600, got 0``: the
reader adds the file, the table and the key.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance
from twisted.internet.endpoints import _parse, clientFromString, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

E = TypeVar("E", bound=enum.Enum)

#: The metadata key under which a field carries its :class:`Declared`.
METADATA_KEY = "dtucenter.setting"


@attrs.frozen
class Declared:
    """What a field's metadata says about the setting."""

    convert: Callable[[Any], Any]
    doc: str
    #: The file key, when it is not the field's name.
    key: str | None = None
    #: The command-line option (without ``--``), if there is one.
    option: str | None = None


def setting(
    convert: Callable[[Any], Any], doc: str, *, key: str | None = None, option: str | None = None
) -> dict[str, Declared]:
    """Metadata for ``attrs.field(metadata=...)``: a file key, its converter and its doc."""
    return {METADATA_KEY: Declared(convert, doc, key, option)}


def declared(cls: type[AttrsInstance]) -> dict[str, tuple[str, Declared]]:
    """The file keys of an attrs class, each with its field's name and declaration."""
    found = {}
    for attribute in attrs.fields(cls):
        declaration = attribute.metadata.get(METADATA_KEY)
        if declaration is not None:
            found[declaration.key or attribute.name] = (attribute.name, declaration)
    return found


def describe(value: object) -> str:
    """A value as the operator wrote it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def text(value: Any) -> str:
    """A non-empty string, kept as written (names, units, device paths)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {describe(value)}")
    return value


def stripped(value: Any) -> str:
    """A non-empty string without surrounding blanks (URLs, file names)."""
    return text(value).strip()


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {describe(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {describe(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {describe(value)}")
    return number


def number(low: float, high: float) -> Callable[[Any], float]:
    """A number (or the text of one) from ``low`` to ``high``."""

    def convert(value: Any) -> float:
        result = _float(value)
        if not low <= result <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {result:g}")
        return result

    return convert


def positive(value: Any) -> float:
    """A number greater than 0."""
    result = _float(value)
    if result <= 0:
        raise ValueError(f"must be a number > 0, got {result:g}")
    return result


def nonzero(value: Any) -> float:
    result = _float(value)
    if result == 0:
        raise ValueError("must not be 0")
    return result


def integer(low: int, high: int) -> Callable[[Any], int]:
    """A whole number (or its text, decimal or ``0x`` hex) from ``low`` to ``high``."""

    def convert(value: Any) -> int:
        try:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):
                result = int(value.strip(), 0)
            elif isinstance(value, float) and value.is_integer():
                result = int(value)
            elif isinstance(value, int):
                result = value
            else:
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number, got {describe(value)}") from None
        if not low <= result <= high:
            raise ValueError(f"must be between {low} and {high}, got {result}")
        return result

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {describe(value)}")
    return value


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {describe(value)}")
        return str(value)

    return convert


def member(kind: type[E], names: tuple[str, ...] | None = None) -> Callable[[Any], E]:
    """An enum member by its value; ``names`` orders (or limits) what the error lists."""
    by_choice = choice(*(names or tuple(str(m.value) for m in kind)))

    def convert(value: Any) -> E:
        return kind(by_choice(value))

    return convert


def server_endpoint(value: Any) -> str:
    """A Twisted server endpoint string, checked now rather than when the center starts."""
    description = stripped(value)
    try:
        # Building an endpoint only parses the description: nothing listens yet.
        serverFromString(None, description)
    except Exception as e:  # any plugin's parser may be the one that refuses it
        raise ValueError(f"not a usable server endpoint {description!r}: {e}") from None
    return description


#: Connections the kernel may hold for a listener before the center accepts them. Twisted's default, 50,
#: overflowed when a whole fleet redialled at once (a power cut): 6-9% of 10,000 logins were lost.
#: The kernel silently caps it at ``net.core.somaxconn`` (docs/deployment.md).
DEFAULT_LISTEN_BACKLOG = 4096

#: The endpoint types whose string takes ``backlog=`` (Twisted's own; a plugin's may not).
_TAKES_BACKLOG = frozenset({"tcp", "tcp6", "ssl", "unix"})


def listening_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The server endpoint for ``description``, with :data:`DEFAULT_LISTEN_BACKLOG` unless it gives ``backlog=``."""
    # Twisted's own tokenizer, so that escaped colons (tcp6 addresses) are read as Twisted reads them.
    args, kwargs = _parse(description)
    if args and str(args[0]).lower() in _TAKES_BACKLOG and "backlog" not in kwargs:
        description = f"{description.rstrip(':')}:backlog={DEFAULT_LISTEN_BACKLOG}"
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


def client_endpoint(value: Any) -> str:
    description = stripped(value)
    try:
        clientFromString(None, description)
    except Exception as e:
        raise ValueError(f"not a usable client endpoint {description!r}: {e}") from None
    return description
