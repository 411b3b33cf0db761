"""The ``[mqtt]`` table and ``--mqtt*`` options: where the broker is and what is published how.

Read by ``dtucenter.config`` with the same converters and messages as every
other table; the records are plain so that the publisher gets them passed in.
"""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from dtucenter.setting import boolean, choice, integer, number, setting, stripped, text

#: Placeholders a topic template may use.
PLACEHOLDERS = ("account", "kind", "device", "point", "rule")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PROTOCOL_VERSIONS = ("3.1.1", "5")
#: ``value``: a message per value (``{point}`` in the topic); ``device``: one per upload or poll, all its values;
#: ``batch``: one per account and hand-over (every 5 ms at most), every upload and poll since (fleets at ingest rates).
PAYLOAD_SHAPES = ("value", "device", "batch")


@attrs.frozen
class Broker:
    """A broker URL taken apart; the password is kept out of reprs and logs."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_broker_url(value: str) -> Broker:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``; raises ``ValueError`` saying what is wrong."""
    parts = urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"expected mqtt://[user:pass@]host[:port] or mqtts://..., got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a broker URL has no path, query or fragment, got {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"not a port number in {value!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {value!r}")
    return Broker(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _broker_url(value: Any) -> str:
    url = stripped(value)
    parse_broker_url(url)
    return url


def topic_template(value: Any) -> str:
    """A topic with ``{account}``, ``{kind}``, ``{device}``, ``{point}``, ``{rule}`` placeholders and no wildcards."""
    template = text(value)
    if "+" in template or "#" in template:
        raise ValueError(f"a topic to publish on has no wildcards (+, #), got {template!r}")
    try:
        fields = [name for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"not a topic template {template!r}: {e}") from None
    unknown = [name for name in fields if name not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} (known: {', '.join(PLACEHOLDERS)})")
    return template


def _client_id(value: Any) -> str:
    client_id = text(value)
    if len(client_id.encode()) > 65535:
        raise ValueError("must be at most 65535 bytes")
    return client_id


@attrs.frozen
class MqttSettings:
    """Publishing to an MQTT broker; off while ``url`` is None."""

    url: str | None = attrs.field(
        default=None,
        repr=False,  # it may hold a password
        metadata=setting(
            _broker_url, "MQTT broker to publish to: mqtt://[user:pass@]host[:port] or mqtts://... (default off).",
            option="mqtt",
        ),
    )
    topic: str = attrs.field(
        default="dtucenter/{account}/{device}/{point}",
        metadata=setting(topic_template, "Topic template of published values.", option="mqtt-topic"),
    )
    status_topic: str = attrs.field(
        default="dtucenter/{account}/{device}/status",
        metadata=setting(topic_template, "Topic template of the retained online status of DTUs, links and meters."),
    )
    alarm_topic: str = attrs.field(
        default="dtucenter/{account}/{device}/alarms/{rule}",
        metadata=setting(topic_template, "Topic template of alarms raised and cleared (retained: each rule's state)."),
    )
    center_topic: str = attrs.field(
        default="dtucenter/center/status",
        metadata=setting(topic_template, "The center's own retained status (birth message and last will)."),
    )
    version: str = attrs.field(
        default="3.1.1",
        metadata=setting(choice(*PROTOCOL_VERSIONS), "MQTT protocol version: 3.1.1 or 5.", option="mqtt-version"),
    )
    qos: int = attrs.field(
        default=1, metadata=setting(integer(0, 1), "QoS of published messages: 0 or 1.", option="mqtt-qos")
    )
    retain: bool = attrs.field(
        default=True,
        metadata=setting(boolean, "Publish values retained, so that each value topic holds its last value."),
    )
    payload: str = attrs.field(
        default="value",
        metadata=setting(
            choice(*PAYLOAD_SHAPES),
            "value: a message per value; device: one per upload or poll with all its values;"
            " batch: one per account and moment, with every upload and poll of that moment.",
        ),
    )
    batch_topic: str = attrs.field(
        default="dtucenter/{account}/batch",
        metadata=setting(topic_template, "Topic of the batches, with payload = batch."),
    )
    client_id: str = attrs.field(
        default="dtucenter",
        metadata=setting(_client_id, "MQTT client id of the center.", option="mqtt-client-id"),
    )
    keepalive: int = attrs.field(
        default=30, metadata=setting(integer(5, 3600), "Seconds between keep-alive pings to the broker.")
    )
    ca: str | None = attrs.field(
        default=None, metadata=setting(stripped, "CA certificate file for mqtts:// (default: the system's).")
    )
    cert: str | None = attrs.field(
        default=None, metadata=setting(stripped, "Client certificate file for mqtts://, if the broker asks for one.")
    )
    key: str | None = attrs.field(
        default=None, metadata=setting(stripped, "Private key file of the client certificate.")
    )
    backlog: int = attrs.field(
        default=1_000_000,
        metadata=setting(
            integer(100, 10**9),
            "Messages kept in the database while the broker is away; more are dropped, counted and logged.",
        ),
    )
    refresh: float = attrs.field(
        default=60.0,
        metadata=setting(
            number(1, 86400), "Seconds between re-reads of devices' accounts and DTUs' register lists."
        ),
    )

    @property
    def broker(self) -> Broker | None:
        return parse_broker_url(self.url) if self.url is not None else None
