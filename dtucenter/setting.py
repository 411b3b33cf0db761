"""How a setting is declared: an attrs field whose metadata says how a value becomes it.

Every settings class (``dtucenter.config.Settings``, and the Modbus half's
classes in ``dtucenter/modbus/``) declares its file keys with :func:`setting`;
``dtucenter.config`` walks the TOML file and the command line into them.
The walking of one table (:func:`read_keys` and its helpers, and the
:class:`ConfigError` they raise) lives here too, so that a protocol package
can read its own data files (the Modbus half's meter templates) with the same
converters, rules and one-line messages without importing
``dtucenter.config``. This module sits below every package.

A converter takes a value as TOML or the command line gives it (the command
line gives text) and returns the setting's value, or raises ``ValueError``
whose message is only the problem, ``must be between 1 and 3600, got 0``: the
reader adds the file, the table and the key.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance
from twisted.internet.endpoints import clientFromString, serverFromString

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T", bound=AttrsInstance)

#: The metadata key under which a field carries its :class:`Declared`.
METADATA_KEY = "dtucenter.setting"


class Reload(enum.Enum):
    """What a reload of the config file (SIGHUP) does with a changed field.

    Declared with the field, so that a setting says in one place whether the running center
    takes it up; one that says nothing needs a restart, the only safe guess.
    """

    #: Read at start only (endpoints, the database): a change is logged as needing a restart.
    RESTART = "restart"
    #: Applied to the running center: read again by what uses it (new connections, the next decision).
    LIVE = "live"
    #: The file's links and meters: synced into the database and the running bridge, as the API does.
    DEVICES = "devices"
    #: A table of settings of its own (``[modbus]``): its fields say for themselves.
    TABLE = "table"


#: The metadata key of a field's :class:`Reload`, for a field that is not a file key of its own.
RELOAD_KEY = "dtucenter.reload"


@attrs.frozen
class Declared:
    """What a field's metadata says about the setting."""

    convert: Callable[[Any], Any]
    doc: str
    #: The file key, when it is not the field's name.
    key: str | None = None
    #: The command-line option (without ``--``), if there is one.
    option: str | None = None
    reload: Reload = Reload.RESTART


def setting(
    convert: Callable[[Any], Any], doc: str, *, key: str | None = None, option: str | None = None,
    reload: Reload = Reload.RESTART,
) -> dict[str, Declared]:
    """Metadata for ``attrs.field(metadata=...)``: a file key, its converter and its doc, and what
    a reload does with it (:class:`Reload`; by default: it needs a restart)."""
    return {METADATA_KEY: Declared(convert, doc, key, option, reload)}


def composed(reload: Reload) -> dict[str, Reload]:
    """Metadata for a field built from tables rather than read from one key (links, ``[modbus]``)."""
    return {RELOAD_KEY: reload}


def reload_of(attribute: attrs.Attribute[Any]) -> Reload:
    """What a reload does with a changed field: its declaration says, else :data:`Reload.RESTART`."""
    declaration = attribute.metadata.get(METADATA_KEY)
    if declaration is not None:
        return declaration.reload  # type: ignore[no-any-return]
    return attribute.metadata.get(RELOAD_KEY, Reload.RESTART)  # type: ignore[no-any-return]


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


def client_endpoint(value: Any) -> str:
    description = stripped(value)
    try:
        clientFromString(None, description)
    except Exception as e:
        raise ValueError(f"not a usable client endpoint {description!r}: {e}") from None
    return description


# -- reading a table -----------------------------------------------------------

#: Longest link, meter, point or template name: names are stored, and the
#: database's name columns hold this many characters.
MAX_NAME = 100


class UsageError(Exception):
    """The center cannot start with what it was given; the message is one line for the operator.

    Library code raises it; ``dtucenter.tap`` alone turns it into ``dtucenter: MESSAGE`` and an exit.
    """


class ConfigError(UsageError):
    """A file, key or option that cannot be used.

    ``source`` is the file or the option; ``path`` the table and key within the
    file (``link "site-a": timeout``), empty for the file itself or an option.
    """

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(": ".join(part for part in (source, path, problem) if part))
        self.source = source
        self.path = path
        self.problem = problem


@attrs.frozen
class Place:
    """A table being read, for messages: the file and the tables' path within it."""

    source: str
    path: str = ""

    def inner(self, label: str) -> Place:
        return Place(self.source, f"{self.path}: {label}" if self.path else label)

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, ": ".join(part for part in (self.path, key) if part), problem)


def named(table: str, name: str) -> str:
    return f'{table} "{name}"'


def convert_value(declaration: Declared, value: Any, place: Place, key: str | None) -> Any:
    try:
        return declaration.convert(value)
    except ValueError as e:
        raise place.error(key, str(e)) from None


def read_table(value: object, place: Place, key: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise place.error(key, f"must be a table, got {describe(value)}")
    return value


def read_tables(value: object, place: Place, key: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """The tables of an array of tables (``[[key]]``), with their indexes."""
    if value is None:
        return
    if not isinstance(value, list):
        raise place.error(key, f"must be an array of tables ([[{key}]]), got {describe(value)}")
    for index, item in enumerate(value):
        yield index, read_table(item, place, f"{key}[{index}]")


def read_keys(data: Mapping[str, Any], place: Place, *classes: type) -> list[dict[str, Any]]:
    """The converted values of ``data``'s keys, one dict of field values per class.

    A key may be written with dashes or underscores; a key no class declares is an error.
    """
    keys = [declared(cls) for cls in classes]
    values: list[dict[str, Any]] = [{} for _ in classes]
    written_as: dict[str, str] = {}
    for written, value in data.items():
        key = written.replace("-", "_")
        if key in written_as:
            raise place.error(written, f"given twice, as {written_as[key]} and {written}")
        written_as[key] = written
        for declared_keys, converted in zip(keys, values, strict=True):
            if key in declared_keys:
                name, declaration = declared_keys[key]
                converted[name] = convert_value(declaration, value, place, written)
                break
        else:
            raise place.error(written, "unknown key (a typo?)")
    return values


def require(cls: type[AttrsInstance], given: Collection[str], place: Place) -> None:
    """A field without a default must have been given."""
    for attribute in attrs.fields(cls):
        if attribute.default is attrs.NOTHING and attribute.name not in given:
            declaration = attribute.metadata.get(METADATA_KEY)
            raise place.error((declaration and declaration.key) or attribute.name, "is required")


def build(cls: type[T], values: Mapping[str, Any], place: Place, **composed: Any) -> T:
    """``cls`` from read values and composed ones."""
    require(cls, {*values, *composed}, place)
    return cls(**values, **composed)


def place_of(table: Mapping[str, Any], file: Place, kind: str, index: int) -> Place:
    """A ``[[kind]]`` table is named by its name; by its index until it has a usable one.

    Names are stored: they must fit the database's columns.
    """
    indexed = file.inner(f"{kind}[{index}]")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        return indexed  # reading the name says what is wrong with it
    if len(name) > MAX_NAME:
        raise indexed.error("name", f"at most {MAX_NAME} characters, got {len(name)}")
    return file.inner(named(kind, name))


def check_unique(names: list[str], place: Place, table: str) -> None:
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            raise place.error(f"{table}[{index}]: name", f"{name!r} is already the name of {table}[{first[name]}]")
        first[name] = index
