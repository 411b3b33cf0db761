"""Who a request's bearer token is: the configured token, or an account token looked up by its digest."""

from __future__ import annotations

import hmac
from functools import partial

from dtucenter.store import accounts
from dtucenter.store.facade import Store
from dtucenter.web.auth import CONFIGURED_TOKEN_NAME, Caller


class Authenticator:
    """Finds the Caller of a request from its bearer token.

    The configured token (``resolve_token``) is compared in constant time
    in memory and acts for the first admin account, so an installation that
    had only it keeps working; any other token is looked up by its SHA-256
    digest in the database (``store.accounts``), never by scanning.
    """

    def __init__(self, configured: str, store: Store) -> None:
        self._configured = configured.encode("ascii")
        self._store = store

    async def caller(self, header: bytes | None) -> Caller | None:
        given = _bearer(header)
        if given is None:
            return None
        if hmac.compare_digest(given, self._configured):
            owner = await self._store.read(partial(accounts.first_admin_owner, token_name=CONFIGURED_TOKEN_NAME))
        else:
            try:
                text = given.decode("ascii")
            except UnicodeDecodeError:
                return None
            found = await self._store.read(partial(accounts.token_owner, token=text))
            if found is None:
                return None
            owner = found
        return Caller(owner.account, owner.account_id, owner.token_name, owner.admin)


def _bearer(header: bytes | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return None
    return given.strip()
