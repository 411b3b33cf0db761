"""The manhole with a real OpenSSH client: key login, the live namespace, refusal of other keys."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from tests.support import STEP_TIMEOUT, connect_dtu, run_process, start_center, until

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")


class ScriptedSSH(protocol.ProcessProtocol):
    """Types one expression at the manhole prompt, then Ctrl-D."""

    def __init__(self, expression: bytes, answer: bytes) -> None:
        self.expression = expression
        self.answer = answer
        self.output = b""
        self.typed = False
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.typed and b">>> " in self.output:
            self.typed = True
            self.transport.write(self.expression + b"\r")  # type: ignore[union-attr]
        elif self.typed and self.answer in self.output:
            self.transport.write(b"\x04")  # Ctrl-D ends the session  # type: ignore[union-attr]

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        self.done.callback(self.output)


def keypair(tmp_path: Path, name: str) -> Path:
    key = tmp_path / name
    result = run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return key


def ssh(key: Path, port: int, expression: bytes, answer: bytes) -> defer.Deferred[bytes]:
    """Evaluate ``expression`` in the manhole; ends when ``answer`` shows up (or ssh gives up)."""
    client = ScriptedSSH(expression, answer)
    args = [
        "ssh", "-tt", "-i", str(key), "-p", str(port),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
        "operator@127.0.0.1",
    ]
    process = reactor.spawnProcess(client, "ssh", args, env={"PATH": "/usr/bin:/bin"})

    def kill(failure: Failure) -> Failure:  # ssh starts nothing of its own: ending it ends all it started
        if process.pid is not None:
            process.signalProcess("KILL")
        return failure

    return client.done.addTimeout(STEP_TIMEOUT, reactor).addErrback(kill)


@pytest.fixture
def log_texts() -> Iterator[list[str]]:
    """Every line logged while the test runs, as text."""
    seen: list[str] = []

    def observe(event: LogEvent) -> None:
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


async def logged_out(log_texts: list[str]) -> None:
    """OpenSSH's "disconnected by user" at the end of an ordinary session is logged as a logout, not as an
    error (Twisted's SSH server alone logs every DISCONNECT as one). Wait until it is logged: inside this
    test, so that an error it might log would fail this test and not a later one."""
    await until(lambda: any("Manhole client logged out: disconnected by user" in text for text in log_texts))


@pytest_twisted.ensureDeferred
async def test_manhole_shows_live_sessions_to_an_authorized_key(tmp_path: Path, log_texts: list[str]) -> None:
    allowed = keypair(tmp_path, "allowed")
    stranger = keypair(tmp_path, "stranger")
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(allowed.with_suffix(".pub").read_bytes())
    host_key = tmp_path / "host_key"
    center = await start_center(
        tmp_path, "--unknown-dtu", "accept", "--manhole", "tcp:0:interface=127.0.0.1",
        "--manhole-keys", str(authorized), "--manhole-host-key", str(host_key),
    )
    try:
        port = (await center.service.getServiceNamed("manhole").when_listening()).getHost().port  # type: ignore[attr-defined]
        dtu = await connect_dtu(center)
        await dtu.login(4711, 1)
        # The answer is computed in the center: 4711 is only there as a live session's PSN.
        output = await ssh(allowed, port, b"sorted(sessions)[0] + 1000000", b"1004711")
        assert b"1004711" in output
        await logged_out(log_texts)
        refused = await ssh(stranger, port, b"1", b"never")
        assert b"Permission denied" in refused and b"1004711" not in refused
        assert host_key.stat().st_mode & 0o777 == 0o600
    finally:
        await center.stop()


def test_missing_authorized_keys_is_a_one_line_error(tmp_path: Path) -> None:
    from dtucenter.tap import Options, makeService

    options = Options()
    options.parseOptions(["--db", f"sqlite:///{tmp_path / 'c.db'}", "--manhole", "tcp:0",
                          "--manhole-keys", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"authorized keys file .* does not exist"):
        makeService(options, reactor)


@pytest_twisted.ensureDeferred
async def test_manhole_namespace_has_the_modbus_bridge(tmp_path: Path, log_texts: list[str]) -> None:
    allowed = keypair(tmp_path, "allowed")
    authorized = tmp_path / "authorized_keys"
    authorized.write_bytes(allowed.with_suffix(".pub").read_bytes())
    config = tmp_path / "center.toml"
    config.write_text(
        '[[link]]\nname = "panel"\nserial = "/nonexistent/ttyUSB9"\n'
        '[[meter]]\nname = "m1"\nlink = "panel"\nunit = 1\n'
        '[[meter.point]]\nname = "volts"\ntable = "holding"\naddress = 0\n'
    )
    center = await start_center(
        tmp_path, "--config", str(config), "--manhole", "tcp:0:interface=127.0.0.1",
        "--manhole-keys", str(authorized), "--manhole-host-key", str(tmp_path / "host_key"),
    )
    try:
        port = (await center.service.getServiceNamed("manhole").when_listening()).getHost().port  # type: ignore[attr-defined]
        output = await ssh(allowed, port, b"sorted(bridge.links)[0] * 3", b"panelpanelpanel")
        assert b"panelpanelpanel" in output
        await logged_out(log_texts)
    finally:
        await center.stop()
