"""The Modbus half's settings: the ``[modbus]``, ``[[link]]`` and ``[[meter]]`` tables.

These are the bridge's data types. Each field that a file key sets says in
its metadata how the key's value is converted and what it means;
``dtucenter.config`` reads the file into them, checks how the keys go
together and names the file, table and key of any mistake.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Any

import attrs

from dtucenter.modbus.filter import decode_packet_option, encode_packet_option
from dtucenter.modbus.points import BlockLimits, Point
from dtucenter.modbus.rules import RegistrationRule, UnknownPolicy, unknown_policy
from dtucenter.setting import (
    Reload,
    boolean,
    choice,
    client_endpoint,
    composed,
    declared,
    describe,
    integer,
    positive,
    server_endpoint,
    setting,
    text,
)

DEFAULT_LOGIN_TIMEOUT = 30.0
#: A value polled this many intervals ago is too old for SCADA unless the meter says otherwise:
#: one missed or slow poll is tolerated, a meter that stopped answering is not.
SCADA_MAX_AGE_INTERVALS = 3
DEFAULT_SCADA_MAX_CLIENTS = 64
#: USR's registration "send types": on connect only, in front of every packet only, or both.
REGISTRATION_MODES = ("connect", "data", "both")


def packet(value: Any) -> bytes:
    """A registration or heartbeat packet: ``"hex:0A0B"`` or plain text."""
    return decode_packet_option(text(value))


def client_networks(value: Any) -> tuple[str, ...]:
    """Addresses or networks (``10.1.2.3``, ``10.1.0.0/16``, ``::1``): an array, or one comma-separated text."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"must be a non-empty array of addresses or networks, got {describe(value)}")
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(text(item).strip(), strict=False)))
        except ValueError as e:
            raise ValueError(f"not an address or network: {item!r} ({e})") from None
    return tuple(networks)


def stopbits(value: Any) -> float:
    if isinstance(value, bool) or value not in (1, 1.5, 2):
        raise ValueError(f"must be 1, 1.5 or 2, got {describe(value)}")
    return float(value)


@attrs.frozen
class SerialSettings:
    """A serial line, from a ``[[link]]`` with ``serial = DEVICE``."""

    device: str = attrs.field(metadata=setting(text, "The serial device, e.g. /dev/ttyUSB0.", key="serial"))
    baudrate: int = attrs.field(default=9600, metadata=setting(integer(50, 4_000_000), "Bits per second."))
    bytesize: int = attrs.field(default=8, metadata=setting(integer(5, 8), "Data bits."))
    parity: str = attrs.field(
        default="N", metadata=setting(choice("N", "E", "O", "M", "S"), "Parity as pyserial spells it.")
    )
    stopbits: float = attrs.field(default=1, metadata=setting(stopbits, "1, 1.5 or 2."))


@attrs.frozen
class LinkSettings:
    """One ``[[link]]``: a DTU, gateway or serial line that carries Modbus to meters."""

    name: str = attrs.field(metadata=setting(text, "The link's name, for meters and the API."))
    protocol: str = attrs.field(
        default="rtu", metadata=setting(choice("rtu", "tcp"), "rtu, or tcp for MBAP framing.")
    )
    timeout: float = attrs.field(default=3.0, metadata=setting(positive, "Seconds to wait for an answer."))
    retries: int = attrs.field(default=1, metadata=setting(integer(0, 10), "Retries of an unanswered request."))
    registration: bytes | None = attrs.field(
        default=None,
        metadata=setting(packet, "The DTU's registration packet; registration_mode says when it sends it."),
    )
    #: When the DTU sends its registration (USR's "send type"): ``connect`` (once, when it
    #: connects), ``data`` (in front of every packet, only) or ``both``.
    registration_mode: str = attrs.field(
        default="connect",
        metadata=setting(
            choice(*REGISTRATION_MODES),
            "When the DTU sends its registration: connect (once), data (before every packet) or both.",
        ),
    )
    registration_prefix: bool = attrs.field(
        default=False,
        metadata=setting(boolean, "The DTU sends its registration before every frame (registration_mode = both)."),
    )
    heartbeat: bytes | None = attrs.field(
        default=None, metadata=setting(packet, "A packet the DTU sends between frames, to be ignored.")
    )
    #: A dedicated server endpoint.
    listen: str | None = attrs.field(
        default=None, metadata=setting(server_endpoint, "The link's own listening endpoint.")
    )
    #: A client endpoint; the DTU is the TCP server.
    connect: str | None = attrs.field(
        default=None, metadata=setting(client_endpoint, "Endpoint to connect to; the DTU is the server.")
    )
    serial: SerialSettings | None = None
    #: Close a connection that sent nothing for this long.
    idle_timeout: float | None = attrs.field(
        default=None, metadata=setting(positive, "Seconds of silence after which a connection is closed.")
    )

    @property
    def sends_registration_on_connect(self) -> bool:
        """The DTU opens every connection with its registration (modes ``connect`` and ``both``)."""
        return self.registration is not None and self.registration_mode != "data"

    def table(self) -> dict[str, Any]:
        """The ``[[link]]`` table that reads back as this link (:func:`link_table`)."""
        return link_table(self)

    @property
    def kind(self) -> str:
        """``shared``, ``listen``, ``connect`` or ``serial``."""
        if self.serial is not None:
            return "serial"
        if self.connect is not None:
            return "connect"
        if self.listen is not None:
            return "listen"
        return "shared"


@attrs.frozen
class MeterSettings:
    """One ``[[meter]]``: a unit id on a link, polled for its ``[[meter.point]]`` values."""

    name: str = attrs.field(metadata=setting(text, "The meter's name, in the database and the API."))
    link: str = attrs.field(metadata=setting(text, "The name of the link it is on."))
    unit: int = attrs.field(metadata=setting(integer(0, 255), "The unit id (1..247 on rtu links)."))
    points: tuple[Point, ...]
    #: The template the points came from, if they did: a shipped one, or (a meter of the
    #: database) one of its account's own.
    template: str | None = attrs.field(
        default=None,
        metadata=setting(text, "A template's name (shipped, or the account's own), instead of [[meter.point]]s."),
    )
    interval: float = attrs.field(default=10.0, metadata=setting(positive, "Seconds between polls."))
    limits: BlockLimits = attrs.Factory(BlockLimits)
    #: The unit id SCADA reads the meter under on the Modbus TCP server; None: not served there.
    scada_unit: int | None = attrs.field(
        default=None,
        metadata=setting(integer(1, 247), "Unit id on the Modbus TCP server for SCADA (default: not served)."),
    )
    #: How old a polled value may be and still be served to SCADA; None: SCADA_MAX_AGE_INTERVALS polls.
    scada_max_age: float | None = attrs.field(
        default=None,
        metadata=setting(positive, "Seconds a polled value is served to SCADA (default 3 poll intervals)."),
    )

    @property
    def served_age(self) -> float:
        """How old a polled value may be and still be answered to SCADA."""
        return self.scada_max_age if self.scada_max_age is not None else SCADA_MAX_AGE_INTERVALS * self.interval

    def table(self) -> dict[str, Any]:
        """The ``[[meter]]`` table that reads back as this meter (:func:`meter_table`)."""
        return meter_table(self)


@attrs.frozen
class ModbusSettings:
    """The whole Modbus half: the ``[modbus]`` table, the links and the meters."""

    #: The shared listener for DTUs that register.
    listen: str | None = attrs.field(
        default=None,
        metadata=setting(
            server_endpoint, "Endpoint where DTUs dial in with a registration packet for Modbus polling (default off).",
            option="modbus",
        ),
    )
    login_timeout: float = attrs.field(
        default=DEFAULT_LOGIN_TIMEOUT,
        metadata=setting(positive, "Seconds a new connection has to send its registration.", reload=Reload.LIVE),
    )
    #: Sent as-is to a connection on the shared listener that has said nothing for
    #: ``probe_after`` seconds, so that a DTU in registration mode ``data`` answers with
    #: its registration in front; every such DTU behind the listener must accept it.
    probe: bytes | None = attrs.field(
        default=None,
        metadata=setting(
            packet, "A request sent to a silent new connection (hex:...), to make a data-mode DTU speak.",
            reload=Reload.LIVE,
        ),
    )
    probe_after: float = attrs.field(
        default=5.0,
        metadata=setting(
            positive, "Seconds of silence after which a new connection gets the probe.", reload=Reload.LIVE
        ),
    )
    unknown_registration: UnknownPolicy = attrs.field(
        default=UnknownPolicy("pending"),
        metadata=setting(
            unknown_policy,
            "What the shared listener does with a registration no link or rule takes: reject (close it),"
            " pending (hold it for adoption) or adopt:ACCOUNT[:TEMPLATE] (make its link at once).",
            option="unknown-registration", reload=Reload.LIVE,
        ),
    )
    registration_window: float = attrs.field(
        default=0.5,
        metadata=setting(
            positive, "Seconds from an unknown DTU's first byte within which what it sends is its registration.",
            reload=Reload.LIVE,
        ),
    )
    held_connections: int = attrs.field(
        default=1000,
        metadata=setting(integer(0, 1_000_000), "Most connections of pending devices held open.", reload=Reload.LIVE),
    )
    held_connections_per_host: int = attrs.field(
        default=100,
        metadata=setting(
            integer(0, 1_000_000), "Most connections of pending devices held open from one host.", reload=Reload.LIVE
        ),
    )
    #: The Modbus TCP server SCADA masters read meters through (dtucenter/modbus/scada.py).
    server: str | None = attrs.field(
        default=None,
        metadata=setting(
            server_endpoint,
            "Endpoint of the Modbus TCP server for SCADA, e.g. tcp:502:interface=10.0.0.5 (default off).",
            option="modbus-server",
        ),
    )
    #: None: any client that reaches the endpoint.
    server_allow: tuple[str, ...] | None = attrs.field(
        default=None,
        metadata=setting(
            client_networks,
            "Client addresses or networks the Modbus TCP server accepts, comma-separated (default any).",
            option="modbus-server-allow",
        ),
    )
    server_max_clients: int = attrs.field(
        default=DEFAULT_SCADA_MAX_CLIENTS,
        metadata=setting(integer(1, 10_000), "Most SCADA connections at once; more are closed at once."),
    )
    links: tuple[LinkSettings, ...] = attrs.field(default=(), metadata=composed(Reload.DEVICES))
    meters: tuple[MeterSettings, ...] = attrs.field(default=(), metadata=composed(Reload.DEVICES))
    #: ``[[rule]]``s for unknown registrations on the shared listener: a match is adopted on first contact.
    #: Live: the bridge hands a reload's rules to what applies them (``ModbusBridge.apply_settings``).
    rules: tuple[RegistrationRule, ...] = attrs.field(default=(), metadata=composed(Reload.LIVE))


# -- back to the file's spelling -----------------------------------------------


def link_table(link: LinkSettings) -> dict[str, Any]:
    """The ``[[link]]`` table that reads back as ``link``: the keys that differ from their defaults.

    What the database stores as a link's definition and the API shows, in the file's keys.
    """
    table = _settings_table(link)
    table.pop("registration_prefix", None)  # the older spelling of a registration_mode
    if link.serial is not None:
        table |= _settings_table(link.serial)
    return table


def meter_table(meter: MeterSettings) -> dict[str, Any]:
    """The ``[[meter]]`` table that reads back as ``meter``: its template, or its points as ``point``."""
    table = _settings_table(meter) | _settings_table(meter.limits)
    if meter.template is None:
        table["point"] = [_settings_table(point) for point in meter.points]
    return table


def _settings_table(instance: Any) -> dict[str, Any]:
    cls = type(instance)
    fields = attrs.fields_dict(cls)
    table: dict[str, Any] = {}
    for key, (name, _) in declared(cls).items():
        value = getattr(instance, name)
        default = fields[name].default
        if value is None or (default is not attrs.NOTHING and value == default):
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, bytes):
            value = encode_packet_option(value)
        table[key] = value
    return table
