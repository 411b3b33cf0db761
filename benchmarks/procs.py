"""Child processes for the benchmark: the center, the baseline, simulators; what /proc says about them."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


#: How long a child may show no progress (no report line, no new login, not listening yet) before the run gives up:
#: a hang, not a slow or busy machine.
PATIENCE = 120.0


def raise_file_limit() -> None:
    """As many sockets as the hard limit allows (20,000 here); the children inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of all the process's threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the process's live children (the center's MQTT worker), 0 if none."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                total += cpu_seconds(int(child))
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Child:
    """A server or simulator, its output in ``log``.

    It stays in the runner's process group: whoever starts the runner in a group of its own (the smoke test does)
    ends every child with one ``killpg``, even if the runner itself is killed before its ``finally`` blocks run.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.log_path = log
        with open(log, "wb") as output:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(
                list(argv), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def wait_listening(port: int, child: Child, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{child.name} did not listen on {port} within {timeout:.0f}s:\n{child.tail()}")


def start_center(
    workdir: Path, port: int, extra: Sequence[str] = (), twistd: Sequence[str] = (str(VENV_BIN / "twistd"),)
) -> Child:
    """``twistd dtucenter`` on ``port``; ``twistd`` is the command that runs twistd (ack_path.py wraps it)."""
    argv = [
        *twistd, "-n", "--pidfile=", "dtucenter",
        "--dtu", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--db", f"sqlite:///{workdir / 'center.db'}",
        "--unknown-dtu", "accept",
        # No API unless a scenario asks for one (a later --api wins): the default
        # port 8080 may be taken, and a center that cannot bind a listener stops.
        "--api", "off",
        *extra,
    ]
    child = Child("center", argv, workdir / "center.log")
    wait_listening(port, child)
    return child


def start_baseline(
    workdir: Path, port: int, python: Sequence[str] = (sys.executable, "-m", "benchmarks.baseline")
) -> Child:
    """The framing-only baseline on ``port``; ``python`` is the command that runs it (ack_path.py wraps it)."""
    argv = [*python, "--port", str(port)]
    child = Child("baseline", argv, workdir / "baseline.log")
    wait_listening(port, child)
    return child


def start_sim(workdir: Path, name: str, args: Sequence[str]) -> tuple[Child, Path]:
    report = workdir / f"{name}.jsonl"
    argv = [sys.executable, "-m", "dtucenter.sim.cli", *args, "--report", str(report), "--quiet"]
    return Child(name, argv, workdir / f"{name}.log"), report


class ApiClient:
    """GET from the center's HTTP API with its bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=PATIENCE) as response:
            return json.loads(response.read())


class ReportReader:
    """Follows a simulator's JSON report file; each new line is a cumulative snapshot."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.latest: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any] | None:
        """The newest complete snapshot written since the last poll, if any."""
        if not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        newest = None
        consumed = 0
        for line in chunk.split(b"\n")[:-1]:
            consumed += len(line) + 1
            newest = json.loads(line)
        self._offset += consumed
        if newest is not None:
            self.latest = newest
        return newest

    def next(self, child: Child, timeout: float = PATIENCE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.poll()
            if snap is not None:
                return snap
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"no report from {child.name} within {timeout:.0f}s:\n{child.tail()}")
