"""Settings: defaults, overridden by a TOML file, overridden by the command line.

Everything is validated once, here, into frozen attrs objects; a bad value
raises ``ConfigError`` whose message is one line naming the file and key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from dtucenter.dtu.wire import DEFAULT_HEAD, DEFAULT_MAX_LENGTH, Dialect, WireError, parse_head

DEFAULT_DB_URL = "sqlite:///dtucenter.db"
DEFAULT_API = "tcp:8080:interface=127.0.0.1"
UNKNOWN_DTU_POLICIES = ("reject", "accept")


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message is for the operator."""


@attrs.frozen
class Settings:
    dtu: str = "tcp:20000"
    dtu_udp: str | None = None
    db: str = DEFAULT_DB_URL
    unknown_dtu: str = "reject"
    login_timeout: float = 30.0
    frame_head: bytes = DEFAULT_HEAD
    max_frame_length: int = DEFAULT_MAX_LENGTH
    #: Seconds between writes of DTUs' last-seen times: a DB write per heartbeat would be wasteful.
    last_seen_interval: float = 15.0
    manhole: str | None = None
    manhole_keys: str = "~/.ssh/authorized_keys"
    manhole_host_key: str = "dtucenter_manhole_host_key"
    #: Seconds a DTU has to answer a command (SaveSetup, ReadSetup, ReadTest, SetControl).
    command_timeout: float = 10.0
    #: Endpoint of the HTTP JSON API, or "off".
    api: str = DEFAULT_API
    #: Bearer token for the API; None: read or create the token file. Kept out of reprs and logs.
    api_token: str | None = attrs.field(default=None, repr=False)
    #: The rest of the file ([modbus], [[link]], [[meter]]), for the services that own those tables.
    extra: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    source: str = "defaults"

    @property
    def dialect(self) -> Dialect:
        return Dialect(head=self.frame_head, max_length=self.max_frame_length)

    @property
    def udp_interface_and_port(self) -> tuple[str, int] | None:
        if self.dtu_udp is None:
            return None
        return parse_udp(self.dtu_udp)


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


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _number(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {number:g}")
        return number

    return convert


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            number = int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if number != value and not isinstance(value, str):
            raise ValueError(f"expected a whole number, got {value!r}")
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return convert


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _udp(value: Any) -> str:
    parse_udp(str(value))
    return str(value)


def _token(value: Any) -> str:
    # It travels in an HTTP header: visible ASCII only, and no spaces to confuse "Bearer TOKEN".
    if not isinstance(value, str) or not value or not all("!" <= c <= "~" for c in value):
        raise ValueError("expected a non-empty token of visible ASCII characters without spaces")
    return value


def _head(value: Any) -> bytes:
    try:
        head = parse_head(_text(value))
        Dialect(head=head)
    except (WireError, ValueError) as e:
        raise ValueError(str(e)) from None
    return head


#: Every setting a file or the command line may give, with its converter.
#: Sub-systems extend this table (one place for names, checks and defaults).
CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "dtu": _text,
    "dtu_udp": _udp,
    "db": _text,
    "unknown_dtu": _choice(*UNKNOWN_DTU_POLICIES),
    "login_timeout": _number(1, 3600),
    "frame_head": _head,
    "max_frame_length": _integer(64, 65535),
    "last_seen_interval": _number(1, 3600),
    "manhole": _text,
    "manhole_keys": _text,
    "manhole_host_key": _text,
    "command_timeout": _number(0.01, 3600),
    "api": _text,
    "api_token": _token,
}

#: Tables of the file that belong to other services and are passed through.
PASS_THROUGH_TABLES = frozenset({"modbus", "link", "meter"})


def load_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def build_settings(
    file_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "defaults",
) -> Settings:
    """Merge defaults < file < overrides (``None`` in overrides means not given)."""
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name in PASS_THROUGH_TABLES:
            extra[name] = value
            continue
        values[name] = _convert(name, value, f"{source}: {key}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = key.replace("-", "_")
        values[name] = _convert(name, value, f"--{key.replace('_', '-')}")
    known = {a.name for a in attrs.fields(Settings)}
    settings_values = {k: v for k, v in values.items() if k in known}
    extra.update({k: v for k, v in values.items() if k not in known})
    return Settings(**settings_values, extra=extra, source=source)


def _convert(name: str, value: Any, where: str) -> Any:
    converter = CONVERTERS.get(name)
    if converter is None:
        raise ConfigError(f"{where}: unknown setting")
    try:
        return converter(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_settings(config_path: str | None, overrides: Mapping[str, Any]) -> Settings:
    file_values = load_file(config_path) if config_path else {}
    return build_settings(file_values, overrides, source=config_path or "defaults")
