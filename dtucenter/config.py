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

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from attrs import AttrsInstance

from dtucenter.alarms.rules import AlarmRule, read_alarm_rules
from dtucenter.dtu.udp import DEFAULT_MAX_PENDING
from dtucenter.dtu.wire import DEFAULT_HEAD, DEFAULT_MAX_LENGTH, Dialect, WireError, parse_head
from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings, SerialSettings
from dtucenter.modbus.points import BlockLimits, read_points
from dtucenter.modbus.rules import RegistrationRule
from dtucenter.modbus.templates import Template, TemplateFinder, find_template
from dtucenter.mqtt.config import MqttSettings
from dtucenter.setting import (
    METADATA_KEY,
    Declared,
    Place,
    Reload,
    boolean,
    build,
    check_unique,
    choice,
    composed,
    convert_value,
    describe,
    integer,
    named,
    number,
    place_of,
    read_keys,
    read_table,
    read_tables,
    reload_of,
    require,
    server_endpoint,
    setting,
    stripped,
)
from dtucenter.setting import ConfigError as ConfigError  # raised here; tap.py and callers catch it from here
from dtucenter.setting import UsageError as UsageError
from dtucenter.web.auth import ENVIRONMENT_VARIABLE

DEFAULT_DB_URL = "sqlite:///dtucenter.db"
DEFAULT_API = "tcp:8080:interface=127.0.0.1"
UNKNOWN_DTU_POLICIES = ("reject", "pending", "accept")


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


NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _node_id(value: Any) -> str:
    node = stripped(value)
    if not NODE_ID.fullmatch(node):
        raise ValueError(
            f"expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, got {node!r}"
        )
    return node


def _http_url(value: Any) -> str:
    url = stripped(value).rstrip("/")
    if not re.fullmatch(r"https?://[^/\s]+", url):
        raise ValueError(f"expected http://HOST:PORT (or https://), got {url!r}")
    return url


def _head(value: Any) -> bytes:
    try:
        head = parse_head(stripped(value))
        Dialect(head=head)
    except WireError as e:
        raise ValueError(str(e)) from None
    return head


def _server_endpoint_or_off(value: Any) -> str:
    return "off" if value == "off" else server_endpoint(value)


def _days(value: Any) -> float:
    return number(1 / 24, 100_000)(value)


def _days_setting(what: str) -> Any:
    return attrs.field(default=None, metadata=setting(_days, f"Days {what} are kept (default: for ever)."))


@attrs.frozen
class RetentionSettings:
    """The ``[retention]`` table: how long rows are kept, and the job that rolls up and expires them
    (``store/retention.py``, docs/integrations.md). Unset, nothing is ever deleted."""

    samples: float | None = _days_setting("DTU samples (raw, one row per upload)")
    meter_samples: float | None = _days_setting("meter samples (raw, one row per point and poll)")
    meter_failures: float | None = _days_setting("meter failure streaks (since their last failed poll)")
    audit: float | None = _days_setting(
        "audit trails (commands, DTU edits, meter writes, reads and raw exchanges, template edits)")
    hourly: float | None = _days_setting("hourly roll-ups")
    daily: float | None = _days_setting("daily roll-ups")
    job: bool = attrs.field(
        default=True,
        metadata=setting(boolean, "Run the roll-up and expiry job in this center (one center per database should)."),
    )
    interval: float = attrs.field(
        default=60.0, metadata=setting(number(1, 86400), "Seconds between runs of the roll-up and expiry job."),
    )
    batch_rows: int = attrs.field(
        default=2000, metadata=setting(integer(100, 1_000_000), "Rows the job reads or deletes per transaction."),
    )
    settle: float = attrs.field(
        default=300.0,
        metadata=setting(number(0, 86400), "Seconds a sample waits before it is rolled up (a poll's values "
                         "carry its start time; reads add what is not rolled up yet)."),
    )

    share: float = attrs.field(
        default=0.25,
        metadata=setting(number(0.01, 1), "Share of the time the job works at most; it pauses between steps."),
    )

    def __attrs_post_init__(self) -> None:
        for raw, rolled in (("samples", "hourly"), ("meter_samples", "hourly"), ("hourly", "daily")):
            shorter, longer = getattr(self, raw), getattr(self, rolled)
            if shorter is not None and longer is not None and longer < shorter:
                raise ValueError(f"{rolled} ({longer:g} days) is kept less long than {raw} ({shorter:g} days)")


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
            reload=Reload.LIVE,
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
        default="pending",
        metadata=setting(
            choice(*UNKNOWN_DTU_POLICIES),
            "reject, pending (hold for adoption) or accept (enrol) DTUs not in the database.", option="unknown-dtu",
            reload=Reload.LIVE,
        ),
    )
    pending_per_host: int = attrs.field(
        default=20,
        metadata=setting(
            integer(1, 1_000_000), "Most pending (unknown) devices kept from one source host.",
            option="pending-per-host",
        ),
    )
    pending_total: int = attrs.field(
        default=10_000,
        metadata=setting(integer(1, 10_000_000), "Most pending (unknown) devices kept in all.", option="pending-total"),
    )
    pending_expire: float = attrs.field(
        default=7 * 24 * 3600.0,
        metadata=setting(
            number(1, 10**9), "Seconds after which a pending device not seen again is dropped.",
            option="pending-expire",
        ),
    )
    login_timeout: float = attrs.field(
        default=30.0,
        metadata=setting(
            number(1, 3600), "Seconds a new connection has to log in.", option="login-timeout", reload=Reload.LIVE
        ),
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
        metadata=setting(
            number(0.01, 3600), "Seconds a DTU has to answer a command.", option="command-timeout",
            reload=Reload.LIVE,
        ),
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
    node_id: str | None = attrs.field(
        default=None,
        metadata=setting(
            _node_id,
            "This center's id among the nodes sharing its database (default: the host name and a random suffix).",
            option="node-id",
        ),
    )
    node_lease: float = attrs.field(
        default=15.0,
        metadata=setting(
            number(3, 3600),
            "Seconds a node's lease lasts: a node silent for longer is taken for dead, its DTUs offline, its links"
            " taken over by another.",
            option="node-lease",
        ),
    )
    node_url: str | None = attrs.field(
        default=None,
        metadata=setting(
            _http_url,
            "URL where the other nodes reach this node's API, for commands to its DTUs"
            " (default: http://HOST:PORT of the API listener, HOST this machine's name).",
            option="node-url",
        ),
    )
    #: /metrics is served on the API always; this is a listener of its own, without a token.
    metrics: str | None = attrs.field(
        default=None,
        metadata=setting(
            server_endpoint,
            "Endpoint serving /metrics without a token, on loopback unless it names an interface (default off).",
            option="metrics",
        ),
    )
    metrics_per_link: bool = attrs.field(
        default=False,
        metadata=setting(
            boolean, "Label the Modbus metrics by link: one series per link (default: totals over all links).",
            option="metrics-per-link",
        ),
    )
    #: The log file is twistd's (``--logfile``; without ``-n``, twistd.log); bounded here,
    #: as twistd's own keeps every rotated file for ever.
    log_rotate_size: int = attrs.field(
        default=10_000_000,
        metadata=setting(
            integer(1000, 10**12), "Bytes at which the log file is rotated.", option="log-rotate-size",
            reload=Reload.LIVE,
        ),
    )
    log_keep: int = attrs.field(
        default=10,
        metadata=setting(
            integer(1, 1000), "Rotated log files kept; older ones are deleted.", option="log-keep", reload=Reload.LIVE
        ),
    )
    modbus: ModbusSettings = attrs.field(factory=ModbusSettings, metadata=composed(Reload.TABLE))
    mqtt: MqttSettings = attrs.field(factory=MqttSettings, metadata=composed(Reload.TABLE))
    #: The ``[[alarm]]`` rules (dtucenter/alarms/rules.py); a reload replaces them in the running center.
    alarms: tuple[AlarmRule, ...] = attrs.field(default=(), metadata=composed(Reload.LIVE))
    retention: RetentionSettings = attrs.field(factory=RetentionSettings, metadata=composed(Reload.TABLE))
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

        A default is named by its option, the way to change it; what the file's tables make
        (``modbus.rules``) by the file and the field.
        """
        if name in self.origins:
            return self.origins[name]
        table, _, key = name.rpartition(".")
        declaration = attrs.fields_dict(_TABLE_CLASSES[table])[key].metadata.get(METADATA_KEY)
        if declaration is None:
            return f"{self.source}: {key}"
        return f"--{declaration.option}" if declaration.option else key

    def where_link(self, link: LinkSettings, key: str) -> str:
        return f"{self.source}: {named('link', link.name)}: {key}"


# -- the command line ----------------------------------------------------------


@attrs.frozen
class CommandLineOption:
    """An option ``dtucenter.tap`` offers; ``flag``: it takes no value."""

    name: str
    doc: str
    flag: bool


#: The classes whose fields carry options, in the order ``--help`` lists them.
_OPTION_CLASSES: tuple[type, ...] = (Settings, ModbusSettings, MqttSettings)
#: The settings class of each table, by its name in ``Settings.where``'s names ("" for the top level).
_TABLE_CLASSES: dict[str, type[AttrsInstance]] = {
    "": Settings, "modbus": ModbusSettings, "mqtt": MqttSettings, "retention": RetentionSettings,
}


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
    place = Place(source)
    top = dict(read_table(document, place))
    modbus_table = read_table(top.pop("modbus", {}), place, "modbus")
    retention_table = read_table(top.pop("retention", {}), place, "retention")
    mqtt_table = read_table(top.pop("mqtt", {}), place, "mqtt")
    link_tables = list(read_tables(top.pop("link", None), place, "link"))
    meter_tables = list(read_tables(top.pop("meter", None), place, "meter"))
    rule_tables = list(read_tables(top.pop("rule", None), place, "rule"))
    alarms = read_alarm_rules(top.pop("alarm", None), place)

    (values,) = read_keys(top, place, Settings)
    origins = {name: f"{source}: {name}" for name in values}
    token = (environ or {}).get(ENVIRONMENT_VARIABLE)
    if token and "api-token" not in given:
        where = f"${ENVIRONMENT_VARIABLE}"
        values["api_token"] = convert_value(_declaration(Settings, "api_token"), token, Place(where), None)
        origins["api_token"] = where
    _apply_options(Settings, given, values, origins, "")

    modbus_place = place.inner("modbus")
    (modbus_values,) = read_keys(modbus_table, modbus_place, ModbusSettings)
    origins |= {f"modbus.{name}": f"{source}: modbus: {name}" for name in modbus_values}
    if "login-timeout" in given or "login_timeout" not in modbus_values:
        modbus_values["login_timeout"] = values.get("login_timeout", attrs.fields(Settings).login_timeout.default)
    _apply_options(ModbusSettings, given, modbus_values, origins, "modbus.")
    probe_after = modbus_values.get("probe_after", attrs.fields(ModbusSettings).probe_after.default)
    if "probe" in modbus_values and probe_after >= modbus_values["login_timeout"]:
        raise modbus_place.error(
            "probe_after", f"is {probe_after:g} s: the probe must go out before the registration timeout "
            f"({modbus_values['login_timeout']:g} s) closes the connection"
        )

    policy = modbus_values.get("unknown_registration")
    if policy is not None and policy.adoption is not None and policy.adoption.template is not None:
        try:
            find_template(policy.adoption.template)
        except LookupError as e:
            if origins["modbus.unknown_registration"] == "--unknown-registration":
                raise Place("--unknown-registration").error(None, str(e)) from None
            raise modbus_place.error("unknown_registration", str(e)) from None
    for key in ("server_allow", "server_max_clients"):
        if key in modbus_values and modbus_values.get("server") is None:
            raise modbus_place.error(key, "applies to the Modbus TCP server for SCADA: set server (or --modbus-server)")

    links = tuple(_read_link(table, index, place) for index, table in link_tables)
    meters = tuple(_read_meter(table, index, place) for index, table in meter_tables)
    _check_links(links, modbus_values.get("listen"), place)
    _check_meters(meters, links, place)
    rules = tuple(_read_rule(table, place.inner(f"rule[{index}]")) for index, table in rule_tables)
    if rules and modbus_values.get("listen") is None:
        raise place.inner("rule[0]").error(
            None, "applies to DTUs that dial the shared listener: set [modbus] listen (or --modbus)"
        )
    modbus = build(ModbusSettings, modbus_values, modbus_place, links=links, meters=meters, rules=rules)

    retention_place = place.inner("retention")
    (retention_values,) = read_keys(retention_table, retention_place, RetentionSettings)
    origins |= {f"retention.{name}": f"{source}: retention: {name}" for name in retention_values}
    try:
        retention = build(RetentionSettings, retention_values, retention_place)
    except ValueError as e:
        raise retention_place.error(None, str(e)) from None
    mqtt = _read_mqtt(mqtt_table, place.inner("mqtt"), given, origins)
    return build(
        Settings, values, place, modbus=modbus, mqtt=mqtt, alarms=alarms, retention=retention, source=source,
        origins=origins,
    )


def _read_mqtt(
    table: Mapping[str, Any], place: Place, given: Mapping[str, Any], origins: dict[str, str]
) -> MqttSettings:
    (values,) = read_keys(table, place, MqttSettings)
    origins |= {f"mqtt.{name}": f"{place.source}: mqtt: {name}" for name in values}
    _apply_options(MqttSettings, given, values, origins, "mqtt.")
    tls_files = [key for key in ("ca", "cert", "key") if key in values]
    if tls_files and "url" in values and not values["url"].startswith("mqtts://"):
        raise place.error(tls_files[0], "is for a TLS broker: the url must start with mqtts://")
    if "key" in values and "cert" not in values:
        raise place.error("key", "needs cert, the certificate it is the key of")
    return build(MqttSettings, values, place)


def _apply_options(
    cls: type[AttrsInstance], given: Mapping[str, Any], values: dict[str, Any], origins: dict[str, str], prefix: str
) -> None:
    for name, declaration in ((a.name, a.metadata.get(METADATA_KEY)) for a in attrs.fields(cls)):
        if declaration is None or declaration.option not in given:
            continue
        option = f"--{declaration.option}"
        values[name] = convert_value(declaration, given[declaration.option], Place(option), None)
        origins[prefix + name] = option


def read_link_definition(table: object, source: str) -> LinkSettings:
    """One link from its ``[[link]]`` table as the API, the CLI or the database gives it:
    the same keys, checks and messages as the file (``source`` names where it came from).
    How it goes with the other links is the bridge's to check, which holds them all."""
    return _read_link(read_table(table, Place(source)), 0, Place(source))


def read_meter_definition(table: object, source: str, find: TemplateFinder = find_template) -> MeterSettings:
    """One meter from its ``[[meter]]`` table, as :func:`read_link_definition`; its ``template``
    is resolved by ``find``: for a meter of the database, its account's
    ``TemplateCatalog.finder`` (its own templates, then the shipped ones)."""
    return _read_meter(read_table(table, Place(source)), 0, Place(source), find)


def _read_link(table: Mapping[str, Any], index: int, file: Place) -> LinkSettings:
    place = place_of(table, file, "link", index)
    values, serial_values = read_keys(table, place, LinkSettings, SerialSettings)
    require(LinkSettings, values, place)
    transports = [key for key, given in (("listen", "listen" in values), ("connect", "connect" in values),
                                         ("serial", "device" in serial_values)) if given]
    if len(transports) > 1:
        raise place.error(transports[1], f"cannot be combined with {transports[0]}; a link has one transport")
    registration = values.get("registration")
    if not transports and registration is None:
        raise place.error(None, "needs one of registration (DTU dials the shared listener), listen, connect or serial")
    for key in ("registration_prefix", "registration_mode"):
        if values.get(key, False) is not False and registration is None:
            raise place.error(key, "needs registration")
    # registration_prefix = true is the older spelling of mode "both"; the two must not contradict.
    if values.get("registration_prefix") and values.setdefault("registration_mode", "both") != "both":
        raise place.error("registration_prefix", f"true means registration_mode = \"both\", "
                          f"not {values['registration_mode']!r}; drop one of them")
    values["registration_prefix"] = values.get("registration_mode", "connect") != "connect"
    if registration is not None and transports and transports[0] != "listen":
        raise place.error("registration", f"only applies to links the DTU dials, not to {transports[0]} links")
    serial = None
    if "device" in serial_values:
        for key in ("heartbeat", "idle_timeout"):
            if key in values:
                raise place.error(key, "only applies to network links, not serial")
        if values.get("protocol", "rtu") != "rtu":
            raise place.error("protocol", "a serial line carries rtu only")
        serial = build(SerialSettings, serial_values, place)
    elif serial_values:
        raise place.error(next(iter(serial_values)), "only applies to serial links")
    return build(LinkSettings, values, place, serial=serial)


def _read_meter(
    table: Mapping[str, Any], index: int, file: Place, find: TemplateFinder = find_template
) -> MeterSettings:
    data = dict(table)
    point_tables = data.pop("point", None)
    place = place_of(table, file, "meter", index)
    values, limits = read_keys(data, place, MeterSettings, BlockLimits)
    require(MeterSettings, {*values, "points"}, place)
    points = read_points(point_tables, place)
    template = values.get("template")
    if template is not None:
        # No overriding: which of a template's points a partial list would replace is a guess,
        # and a wrong guess stores another register's value under a trusted name.
        if points:
            raise place.error(
                "point", f"cannot be combined with template {template!r}; to change its points, list them all instead"
            )
        points = _template(template, place, find).points
    elif not points:
        raise place.error("point", "a meter needs a template or at least one [[meter.point]]")
    return build(MeterSettings, values, place, points=points, limits=BlockLimits(**limits))


def _read_rule(table: Mapping[str, Any], place: Place) -> RegistrationRule:
    (values,) = read_keys(table, place, RegistrationRule)
    rule = build(RegistrationRule, values, place)
    _template(rule.template, place)
    _check_unit(rule.protocol, rule.unit, place)
    return rule


def _template(name: str, place: Place, find: TemplateFinder = find_template) -> Template:
    try:
        return find(name)
    except LookupError as e:
        raise place.error("template", str(e)) from None


def _check_unit(protocol: str, unit: int, place: Place) -> None:
    if protocol == "rtu" and not 1 <= unit <= 247:
        raise place.error("unit", f"an rtu unit id is 1..247, got {unit}")


def _check_links(links: tuple[LinkSettings, ...], shared_listen: str | None, file: Place) -> None:
    check_unique([link.name for link in links], file, "link")
    shared = [link for link in links if link.kind == "shared"]
    if shared and shared_listen is None:
        raise file.inner(named("link", shared[0].name)).error(
            None, "waits for its DTU on the shared listener: set [modbus] listen (or --modbus)"
        )
    # On a byte stream "DTU-1" cannot be told apart from the start of "DTU-10".
    for link in shared:
        for other in shared:
            if link is other or link.registration is None or other.registration is None:
                continue
            if other.registration.startswith(link.registration):
                relation = "the same as" if other.registration == link.registration else "a prefix of"
                raise file.inner(named("link", link.name)).error(
                    "registration",
                    f"is {relation} the registration of link {other.name!r};"
                    " registrations on the shared listener must be distinguishable",
                )


def _check_meters(meters: tuple[MeterSettings, ...], links: tuple[LinkSettings, ...], file: Place) -> None:
    check_unique([meter.name for meter in meters], file, "meter")
    protocols = {link.name: link.protocol for link in links}
    for meter in meters:
        place = file.inner(named("meter", meter.name))
        if meter.link not in protocols:
            known = ", ".join(repr(name) for name in protocols) or "none defined"
            raise place.error("link", f"no link named {meter.link!r} (links: {known})")
        _check_unit(protocols[meter.link], meter.unit, place)
    scada_units: dict[int, str] = {}
    for meter in meters:
        if meter.scada_unit is None:
            continue
        taken = scada_units.setdefault(meter.scada_unit, meter.name)
        if taken != meter.name:
            raise file.inner(named("meter", meter.name)).error(
                "scada_unit", f"{meter.scada_unit} is already the scada_unit of meter {taken!r}"
            )


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


# -- reloading -----------------------------------------------------------------


@attrs.frozen
class SettingChange:
    """A setting whose value a reread of the file changed (links and meters aside: see ``dtucenter.reload``)."""

    #: The field's name, ``modbus.``-prefixed for the ``[modbus]`` table's.
    name: str
    #: Where its new value comes from, for the log: ``center.toml: api``, or the option.
    where: str
    #: Applied to the running center; else it waits for a restart.
    live: bool


def changed_settings(running: Settings, reread: Settings) -> list[SettingChange]:
    """What differs between the settings the center runs with and the file read again, each
    with whether a reload applies it (the fields' :class:`~dtucenter.setting.Reload`)."""
    return [
        SettingChange(name, _where_changed(running, reread, name), kind is Reload.LIVE)
        for name, kind, old, new in _walk(running, reread, "")
        if kind in (Reload.LIVE, Reload.RESTART) and old != new
    ]


def _where_changed(running: Settings, reread: Settings, name: str) -> str:
    if name in reread.origins or name not in running.origins:
        return reread.where(name)
    return f"{running.origins[name]} (gone: back to its default)"


def running_settings(running: Settings, reread: Settings) -> Settings:
    """The settings the center runs with after a reload: the reread ones, but the old value of
    every setting that needs a restart, so that what is running is what is said to run."""
    kept: Settings = _keep_restart_values(running, reread)
    return kept


def _walk(old: AttrsInstance, new: AttrsInstance, prefix: str) -> Iterator[tuple[str, Reload, Any, Any]]:
    for attribute in attrs.fields(type(old)):
        if not attribute.eq:  # bookkeeping (where values came from), not a setting
            continue
        kind = reload_of(attribute)
        old_value, new_value = getattr(old, attribute.name), getattr(new, attribute.name)
        if kind is Reload.TABLE:
            yield from _walk(old_value, new_value, f"{prefix}{attribute.name}.")
        else:
            yield f"{prefix}{attribute.name}", kind, old_value, new_value


def _keep_restart_values(old: Any, new: Any) -> Any:
    kept: dict[str, Any] = {}
    for attribute in attrs.fields(type(old)):
        if not attribute.eq:
            continue
        kind = reload_of(attribute)
        if kind is Reload.TABLE:
            kept[attribute.name] = _keep_restart_values(getattr(old, attribute.name), getattr(new, attribute.name))
        elif kind is Reload.RESTART:
            kept[attribute.name] = getattr(old, attribute.name)
    return attrs.evolve(new, **kept)
