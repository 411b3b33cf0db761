"""The center as a real ``twistd -n dtucenter`` process: signals, and a log file that stays bounded."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from dtucenter.dtu import wire
from dtucenter.process import bounded_log_file
from dtucenter.store import queries
from tests.support import SILENCE_LIMIT, STEP_TIMEOUT, end_process_group, start_process

TWISTD = str(Path(sys.executable).parent / "twistd")


def _text_unless_rotated_away(path: Path) -> str:
    """A log file's text; "" when a rotation renamed or deleted it since it was listed."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class Center:
    """A ``twistd -n dtucenter`` child logging to ``log`` (twistd's ``--logfile``)."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, stderr: Path) -> None:
        self.process = process
        self.log = log
        self.stderr = stderr

    def text(self, rotated_too: bool = False) -> str:
        """The current log file, or every log file, oldest first."""
        files = sorted(self.log.parent.glob(self.log.name + ".*"), reverse=True) if rotated_too else []
        return "".join(map(_text_unless_rotated_away, [*files, self.log]))

    def wait_for_log(self, pattern: str, rotated_too: bool = False) -> re.Match[str]:
        """Waits for ``pattern`` in the log; fails at once if the process ends instead."""
        deadline = time.monotonic() + SILENCE_LIMIT
        while not (found := re.search(pattern, self.text(rotated_too))):
            if self.process.poll() is not None:
                raise AssertionError(f"center exited ({self.process.returncode}) before logging {pattern!r}:\n"
                                     f"{self.text()[-3000:]}\n{self.stderr.read_text(errors='replace')[-3000:]}")
            assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{self.text()[-3000:]}"
            time.sleep(0.02)
        return found

    @property
    def dtu_port(self) -> int:
        return int(self.wait_for_log(r"DTUFactory starting on (\d+)")[1])

    def signal(self, number: signal.Signals) -> None:
        os.kill(self.process.pid, number)


@contextmanager
def twistd_center(tmp_path: Path, *args: str) -> Iterator[Center]:
    log, stderr = tmp_path / "center.log", tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = start_process(
            [TWISTD, "-n", "--pidfile=", f"--logfile={log}", "dtucenter",
             "--dtu", "tcp:0:interface=127.0.0.1", "--api", "off", "--unknown-dtu", "accept",
             "--db", f"sqlite:///{tmp_path / 'center.db'}", *args],
            cwd=tmp_path, stdout=err, stderr=err,
        )
    try:
        yield Center(process, log, stderr)
    finally:
        end_process_group(process)


class BlockingDTU:
    """A DTU on a plain socket, for a test that is not on a reactor."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        self.parser = wire.FrameParser()
        self.received: list[object] = []

    def ask(self, message: wire.Message, answer: type[object]) -> object:
        self.sock.sendall(wire.encode_frame(message))
        while not self.received:
            data = self.sock.recv(65536)
            assert data, "the center closed the connection"
            self.received.extend(self.parser.feed(data))
        reply = self.received.pop(0)
        assert isinstance(reply, answer), reply
        return reply

    def login(self, psn: int) -> None:
        ack = self.ask(wire.Login(psn, 1), wire.LoginAck)
        assert ack.accepted  # type: ignore[attr-defined]

    def close(self) -> None:
        self.sock.close()


def test_sighup_leaves_the_center_running_and_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    with twistd_center(tmp_path) as center:
        port = center.dtu_port
        dtu = BlockingDTU(port)
        dtu.login(7001)
        for code in range(5):
            dtu.ask(wire.SendTest(net_state=20, test_code=code, values=(code, -code)), wire.SendTestAck)

        center.signal(signal.SIGHUP)
        center.wait_for_log(r"received SIGHUP")
        assert center.process.poll() is None
        second = BlockingDTU(port)  # still answering
        second.login(7002)
        second.ask(wire.SendTick(), wire.SendTickAck)

        center.signal(signal.SIGTERM)
        assert center.process.wait(SILENCE_LIMIT) == 0  # not killed by the signal
        dtu.close()
        second.close()
        log = center.text()
        lines = log.splitlines()
        assert "received SIGTERM, shutting down" in log
        stopped = next(i for i, line in enumerate(lines) if line.endswith("dtucenter stopped"))
        assert not any("#error]" in line or "#critical]" in line for line in lines), log
        assert any("DTU 7001 offline" in line for line in lines[:stopped]), log  # connections closed first

    engine = create_engine(f"sqlite:///{tmp_path / 'center.db'}")
    try:
        with Session(engine) as session:
            stored = [(s.position, s.value) for s in queries.query_samples(session, 7001)]
            dtu_row = queries.get_dtu(session, 7001)
    finally:
        engine.dispose()
    # Every upload acknowledged before SIGTERM is in the database.
    uploaded = [(position, sign * code) for code in range(5) for position, sign in ((0, 1), (1, -1))]
    assert sorted(stored) == sorted(uploaded)
    assert dtu_row is not None and not dtu_row.online


def test_sigint_also_stops_with_status_0(tmp_path: Path) -> None:
    with twistd_center(tmp_path) as center:
        BlockingDTU(center.dtu_port).login(7003)
        center.signal(signal.SIGINT)
        assert center.process.wait(SILENCE_LIMIT) == 0
        assert "received SIGINT, shutting down" in center.text()


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:  # between the rotation's rename and its new file
        return None


def until_true(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SILENCE_LIMIT
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {SILENCE_LIMIT}s"
        time.sleep(0.02)


def test_the_log_file_stays_bounded_over_many_rotations(tmp_path: Path) -> None:
    keep = 3
    with twistd_center(tmp_path, "--log-rotate-size", "1000", "--log-keep", str(keep)) as center:
        port = center.dtu_port
        # Each login logs a line or two (enrolled, logged in, offline): many times the rotation size.
        logins = 150
        for psn in range(1, logins + 1):
            dtu = BlockingDTU(port)
            dtu.login(psn)
            dtu.close()
        last = rf"DTU {logins} offline"  # the last line the logins cause
        center.wait_for_log(last, rotated_too=True)
        # twistd's rotation on demand still works: a new file, then a line written to it. (Listing the files
        # while the rotation renames them, or before anything is in the new file, would see half a rotation.)
        before = (tmp_path / "center.log").stat().st_ino
        center.signal(signal.SIGUSR1)
        until_true(lambda: inode(tmp_path / "center.log") not in (None, before), "a rotation on SIGUSR1")
        dtu = BlockingDTU(port)
        dtu.login(logins + 1)
        dtu.close()
        center.wait_for_log(rf"DTU {logins + 1} offline")
        assert last not in center.text()
        files = sorted(path.name for path in tmp_path.glob("center.log*"))
    assert files == ["center.log", *(f"center.log.{i}" for i in range(1, keep + 1))]
    kept = "".join((tmp_path / name).read_text(errors="replace") for name in files)
    assert "DTU 1 logged in" not in kept  # the oldest were deleted: many rotations, not one
    for name in files[1:]:
        assert (tmp_path / name).stat().st_size < 1000 + 500  # rotated at the size given


@pytest.mark.parametrize(
    "twistd_options",
    [
        {"nodaemon": True, "logfile": ""},  # -n: stdout
        {"nodaemon": True, "logfile": "-"},
        {"syslog": True, "logfile": "center.log"},
        {"logger": "my.observer", "logfile": "center.log"},
    ],
)
def test_where_twistd_does_not_log_to_a_file_it_is_left_alone(twistd_options: dict[str, object]) -> None:
    assert bounded_log_file(twistd_options, 1000, 3) is None


@pytest.mark.parametrize(
    ("twistd_options", "name"),
    [({"nodaemon": True, "logfile": "center.log"}, "center.log"), ({"nodaemon": False, "logfile": ""}, "twistd.log")],
)
def test_a_log_file_is_where_twistd_would_put_it_and_bounded(
    twistd_options: dict[str, object], name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log_file = bounded_log_file(twistd_options, 1000, 3)
    assert log_file is not None
    try:
        assert (Path(log_file.path), log_file.rotateLength, log_file.maxRotatedFiles) == (tmp_path / name, 1000, 3)
    finally:
        log_file.close()
