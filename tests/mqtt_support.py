"""Real peers for the MQTT tests: a Mosquitto broker of the test's own, and a subscriber that keeps every message."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import STEP_TIMEOUT, end_process_group, start_process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@attrs.frozen
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_test_ca(directory: Path) -> TlsFiles:
    """A CA of the test's own and a server certificate it signed for localhost and 127.0.0.1."""
    import ipaddress

    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
                    ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    authority = certificate("test CA", ca_key, "test CA", ca_key, True)
    files.ca.write_bytes(authority.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(
        certificate("localhost", server_key, "test CA", ca_key, False).public_bytes(serialization.Encoding.PEM)
    )
    files.key.write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ))
    return files


class Mosquitto:
    """Debian's mosquitto on a free loopback port with a config file of its own, persistent across restarts
    (so that a subscriber's session and its queued messages outlive a restart, as in production)."""

    def __init__(self, directory: Path, tls: TlsFiles | None = None, users: dict[str, str] | None = None) -> None:
        """``users``: names and passwords the broker requires (else it takes anonymous clients)."""
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.config = directory / "mosquitto.conf"
        self.users = dict(users or {})
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            "persistence true",
            f"persistence_location {directory}/",
            "max_queued_messages 100000",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to the mosquitto user, who cannot write the test's directory
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        if users:
            passwords = directory / "passwords"
            passwords.write_text("".join(f"{name}:{password}\n" for name, password in users.items()))
            subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)  # hashes them in place
            lines.append(f"password_file {passwords}")
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def start(self) -> None:
        assert self.process is None
        with (self.directory / "mosquitto.log").open("ab") as log:
            self.process = start_process(
                ["mosquitto", "-c", str(self.config)], cwd=self.directory, stdout=log, stderr=log
            )
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mosquitto did not start:\n{self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            end_process_group(self.process)
            self.process = None

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@attrs.frozen
class Received:
    topic: str
    body: Any  # the JSON payload
    retained: bool


class Subscriber:
    """A paho client subscribed to everything (QoS 1, a persistent session) that keeps what it hears, in order."""

    def __init__(self, broker: Mosquitto, client_id: str = "checker", persistent: bool = True) -> None:
        """With the broker's first user, if it has users."""
        self.messages: list[Received] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id, clean_session=not persistent)
        if broker.tls is not None:
            client.tls_set(ca_certs=str(broker.tls.ca), cert_reqs=ssl.CERT_REQUIRED)
        for name, password in list(broker.users.items())[:1]:
            client.username_pw_set(name, password)
        client.on_connect = lambda c, u, f, reason, p: c.subscribe("#", 1)
        client.on_subscribe = lambda c, u, mid, reasons, p: self.subscribed.set()
        client.on_message = self._heard
        client.reconnect_delay_set(0.05, 0.5)
        client.connect_async("localhost" if broker.tls else "127.0.0.1", broker.port)
        client.loop_start()
        self._client = client
        assert self.subscribed.wait(STEP_TIMEOUT), "the subscriber could not subscribe"

    def _heard(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        received = Received(message.topic, json.loads(message.payload), bool(message.retain))
        with self._lock:
            self.messages.append(received)

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def on(self, topic: str) -> list[Any]:
        """The bodies heard on ``topic``, in order."""
        return [m.body for m in self.all() if m.topic == topic]

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
