"""How the center writes a peer's address in logs and API answers."""

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
