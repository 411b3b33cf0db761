"""An API call about a DTU another node of the cluster holds, passed on to that node's API.

The call goes as it came (method, path, body, and the caller's own bearer
token, which every node checks against the shared database), so the node
holding the DTU runs the command as if it had been asked itself: the same
timeouts, the same audit trail, the same error codes, and its answer comes
back as it is. A call already passed on is marked and is never passed on
again: a DTU that moved meanwhile is answered for where it is asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from io import BytesIO
from typing import Any

from sqlalchemy.orm import Session
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from dtucenter.isotime import utc_now
from dtucenter.store import nodes
from dtucenter.store.facade import Store
from dtucenter.store.nodes import NodeInfo
from dtucenter.web.router import ApiError, Call, Reply

#: Seconds to wait for a connection to another node.
CONNECT_TIMEOUT = 5

#: The header marking a call one node passed on to another; its value names the node that did.
FORWARDED_BY = b"X-Dtucenter-Forwarded-By"


class PeerUnreachable(Exception):
    """The node holding the DTU did not answer."""


class Peers:
    """Finds the node holding a DTU, and passes calls on to it over kept-alive connections."""

    def __init__(self, reactor: Any, node: str, store: Store) -> None:
        self.node = node
        self._store = store
        self._clock: IReactorTime = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent(reactor, pool=pool, connectTimeout=CONNECT_TIMEOUT)

    def holder(self, call: Call, psn: int) -> Deferred[NodeInfo | None]:
        """The live node DTU ``psn`` is online on, when that is another node and ``call`` may be passed on."""
        return self._elsewhere(call, partial(nodes.holder, psn=psn))

    def link_holder(self, call: Call, link: str) -> Deferred[NodeInfo | None]:
        """The live node running dialled ``link``, when that is another node and ``call`` may be passed on."""
        return self._elsewhere(call, partial(nodes.link_holder, link=link))

    def _elsewhere(self, call: Call, lookup: Callable[..., NodeInfo | None]) -> Deferred[NodeInfo | None]:
        if call.request.getHeader(FORWARDED_BY) is not None:
            return succeed(None)
        now = utc_now(self._clock)

        def elsewhere(session: Session) -> NodeInfo | None:
            found = lookup(session, now=now)
            return None if found is None or found.id == self.node else found

        return self._store.read(elsewhere)

    async def forward(self, call: Call, holder: NodeInfo, wait: float) -> Reply:
        """The other node's answer to ``call``, as it gave it (an error as an ApiError of its status);
        PeerUnreachable when it gave none within ``wait`` seconds."""
        if holder.url is None:
            raise PeerUnreachable(f"node {holder.id} holds the DTU but has no API to take the call")
        request = call.request
        content = request.content
        assert content is not None  # from the headers until the request is finished
        content.seek(0)
        headers = Headers({b"Content-Type": [b"application/json"], FORWARDED_BY: [self.node.encode("ascii")]})
        authorization = request.getHeader(b"Authorization")
        if authorization is not None:
            headers.setRawHeaders(b"Authorization", [authorization])
        url = holder.url.encode("ascii") + request.uri
        try:
            sent = self._agent.request(request.method, url, headers, FileBodyProducer(BytesIO(content.read())))
            sent.addTimeout(wait, self._clock)
            response: IResponse = await sent
            read = readBody(response)
            read.addTimeout(wait, self._clock)
            data = await read
            answer = json.loads(data)
        except Exception as e:
            raise PeerUnreachable(
                f"node {holder.id} holds the DTU but did not answer at {holder.url}: {e or type(e).__name__}"
            ) from None
        if response.code >= 400 and isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise ApiError(response.code, answer["error"])
        return Reply(answer, response.code)
