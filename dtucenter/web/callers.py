"""Who a request is: the configured token, an account token looked up by its digest, or a console session."""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Callable
from functools import partial

from sqlalchemy.orm import Session

from dtucenter.store import accounts, console_sessions
from dtucenter.store.console_sessions import OpenedSession, SessionInfo
from dtucenter.store.facade import Store
from dtucenter.web.auth import CONFIGURED_TOKEN_NAME, Caller


class Authenticator:
    """Finds the Caller of a request from its bearer token, or from the console session its cookie names.

    The configured token (``resolve_token``) is compared in constant time
    in memory and acts for the first admin account, so an installation that
    had only it keeps working; any other token is looked up by its SHA-256
    digest in the database (``store.accounts``), never by scanning. A console
    session keeps only its token's digest and is looked up the same way on
    every request, so it ends the moment its token is revoked (or the
    configured token changes).
    """

    def __init__(self, configured: str, store: Store, now: Callable[[], dt.datetime]) -> None:
        self._configured = configured.encode("ascii")
        self._now = now
        self._configured_digest = accounts.digest_of(configured)
        self._store = store

    async def caller(self, header: bytes | None) -> Caller | None:
        given = _bearer(header)
        if given is None:
            return None
        try:
            text = given.decode("ascii")
        except UnicodeDecodeError:
            return None
        return await self._store.read(partial(self._owner, digest=accounts.digest_of(text)))

    def _owner(self, session: Session, digest: str) -> Caller | None:
        if hmac.compare_digest(digest, self._configured_digest):
            owner = accounts.first_admin_owner(session, token_name=CONFIGURED_TOKEN_NAME)
        else:
            found = accounts.token_owner_by_digest(session, digest)
            if found is None:
                return None
            owner = found
        return Caller(owner.account, owner.account_id, owner.token_name, owner.admin)

    async def open_session(self, header: bytes | None, lifetime: dt.timedelta) -> OpenedSession:
        """A console session for the bearer token of a request already authenticated with it."""
        given = _bearer(header)
        assert given is not None, "only a request that authenticated with a bearer token opens a session"
        digest = accounts.digest_of(given.decode("ascii"))
        return await self._store.write(
            partial(console_sessions.open_session, token_digest=digest, now=self._now(), lifetime=lifetime)
        )

    async def session_caller(self, secret: str) -> tuple[Caller, SessionInfo] | None:
        """The caller of the unexpired session whose cookie holds ``secret``, if its token still works."""

        now = self._now()

        def job(session: Session) -> tuple[Caller, SessionInfo] | None:
            found = console_sessions.find_session(session, secret, now)
            if found is None:
                return None
            caller = self._owner(session, found.token_digest)
            return None if caller is None else (caller, found)

        return await self._store.read(job)

    async def end_session(self, session_id: str) -> bool:
        return await self._store.write(partial(console_sessions.end_session, session_id=session_id))


def _bearer(header: bytes | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return None
    return given.strip()
