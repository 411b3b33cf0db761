"""A Python prompt inside the running center, over SSH (Twisted's manhole).

Only public-key logins are accepted, from an authorized_keys file that is
read at every login (edit it without restarting). The host key is created
on first use and kept, so clients can pin it. It listens on loopback unless
its endpoint names another interface (:func:`loopback_unless_named`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.manhole_tap import chainedProtocolFactory
from twisted.conch.ssh import keys, transport
from twisted.cred import portal
from twisted.logger import Logger
from zope.interface import implementer

from dtucenter import listeners

log = Logger()


class ManholeError(Exception):
    """The manhole cannot start; the message is for the operator."""


def loopback_unless_named(endpoint: str) -> str:
    """The manhole's endpoint, on loopback unless it names an interface (``listeners.loopback_unless_named``).

    A Python prompt inside the center is everything the center can do.
    """
    return listeners.loopback_unless_named(
        endpoint, log, "The manhole",
        "anyone who can reach it may try to log in; prefer an SSH tunnel to a loopback manhole",
    )


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Every user name maps to the keys in one authorized_keys file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> Iterator[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                yield from readAuthorizedKeyFile(f)
        except OSError as e:
            log.warn("Manhole login refused: cannot read {path}: {error}", path=self.path, error=e.strerror)


def host_key(path: Path) -> keys.Key:
    """The SSH host key kept at ``path``, created (mode 0600) on first use."""
    if path.exists():
        try:
            key: keys.Key = keys.Key.fromFile(str(path))
            return key
        except (keys.BadKeyError, OSError, ValueError) as e:
            raise ManholeError(f"manhole host key {path}: cannot read it: {e}") from None
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.toString("openssh"))
    except OSError as e:
        raise ManholeError(f"manhole host key {path}: cannot create it: {e.strerror}") from None
    log.info("Created the manhole's SSH host key at {path}", path=path)
    return key


@implementer(portal.IRealm)
class ManholeRealm(manhole_ssh.TerminalRealm):
    """Twisted's terminal realm, declared as the IRealm it is, with a Python prompt on ``namespace``."""

    def __init__(self, namespace: dict[str, object]) -> None:
        super().__init__()
        # Twisted's annotation comes from its default (the ServerProtocol class); what it calls is any
        # factory of a ServerProtocol, and its own manhole_tap assigns this one the same way.
        self.chainedProtocolFactory = chainedProtocolFactory(namespace)  # type: ignore[assignment]


class ManholeTransport(transport.SSHServerTransport):
    """Twisted's SSH server transport, but an ordinary logout is not an error.

    ``SSHTransportBase.receiveError`` logs every DISCONNECT a client sends at error level,
    OpenSSH's "disconnected by user" at the end of each session too: an operator's log would
    show an error for every manhole visit.
    """

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            log.info("Manhole client logged out: {description}", description=description.decode("utf-8", "replace"))
            return
        super().receiveError(reasonCode, description)


def manhole_factory(
    namespace: dict[str, object], authorized_keys: Path, host_key_path: Path
) -> manhole_ssh.ConchFactory:
    if not authorized_keys.is_file():
        raise ManholeError(f"manhole: authorized keys file {authorized_keys} does not exist")
    checker = SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys))
    factory = manhole_ssh.ConchFactory(portal.Portal(ManholeRealm(namespace), [checker]))
    factory.protocol = ManholeTransport
    key = host_key(host_key_path)
    # Per instance: ConchFactory's class attributes would be shared by every factory.
    factory.publicKeys = {key.sshType(): key.public()}
    # ConchFactory annotates the values as bytes, but SSHFactory uses them as Key objects
    # (it asks each for supportedSignatureAlgorithms), as SSHFactory.getPrivateKeys documents.
    factory.privateKeys = {key.sshType(): key}  # type: ignore[dict-item]
    return factory

