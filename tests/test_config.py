"""Settings from defaults, file and command line; errors are one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtucenter.config import ConfigError, build_settings, load_settings
from dtucenter.tap import Options
from tests.support import run_twistd


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "center.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    settings = build_settings()
    assert settings.dtu == "tcp:20000" and settings.dtu_udp is None
    assert settings.db == "sqlite:///dtucenter.db" and settings.unknown_dtu == "reject"
    assert settings.login_timeout == 30 and settings.frame_head == b"\xaa\x55"


def test_file_then_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'dtu = "tcp:21000"\nunknown-dtu = "accept"\nframe_head = "7E7E"\nlogin_timeout = 5\n')
    options = Options()
    options.parseOptions(["--config", path, "--login-timeout", "12"])
    s = options.settings
    assert (s.dtu, s.unknown_dtu, s.frame_head, s.login_timeout) == ("tcp:21000", "accept", b"\x7e\x7e", 12)
    assert s.dialect.head == b"\x7e\x7e"


@pytest.mark.parametrize(
    "text, message",
    [
        ("login_timeout = 'soon'", "login_timeout: expected a number, got 'soon'"),
        ("unknown_dtu = 'maybe'", "unknown_dtu: must be one of reject, accept, got 'maybe'"),
        ("frame_head = 'XYZ'", "frame_head: frame head must be hex digits"),
        ("dtu_udp = 'abc'", "dtu_udp: expected PORT or INTERFACE:PORT"),
        ("max_frame_length = 10", "max_frame_length: must be between 64 and 65535, got 10"),
        ("colour = 'blue'", "colour: unknown setting"),
        ("dtu = ", "not valid TOML"),
    ],
)
def test_bad_file_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value).startswith(path) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_command_line_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match="^--login-timeout: must be between 1 and 3600, got 0$"):
        load_settings(None, {"login-timeout": "0"})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings("/nonexistent/center.toml", {})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--login-timeout", "abc"], "dtucenter: --login-timeout: expected a number, got 'abc'"),
        (["--config", "/nonexistent.toml"], "dtucenter: /nonexistent.toml: no such file"),
        (["--dtu", "nonsense:1"], "dtucenter: --dtu: not a usable endpoint"),
        (["--db", "nodriver://x"], "dtucenter: --db: no driver for 'nodriver'"),
    ],
)
def test_twistd_reports_bad_settings_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_twistd(tmp_path, *args)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.startswith(message), output
    assert len(output.splitlines()) == 1 and "Traceback" not in output
