"""How the center writes a peer's address in logs and API answers, and reads an IPv4 address."""

from __future__ import annotations

from typing import Any


def describe_peer(address: Any) -> str:
    """``host:port`` from an IAddress or a (host, port) tuple; IPv6 hosts in brackets."""
    if address is None:
        return "?"
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None and isinstance(address, tuple):
        host, port = address[0], address[1]
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ipv4_octets(text: str) -> bytes:
    """The four octets of a dotted IPv4 address; ValueError unless it is one.

    Shared by the DTU wire format (LoginAck's NewIP) and the store's check of
    what an operator gives as ``new_ip``, so both accept exactly the same text.
    """
    parts = text.split(".")
    try:
        octets = bytes(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {text!r}") from None
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {text!r}")
    return octets
