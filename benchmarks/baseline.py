"""The framing-only baseline: the same Twisted stack and codec as the center, no storage.

It parses frames, checks them, accepts every Login and acknowledges every
SendTest and SendTick at once. What the center does beyond this (auth,
sessions, the store, durable commits) is what the ratio center/baseline
prices.

    python -m benchmarks.baseline --port 21500
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Sequence

from twisted.internet import protocol
from twisted.internet.interfaces import IAddress

from dtucenter.dtu import wire
from dtucenter.dtu.session import write_now

_LOGIN_ACK = wire.encode_frame(wire.LoginAck(wire.LOGIN_ACCEPTED))
_TICK_ACK = wire.encode_frame(wire.SendTickAck())
_TEST_ACKS = wire.send_test_ack_frames()  # as the center encodes them: once


class BaselineProtocol(protocol.Protocol):
    def connectionMade(self) -> None:
        self.parser = wire.FrameParser()

    def dataReceived(self, data: bytes) -> None:
        replies = []
        for event in self.parser.feed(data):
            if isinstance(event, wire.SendTest):
                replies.append(_TEST_ACKS[event.test_code])
            elif isinstance(event, wire.SendTick):
                replies.append(_TICK_ACK)
            elif isinstance(event, wire.Login):
                replies.append(_LOGIN_ACK)
        if replies:
            write_now(self.transport, b"".join(replies))  # the center's way of sending


class BaselineFactory(protocol.Factory):
    def buildProtocol(self, addr: IAddress) -> BaselineProtocol:
        return BaselineProtocol()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.baseline")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    from twisted.internet import reactor

    reactor.listenTCP(args.port, BaselineFactory(), backlog=4096, interface=args.interface)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
