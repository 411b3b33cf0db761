"""Settings: defaults, overridden by a TOML file, overridden by the command line.

This is the one place that reads the configuration. Every settings class
declares its file keys in its fields' metadata (``dtucenter.setting``): the
top level here, the Modbus half's tables in ``dtucenter/modbus/``. One reader
walks each table, converts every key with its field's converter and refuses
keys nobody declared; the rules about how keys go together follow, then which
source wins (:func:`read_settings`). Everything ends in frozen attrs objects.

A mistake raises :class:`ConfigError`, one line naming the file, the table
(by its name where it has one) and the key, or the option::

    center.toml: link "site-a": timeout: must be a number > 0, got 0
    --login-timeout: must be between 1 and 3600, got 0
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance

from dtucenter.dtu.udp import DEFAULT_MAX_PENDING
from dtucenter.dtu.wire import DEFAULT_HEAD, DEFAULT_MAX_LENGTH, Dialect, WireError, parse_head
from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings, SerialSettings
from dtucenter.modbus.points import BlockLimits, Point, PointType
from dtucenter.setting import (
    METADATA_KEY,
    Declared,
    boolean,
    choice,
    declared,
    describe,
    integer,
    number,
    server_endpoint,
    setting,
    stripped,
)
from dtucenter.store.meters import MAX_NAME
from dtucenter.web.auth import ENVIRONMENT_VARIABLE

T = TypeVar("T", bound=AttrsInstance)

DEFAULT_DB_URL = "sqlite:///dtucenter.db"
DEFAULT_API = "tcp:8080:interface=127.0.0.1"
UNKNOWN_DTU_POLICIES = ("reject", "accept")


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


def parse_udp(value: str) -> tuple[str, int]:
    """``"20001"`` or ``"127.0.0.1:20001"`` -> (interface, port)."""
    interface, _, port_text = str(value).rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected PORT or INTERFACE:PORT, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return interface.strip("[]"), port


def _udp(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected PORT or INTERFACE:PORT, got {describe(value)}")
    parse_udp(str(value))
    return str(value)


def _token(value: Any) -> str:
    # It travels in an HTTP header: visible ASCII only, and no spaces to confuse "Bearer TOKEN".
    if not isinstance(value, str) or not value or not all("!" <= c <= "~" for c in value):
        raise ValueError("expected a non-empty token of visible ASCII characters without spaces")
    return value


def _head(value: Any) -> bytes:
    try:
        head = parse_head(stripped(value))
        Dialect(head=head)
    except WireError as e:
        raise ValueError(str(e)) from None
    return head


def _server_endpoint_or_off(value: Any) -> str:
    return "off" if value == "off" else server_endpoint(value)


@attrs.frozen
class Settings:
    """Everything the center runs with."""

    dtu: str = attrs.field(
        default="tcp:20000", metadata=setting(server_endpoint, "Endpoint for DTU TCP connections.", option="dtu")
    )
    dtu_udp: str | None = attrs.field(
        default=None,
        metadata=setting(_udp, "UDP PORT or INTERFACE:PORT for DTUs over UDP (default off).", option="dtu-udp"),
    )
    dtu_udp_pending: int = attrs.field(
        default=DEFAULT_MAX_PENDING,
        metadata=setting(
            integer(1, 1_000_000),
            "Most UDP source addresses kept before they log in; past it the oldest is dropped.",
            option="dtu-udp-pending",
        ),
    )
    db: str = attrs.field(default=DEFAULT_DB_URL, metadata=setting(stripped, "SQLAlchemy database URL.", option="db"))
    no_upgrade: bool = attrs.field(
        default=False,
        metadata=setting(
            boolean,
            "Refuse to start when the database schema is older than this release, instead of upgrading it.",
            option="no-upgrade",
        ),
    )
    unknown_dtu: str = attrs.field(
        default="reject",
        metadata=setting(
            choice(*UNKNOWN_DTU_POLICIES), "reject or accept (enrol) DTUs not in the database.", option="unknown-dtu"
        ),
    )
    login_timeout: float = attrs.field(
        default=30.0,
        metadata=setting(number(1, 3600), "Seconds a new connection has to log in.", option="login-timeout"),
    )
    frame_head: bytes = attrs.field(
        default=DEFAULT_HEAD, metadata=setting(_head, "Frame head bytes in hex.", option="frame-head")
    )
    max_frame_length: int = attrs.field(
        default=DEFAULT_MAX_LENGTH,
        metadata=setting(integer(64, 65535), "Largest accepted frame Length field.", option="max-frame-length"),
    )
    #: A DB write per heartbeat would be wasteful.
    last_seen_interval: float = attrs.field(
        default=15.0,
        metadata=setting(number(1, 3600), "Seconds between writes of DTUs' last-seen times and meters' poll state."),
    )
    manhole: str | None = attrs.field(
        default=None,
        metadata=setting(
            server_endpoint, "Endpoint for an SSH Python prompt into the running center (default off).",
            option="manhole",
        ),
    )
    manhole_keys: str = attrs.field(
        default="~/.ssh/authorized_keys",
        metadata=setting(stripped, "authorized_keys file for the manhole.", option="manhole-keys"),
    )
    manhole_host_key: str = attrs.field(
        default="dtucenter_manhole_host_key",
        metadata=setting(stripped, "Manhole SSH host key file, created if missing.", option="manhole-host-key"),
    )
    command_timeout: float = attrs.field(
        default=10.0,
        metadata=setting(number(0.01, 3600), "Seconds a DTU has to answer a command.", option="command-timeout"),
    )
    api: str = attrs.field(
        default=DEFAULT_API,
        metadata=setting(_server_endpoint_or_off, "Endpoint for the HTTP JSON API, or off.", option="api"),
    )
    #: None: read or create the token file. Kept out of reprs and logs.
    api_token: str | None = attrs.field(
        default=None,
        repr=False,
        metadata=setting(
            _token,
            f"Bearer token for the API (else ${ENVIRONMENT_VARIABLE}, the config file, or dtucenter.token).",
            option="api-token",
        ),
    )
    modbus: ModbusSettings = attrs.Factory(ModbusSettings)
    #: The config file, or "defaults".
    source: str = "defaults"
    #: Where each value that is not a default came from ("--dtu", "center.toml: dtu"), by field
    #: name ("modbus.listen" for the Modbus shared listener), for messages about it.
    origins: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def dialect(self) -> Dialect:
        return Dialect(head=self.frame_head, max_length=self.max_frame_length)

    @property
    def udp_interface_and_port(self) -> tuple[str, int] | None:
        if self.dtu_udp is None:
            return None
        return parse_udp(self.dtu_udp)

    def where(self, name: str) -> str:
        """Names the option or file key a setting came from, for a message: ``--dtu``, ``center.toml: db``.

        A default is named by its option, the way to change it.
        """
        if name in self.origins:
            return self.origins[name]
        table, _, key = name.rpartition(".")
        declaration = _declaration(ModbusSettings if table else Settings, key)
        return f"--{declaration.option}" if declaration.option else key

    def where_link(self, link: LinkSettings, key: str) -> str:
        return f"{self.source}: {_named('link', link.name)}: {key}"


# -- the command line ----------------------------------------------------------


@attrs.frozen
class CommandLineOption:
    """An option ``dtucenter.tap`` offers; ``flag``: it takes no value."""

    name: str
    doc: str
    flag: bool


#: The classes whose fields carry options, in the order ``--help`` lists them.
_OPTION_CLASSES: tuple[type, ...] = (Settings, ModbusSettings)


def command_line_options() -> list[CommandLineOption]:
    """Every option a setting declares, with its help text and default."""
    found = []
    for cls in _OPTION_CLASSES:
        for attribute in attrs.fields(cls):
            declaration = attribute.metadata.get(METADATA_KEY)
            if declaration is None or declaration.option is None:
                continue
            found.append(CommandLineOption(
                declaration.option, _with_default(declaration.doc, attribute.default), declaration.convert is boolean
            ))
    return found


def _with_default(doc: str, default: object) -> str:
    if isinstance(default, bytes):
        default = default.hex().upper()
    if isinstance(default, bool) or not isinstance(default, str | int | float):
        return doc
    shown = f"{default:g}" if isinstance(default, float) else default
    return f"{doc.removesuffix('.')} (default {shown})."


def _declaration(cls: type[AttrsInstance], name: str) -> Declared:
    declaration: Declared = attrs.fields_dict(cls)[name].metadata[METADATA_KEY]
    return declaration


# -- reading -------------------------------------------------------------------


@attrs.frozen
class _Place:
    """A table being read, for messages: the file and the tables' path within it."""

    source: str
    path: str = ""

    def inner(self, label: str) -> _Place:
        return _Place(self.source, f"{self.path}: {label}" if self.path else label)

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, ": ".join(part for part in (self.path, key) if part), problem)


def _named(table: str, name: str) -> str:
    return f'{table} "{name}"'


def _convert(declaration: Declared, value: Any, place: _Place, key: str | None) -> Any:
    try:
        return declaration.convert(value)
    except ValueError as e:
        raise place.error(key, str(e)) from None


def _table(value: object, place: _Place, key: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise place.error(key, f"must be a table, got {describe(value)}")
    return value


def _tables(value: object, place: _Place, key: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """The tables of an array of tables (``[[key]]``), with their indexes."""
    if value is None:
        return
    if not isinstance(value, list):
        raise place.error(key, f"must be an array of tables ([[{key}]]), got {describe(value)}")
    for index, item in enumerate(value):
        yield index, _table(item, place, f"{key}[{index}]")


def _read_keys(data: Mapping[str, Any], place: _Place, *classes: type) -> list[dict[str, Any]]:
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
                converted[name] = _convert(declaration, value, place, written)
                break
        else:
            raise place.error(written, "unknown key (a typo?)")
    return values


def _require(cls: type[AttrsInstance], given: Collection[str], place: _Place) -> None:
    """A field without a default must have been given."""
    for attribute in attrs.fields(cls):
        if attribute.default is attrs.NOTHING and attribute.name not in given:
            declaration = attribute.metadata.get(METADATA_KEY)
            raise place.error((declaration and declaration.key) or attribute.name, "is required")


def _build(cls: type[T], values: Mapping[str, Any], place: _Place, **composed: Any) -> T:
    """``cls`` from read values and composed ones."""
    _require(cls, {*values, *composed}, place)
    return cls(**values, **composed)


def _place_of(table: Mapping[str, Any], file: _Place, kind: str, index: int) -> _Place:
    """A ``[[kind]]`` table is named by its name; by its index until it has a usable one.

    Names are stored: they must fit the database's columns.
    """
    indexed = file.inner(f"{kind}[{index}]")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        return indexed  # reading the name says what is wrong with it
    if len(name) > MAX_NAME:
        raise indexed.error("name", f"at most {MAX_NAME} characters, got {len(name)}")
    return file.inner(_named(kind, name))


def _check_unique(names: list[str], place: _Place, table: str) -> None:
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            raise place.error(f"{table}[{index}]: name", f"{name!r} is already the name of {table}[{first[name]}]")
        first[name] = index


def read_settings(
    document: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    *,
    source: str = "defaults",
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from a loaded TOML document, the command line's options and the environment.

    ``options`` maps option names (``login-timeout``) to their text (``True`` for a given
    flag); ``None`` or ``False`` means not given. Which source wins, in one place:

    - an option wins over its file key, the file key over the default;
    - ``$DTUCENTER_API_TOKEN`` sits between ``--api-token`` and the file's ``api_token``;
    - ``--modbus`` is the option of ``[modbus] listen``;
    - the Modbus registration timeout is ``--login-timeout`` if given, else ``[modbus]
      login_timeout``, else the top-level ``login_timeout`` (the file's, or its default).
    """
    given = {name: value for name, value in (options or {}).items() if value is not None and value is not False}
    place = _Place(source)
    top = dict(_table(document, place))
    modbus_table = _table(top.pop("modbus", {}), place, "modbus")
    link_tables = list(_tables(top.pop("link", None), place, "link"))
    meter_tables = list(_tables(top.pop("meter", None), place, "meter"))

    (values,) = _read_keys(top, place, Settings)
    origins = {name: f"{source}: {name}" for name in values}
    token = (environ or {}).get(ENVIRONMENT_VARIABLE)
    if token and "api-token" not in given:
        where = f"${ENVIRONMENT_VARIABLE}"
        values["api_token"] = _convert(_declaration(Settings, "api_token"), token, _Place(where), None)
        origins["api_token"] = where
    _apply_options(Settings, given, values, origins, "")

    modbus_place = place.inner("modbus")
    (modbus_values,) = _read_keys(modbus_table, modbus_place, ModbusSettings)
    origins |= {f"modbus.{name}": f"{source}: modbus: {name}" for name in modbus_values}
    if "login-timeout" in given or "login_timeout" not in modbus_values:
        modbus_values["login_timeout"] = values.get("login_timeout", attrs.fields(Settings).login_timeout.default)
    _apply_options(ModbusSettings, given, modbus_values, origins, "modbus.")

    links = tuple(_read_link(table, index, place) for index, table in link_tables)
    meters = tuple(_read_meter(table, index, place) for index, table in meter_tables)
    _check_links(links, modbus_values.get("listen"), place)
    _check_meters(meters, links, place)
    modbus = _build(ModbusSettings, modbus_values, modbus_place, links=links, meters=meters)
    return _build(Settings, values, place, modbus=modbus, source=source, origins=origins)


def _apply_options(
    cls: type[AttrsInstance], given: Mapping[str, Any], values: dict[str, Any], origins: dict[str, str], prefix: str
) -> None:
    for name, declaration in ((a.name, a.metadata.get(METADATA_KEY)) for a in attrs.fields(cls)):
        if declaration is None or declaration.option not in given:
            continue
        option = f"--{declaration.option}"
        values[name] = _convert(declaration, given[declaration.option], _Place(option), None)
        origins[prefix + name] = option


def _read_link(table: Mapping[str, Any], index: int, file: _Place) -> LinkSettings:
    place = _place_of(table, file, "link", index)
    values, serial_values = _read_keys(table, place, LinkSettings, SerialSettings)
    _require(LinkSettings, values, place)
    transports = [key for key, given in (("listen", "listen" in values), ("connect", "connect" in values),
                                         ("serial", "device" in serial_values)) if given]
    if len(transports) > 1:
        raise place.error(transports[1], f"cannot be combined with {transports[0]}; a link has one transport")
    registration = values.get("registration")
    if not transports and registration is None:
        raise place.error(None, "needs one of registration (DTU dials the shared listener), listen, connect or serial")
    if values.get("registration_prefix") and registration is None:
        raise place.error("registration_prefix", "needs registration")
    if registration is not None and transports and transports[0] != "listen":
        raise place.error("registration", f"only applies to links the DTU dials, not to {transports[0]} links")
    serial = None
    if "device" in serial_values:
        for key in ("heartbeat", "idle_timeout"):
            if key in values:
                raise place.error(key, "only applies to network links, not serial")
        if values.get("protocol", "rtu") != "rtu":
            raise place.error("protocol", "a serial line carries rtu only")
        serial = _build(SerialSettings, serial_values, place)
    elif serial_values:
        raise place.error(next(iter(serial_values)), "only applies to serial links")
    return _build(LinkSettings, values, place, serial=serial)


def _read_meter(table: Mapping[str, Any], index: int, file: _Place) -> MeterSettings:
    data = dict(table)
    point_tables = data.pop("point", None)
    place = _place_of(table, file, "meter", index)
    values, limits = _read_keys(data, place, MeterSettings, BlockLimits)
    _require(MeterSettings, {*values, "points"}, place)
    points = tuple(_read_point(point, i, place) for i, point in _tables(point_tables, place, "point"))
    if not points:
        raise place.error("point", "a meter needs at least one [[meter.point]]")
    _check_unique([point.name for point in points], place, "point")
    return _build(MeterSettings, values, place, points=points, limits=BlockLimits(**limits))


def _read_point(table: Mapping[str, Any], index: int, meter: _Place) -> Point:
    place = _place_of(table, meter, "point", index)
    (values,) = _read_keys(table, place, Point)
    _require(Point, {*values, "type"}, place)  # the type has a default that depends on the table
    kind = values["table"]
    point_type = values.setdefault("type", PointType.BOOL if kind.holds_bits else PointType.UINT16)
    if kind.holds_bits and point_type is not PointType.BOOL:
        raise place.error("type", f"a {kind.value} point is a single bit: use bool, not {point_type.value}")
    if "word_order" in values and point_type.registers < 2:
        raise place.error("word_order", f"only applies to 32- and 64-bit types, not {point_type.value}")
    if "scale" in values and point_type is PointType.BOOL:
        raise place.error("scale", "does not apply to bool points")
    point = _build(Point, values, place)
    if point.end > 65536:
        raise place.error("address", f"{point_type.value} at {point.address} runs past address 65535")
    return point


def _check_links(links: tuple[LinkSettings, ...], shared_listen: str | None, file: _Place) -> None:
    _check_unique([link.name for link in links], file, "link")
    shared = [link for link in links if link.kind == "shared"]
    if shared and shared_listen is None:
        raise file.inner(_named("link", shared[0].name)).error(
            None, "waits for its DTU on the shared listener: set [modbus] listen (or --modbus)"
        )
    # On a byte stream "DTU-1" cannot be told apart from the start of "DTU-10".
    for link in shared:
        for other in shared:
            if link is other or link.registration is None or other.registration is None:
                continue
            if other.registration.startswith(link.registration):
                relation = "the same as" if other.registration == link.registration else "a prefix of"
                raise file.inner(_named("link", link.name)).error(
                    "registration",
                    f"is {relation} the registration of link {other.name!r};"
                    " registrations on the shared listener must be distinguishable",
                )


def _check_meters(meters: tuple[MeterSettings, ...], links: tuple[LinkSettings, ...], file: _Place) -> None:
    _check_unique([meter.name for meter in meters], file, "meter")
    protocols = {link.name: link.protocol for link in links}
    for meter in meters:
        place = file.inner(_named("meter", meter.name))
        if meter.link not in protocols:
            known = ", ".join(repr(name) for name in protocols) or "none defined"
            raise place.error("link", f"no link named {meter.link!r} (links: {known})")
        if protocols[meter.link] == "rtu" and not 1 <= meter.unit <= 247:
            raise place.error("unit", f"an rtu unit id is 1..247, got {meter.unit}")


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file") from None
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "", f"not valid TOML: {e}") from None


def load_settings(
    config_path: str | None, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the file at ``config_path`` (if any), the options and the environment."""
    document = load_file(config_path) if config_path else {}
    return read_settings(document, options, source=config_path or "defaults", environ=environ)
