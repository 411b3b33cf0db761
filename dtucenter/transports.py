"""What every protocol of the center does with its transport: reach it once connected, close it at once."""

from __future__ import annotations

from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import BaseProtocol


def connected_transport(protocol: BaseProtocol) -> ITransport:
    """The transport of a protocol that is connected (before makeConnection it is None)."""
    assert protocol.transport is not None, f"{protocol!r} is not connected yet"
    return protocol.transport


def close_transport(transport: ITransport) -> None:
    """Close at once: a peer that went silent or dialled again would not acknowledge a FIN."""
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()  # serial ports have no abort
