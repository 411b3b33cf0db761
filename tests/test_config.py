"""Settings from defaults, file, environment and command line; errors are one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted

from dtucenter.config import (
    ConfigError,
    Settings,
    UsageError,
    command_line_options,
    load_settings,
    read_settings,
)
from dtucenter.tap import Options, exit_on_usage_error
from tests.support import run_twistd


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "center.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    settings = read_settings({})
    assert settings == Settings()
    assert settings.dtu == "tcp:20000" and settings.dtu_udp is None
    assert settings.db == "sqlite:///dtucenter.db" and settings.unknown_dtu == "pending"
    assert settings.login_timeout == 30 and settings.frame_head == b"\xaa\x55"
    assert settings.no_upgrade is False and settings.source == "defaults"


def test_file_then_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'dtu = "tcp:21000"\nunknown-dtu = "accept"\nframe_head = "7E7E"\nlogin_timeout = 5\n')
    options = Options()
    options.parseOptions(["--config", path, "--login-timeout", "12"])
    s = options.settings
    assert (s.dtu, s.unknown_dtu, s.frame_head, s.login_timeout) == ("tcp:21000", "accept", b"\x7e\x7e", 12)
    assert s.dialect.head == b"\x7e\x7e"
    assert s.source == path


def test_every_option_wins_over_its_file_key(tmp_path: Path) -> None:
    file = {
        "dtu": "tcp:1", "dtu_udp": "2", "db": "sqlite:///a.db", "unknown_dtu": "reject", "login_timeout": 3,
        "frame_head": "AA55", "max_frame_length": 100, "manhole": "tcp:4", "manhole_keys": "k1",
        "manhole_host_key": "h1", "command_timeout": 5, "api": "tcp:6", "api_token": "file-token",
        "node_id": "a-1", "node_lease": 20, "node_url": "http://a:1",
        "no_upgrade": False, "log_rotate_size": 8000, "log_keep": 8,
        "dtu_udp_pending": 8, "pending_per_host": 9, "pending_total": 9, "pending_expire": 9,
        "modbus": {"listen": "tcp:7", "server": "tcp:9", "server_allow": ["10.0.0.0/8"],
                   "unknown_registration": "reject"},
        "metrics": "tcp:5", "metrics_per_link": False,
        "mqtt": {"url": "mqtt://file", "topic": "f/{point}", "version": "3.1.1", "qos": 0, "client_id": "f"},
    }
    options = {
        "dtu": "tcp:11", "dtu-udp": "12", "db": "sqlite:///b.db", "unknown-dtu": "accept", "login-timeout": "13",
        "frame-head": "7E7E", "max-frame-length": "0x400", "manhole": "tcp:14", "manhole-keys": "k2",
        "manhole-host-key": "h2", "command-timeout": "15", "api": "off", "api-token": "option-token",
        "no-upgrade": True, "modbus": "tcp:17", "log-rotate-size": "18000", "log-keep": "18",
        "node-id": "b-2", "node-lease": "30", "node-url": "https://b:2/",
        "dtu-udp-pending": "18", "pending-per-host": "19", "pending-total": "19", "pending-expire": "19",
        "unknown-registration": "adopt:acme:eastron-sdm120",
        "modbus-server": "tcp:19", "modbus-server-allow": "192.168.1.0/24, 10.1.2.3",
        "metrics": "tcp:15", "metrics-per-link": True,
        "mqtt": "mqtts://option", "mqtt-topic": "o/{point}", "mqtt-version": "5", "mqtt-qos": "1",
        "mqtt-client-id": "o",
    }
    assert {option.name for option in command_line_options()} == set(options), "every option is covered here"
    from_file = read_settings(file, source="center.toml")
    both = read_settings(file, options, source="center.toml")
    assert (from_file.dtu, from_file.login_timeout, from_file.modbus.listen, from_file.no_upgrade) == (
        "tcp:1", 3, "tcp:7", False)
    assert (both.dtu, both.dtu_udp, both.db, both.unknown_dtu, both.login_timeout) == (
        "tcp:11", "12", "sqlite:///b.db", "accept", 13)
    assert (both.frame_head, both.max_frame_length, both.manhole, both.manhole_keys, both.manhole_host_key) == (
        b"\x7e\x7e", 1024, "tcp:14", "k2", "h2")
    assert (both.command_timeout, both.api, both.api_token, both.no_upgrade, both.modbus.listen) == (
        15, "off", "option-token", True, "tcp:17")
    assert (from_file.log_rotate_size, from_file.log_keep, both.log_rotate_size, both.log_keep) == (8000, 8, 18000, 18)
    assert (from_file.pending_per_host, from_file.pending_total, from_file.pending_expire) == (9, 9, 9)
    assert (both.pending_per_host, both.pending_total, both.pending_expire) == (19, 19, 19)
    assert str(from_file.modbus.unknown_registration) == "reject"
    assert str(both.modbus.unknown_registration) == "adopt:acme:eastron-sdm120"
    assert (from_file.dtu_udp_pending, both.dtu_udp_pending) == (8, 18)
    assert (from_file.modbus.server, from_file.modbus.server_allow) == ("tcp:9", ("10.0.0.0/8",))
    assert (both.modbus.server, both.modbus.server_allow) == ("tcp:19", ("192.168.1.0/24", "10.1.2.3/32"))
    assert (from_file.node_id, from_file.node_lease, from_file.node_url) == ("a-1", 20, "http://a:1")
    assert (both.node_id, both.node_lease, both.node_url) == ("b-2", 30, "https://b:2")
    assert (from_file.metrics, from_file.metrics_per_link, both.metrics, both.metrics_per_link) == (
        "tcp:5", False, "tcp:15", True)
    mqtt = from_file.mqtt
    assert (mqtt.url, mqtt.topic, mqtt.status_topic, mqtt.center_topic, mqtt.version) == (
        "mqtt://file", "f/{point}", "dtucenter/{account}/{device}/status", "dtucenter/center/status", "3.1.1")
    assert (from_file.mqtt.qos, from_file.mqtt.client_id) == (0, "f")
    assert (both.mqtt.url, both.mqtt.topic, both.mqtt.version, both.mqtt.qos, both.mqtt.client_id) == (
        "mqtts://option", "o/{point}", "5", 1, "o")


def test_no_upgrade_from_the_file_or_the_flag(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "no_upgrade = true\n")).no_upgrade is True
    options = Options()
    options.parseOptions(["--no-upgrade"])
    assert options.settings.no_upgrade is True
    options = Options()
    options.parseOptions([])
    assert options.settings.no_upgrade is False


@pytest.mark.parametrize(
    ("file", "environ", "options", "expected"),
    [
        ({}, {}, {}, None),
        ({"api_token": "f"}, {}, {}, "f"),
        ({"api_token": "f"}, {"DTUCENTER_API_TOKEN": "e"}, {}, "e"),
        ({"api_token": "f"}, {"DTUCENTER_API_TOKEN": "e"}, {"api-token": "o"}, "o"),
        ({"api_token": "f"}, {"DTUCENTER_API_TOKEN": ""}, {}, "f"),
    ],
)
def test_api_token_option_then_environment_then_file(
    file: dict[str, str], environ: dict[str, str], options: dict[str, str], expected: str | None
) -> None:
    assert read_settings(file, options, environ=environ).api_token == expected


def test_a_bad_token_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^\$DTUCENTER_API_TOKEN: expected a non-empty token"):
        read_settings({}, environ={"DTUCENTER_API_TOKEN": "two words"})


@pytest.mark.parametrize(
    ("modbus_table", "options", "expected"),
    [
        ("login_timeout = 7", {}, 7),  # [modbus] login_timeout wins over the top-level one
        ("login_timeout = 7", {"login-timeout": "9"}, 9),  # the command line wins over the file
        ("", {}, 5),  # the file's top-level login_timeout
    ],
)
def test_which_login_timeout_modbus_gets(modbus_table: str, options: dict[str, str], expected: float) -> None:
    import tomllib

    document = tomllib.loads(f"login_timeout = 5\n[modbus]\n{modbus_table}\n")
    assert read_settings(document, options).modbus.login_timeout == expected
    assert read_settings({}).modbus.login_timeout == 30


def test_where_a_value_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, 'dtu = "tcp:1"\n[modbus]\nlisten = "tcp:2"\n')
    from_file = load_settings(path, {"api": "tcp:3"})
    assert from_file.where("dtu") == f"{path}: dtu"
    assert from_file.where("modbus.listen") == f"{path}: modbus: listen"
    assert from_file.where("api") == "--api"
    assert from_file.where("db") == "--db", "a default is named by the option that changes it"
    assert load_settings(path, {"modbus": "tcp:4"}).where("modbus.listen") == "--modbus"
    assert read_settings({}).where("last_seen_interval") == "last_seen_interval"


@pytest.mark.parametrize(
    "text, message",
    [
        ("login_timeout = 'soon'", "login_timeout: must be a number, got 'soon'"),
        ("login_timeout = 0", "login_timeout: must be between 1 and 3600, got 0"),
        ("unknown_dtu = 'maybe'", "unknown_dtu: must be one of reject, pending, accept, got 'maybe'"),
        ("frame_head = 'XYZ'", "frame_head: frame head must be hex digits"),
        ("frame_head = 3", "frame_head: must be a non-empty string, got 3"),
        ("dtu_udp = 'abc'", "dtu_udp: expected PORT or INTERFACE:PORT"),
        ("dtu_udp = 70000", "dtu_udp: port must be 0..65535, got 70000"),
        ("max_frame_length = 10", "max_frame_length: must be between 64 and 65535, got 10"),
        ("max_frame_length = 100.5", "max_frame_length: must be a whole number, got 100.5"),
        ("dtu = 'nonsense:1'", "dtu: not a usable server endpoint 'nonsense:1'"),
        ("api = 'tcp:port'", "api: not a usable server endpoint 'tcp:port'"),
        ("manhole = ''", "manhole: must be a non-empty string, got ''"),
        ("api_token = 'a b'", "api_token: expected a non-empty token"),
        ("no_upgrade = 'yes'", "no_upgrade: must be true or false, got 'yes'"),
        ("colour = 'blue'", "colour: unknown key (a typo?)"),
        ("[modbus]\nunknown_registration = 'adopt:acme:nope'",
         ("modbus: unknown_registration: no template named 'nope' (templates: eastron-sdm120, eastron-sdm630,"
          " generic-energy-meter)")),
        ("[modbus]\nunknown_registration = 'maybe'",
         "modbus: unknown_registration: must be reject, pending or adopt:ACCOUNT[:TEMPLATE], got 'maybe'"),
        ("pending_per_host = 0", "pending_per_host: must be between 1 and 1000000, got 0"),
        ("login-timeout = 5\nlogin_timeout = 6", "login_timeout: given twice, as login-timeout and login_timeout"),
        ("dtu = ", "not valid TOML"),
    ],
)
def test_bad_file_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


def test_file_values_that_worked_before_still_work(tmp_path: Path) -> None:
    # Numbers as text, a UDP port as a number, a hex Length: all were accepted and still are.
    path = write(tmp_path, "login_timeout = '5'\ndtu_udp = 20001\nmax_frame_length = '0x400'\n"
                           "db = ' sqlite:///x.db '\n")
    settings = load_settings(path)
    assert (settings.login_timeout, settings.dtu_udp, settings.max_frame_length, settings.db) == (
        5, "20001", 1024, "sqlite:///x.db")
    assert settings.udp_interface_and_port == ("", 20001)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"login-timeout": "0"}, "--login-timeout: must be between 1 and 3600, got 0"),
        ({"login-timeout": "abc"}, "--login-timeout: must be a number, got 'abc'"),
        ({"max-frame-length": "big"}, "--max-frame-length: must be a whole number, got 'big'"),
        ({"dtu": "nonsense:1"}, "--dtu: not a usable server endpoint 'nonsense:1'"),
        ({"modbus": "tcp:port"}, "--modbus: not a usable server endpoint 'tcp:port'"),
        ({"unknown-dtu": "maybe"}, "--unknown-dtu: must be one of reject, pending, accept, got 'maybe'"),
        ({"unknown-registration": "adopt::eastron-sdm120"},
         "--unknown-registration: adopt: names no account, in 'adopt::eastron-sdm120'"),
        ({"unknown-registration": "adopt:acme:Bad Name"},
         "--unknown-registration: must be lower-case letters, digits and dashes (at most 100), got 'Bad Name'"),
        ({"unknown-registration": "adopt:acme:nope"},
         ("--unknown-registration: no template named 'nope'"
          " (templates: eastron-sdm120, eastron-sdm630, generic-energy-meter)")),
    ],
)
def test_bad_command_line_value_names_the_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, options)
    assert str(caught.value).startswith(message), str(caught.value)


def test_file_errors() -> None:
    with pytest.raises(ConfigError, match=r"^/nonexistent/center\.toml: no such file$"):
        load_settings("/nonexistent/center.toml", {})
    with pytest.raises(ConfigError, match=r"^/: cannot read: Is a directory$"):
        load_settings("/", {})
    with pytest.raises(ConfigError, match=r"^center\.toml: must be a table, got an array$"):
        read_settings([], source="center.toml")  # type: ignore[arg-type]


def test_a_config_error_is_a_usage_error_and_only_tap_exits() -> None:
    assert issubclass(ConfigError, UsageError)
    with pytest.raises(SystemExit) as caught, exit_on_usage_error():
        load_settings(None, {"login-timeout": "0"})
    assert caught.value.code == "dtucenter: --login-timeout: must be between 1 and 3600, got 0"


def test_the_options_parser_exits_with_one_line() -> None:
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--login-timeout", "0"])
    assert caught.value.code == "dtucenter: --login-timeout: must be between 1 and 3600, got 0"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--login-timeout", "abc"], "dtucenter: --login-timeout: must be a number, got 'abc'"),
        (["--config", "/nonexistent.toml"], "dtucenter: /nonexistent.toml: no such file"),
        (["--dtu", "nonsense:1"], "dtucenter: --dtu: not a usable server endpoint 'nonsense:1'"),
        (["--db", "nodriver://x"], "dtucenter: --db: no driver for 'nodriver'"),
    ],
)
def test_twistd_reports_bad_settings_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_twistd(tmp_path, *args)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.startswith(message), output
    assert len(output.splitlines()) == 1 and "Traceback" not in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("login_timeout = 0\n", "login_timeout: must be between 1 and 3600, got 0"),
        ('db = "nodriver://x"\n', "db: no driver for 'nodriver'"),
    ],
)
def test_twistd_reports_a_bad_file_value_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    result = run_twistd(tmp_path, "--config", path, "--api", "off")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.startswith(f"dtucenter: {path}: {message}"), output
    assert len(output.splitlines()) == 1


def options_for(tmp_path: Path, *args: str) -> Options:
    """Options with a database in ``tmp_path`` unless ``args`` say where it is."""
    parsed = Options()
    db = [] if {"--db", "--config"} & set(args) else ["--db", f"sqlite:///{tmp_path / 'c.db'}"]
    parsed.parseOptions([*db, *args])
    return parsed


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda tmp: None, ["--db", "sqlite:////no/such/dir/c.db"],
         "dtucenter: --db: directory /no/such/dir for the SQLite database does not exist"),
        (lambda tmp: (tmp / "center.toml").write_text('db = "sqlite:////no/such/dir/c.db"\n'),
         ["--config", "{tmp}/center.toml"],
         "dtucenter: {tmp}/center.toml: db: directory /no/such/dir for the SQLite database does not exist"),
        (lambda tmp: (tmp / "dtucenter.token").mkdir(), ["--api", "tcp:0:interface=127.0.0.1"],
         "dtucenter: cannot read the API token file {tmp}/dtucenter.token: [Errno 21] Is a directory"),
        (lambda tmp: None, ["--api", "off", "--manhole", "tcp:0", "--manhole-keys", "{tmp}/none"],
         "dtucenter: manhole: authorized keys file {tmp}/none does not exist"),
        (lambda tmp: (tmp / "keys").write_text(""),
         ["--api", "off", "--manhole", "tcp:0", "--manhole-keys", "{tmp}/keys",
          "--manhole-host-key", "{tmp}/missing/host_key"],
         "dtucenter: manhole host key {tmp}/missing/host_key: cannot create it: No such file or directory"),
    ],
)
def test_what_only_building_the_center_finds_is_one_line(
    tmp_path: Path, setup: Any, args: list[str], message: str
) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from dtucenter.tap import makeService

    setup(tmp_path)
    parsed = options_for(tmp_path, *(arg.format(tmp=tmp_path) for arg in args))
    with pytest.raises(SystemExit) as caught:
        makeService(parsed, MemoryReactorClock())
    assert str(caught.value.code).startswith(message.format(tmp=tmp_path)), caught.value.code


@pytest.mark.parametrize(
    ("file", "args", "where"),
    [
        ("", ["--dtu", "tcp:{port}:interface=127.0.0.1"], "--dtu"),
        ('dtu = "tcp:{port}:interface=127.0.0.1"\n', [], "{config}: dtu"),
        ('dtu = "tcp:0:interface=127.0.0.1"\napi = "tcp:{port}:interface=127.0.0.1"\n', [], "{config}: api"),
    ],
)
@pytest.mark.expected_errors("cannot listen: Couldn't listen on 127.0.0.1")
@pytest_twisted.ensureDeferred
async def test_a_port_in_use_is_named_by_where_its_endpoint_came_from(
    tmp_path: Path, file: str, args: list[str], where: str
) -> None:
    import socket

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from dtucenter.tap import makeService

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(tmp_path, file.format(port=port) + f'db = "sqlite:///{tmp_path / "c.db"}"\n')
        parsed = options_for(tmp_path, "--config", config, *(arg.format(port=port) for arg in args))
        if "api" not in file:
            parsed.settings = attrs.evolve(parsed.settings, api="off")
        service = makeService(parsed, reactor)
        with pytest.raises(SystemExit) as caught:
            service.privilegedStartService()
    expected = f"dtucenter: {where.format(config=config)}: Couldn't listen on 127.0.0.1:{port}: "
    assert str(caught.value.code).startswith(expected), caught.value.code
    await deferLater(reactor, 0, lambda: None)  # a port that did bind closes on the reactor's next turn
