"""The /api/accounts endpoints: accounts and their API tokens.

Admins create and remove accounts and manage every account's tokens; an
account sees itself only and manages its own tokens. Another account
answers 404, as one that does not exist. A token is in the answer that
creates it and nowhere else, ever: the database keeps only its digest.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from dtucenter.store import accounts
from dtucenter.store.facade import Store
from dtucenter.web.params import check_keys
from dtucenter.web.router import ApiError, Call, Reply, Router

T = TypeVar("T")


def _outcome(job: Callable[[Session], T]) -> Callable[[Session], T | accounts.AccountError]:
    """``job`` with its refusal returned rather than raised: a raised one would fail the write batch."""

    def run(session: Session) -> T | accounts.AccountError:
        try:
            return job(session)
        except accounts.AccountError as e:
            return e

    return run


def _raise_refusal(result: T | accounts.AccountError) -> T:
    if isinstance(result, accounts.NoSuchAccount | accounts.NoSuchToken):
        raise ApiError(404, str(result))
    if isinstance(result, accounts.AccountError):
        raise ApiError(409 if isinstance(result, accounts.AccountConflict) else 400, str(result))
    return result


class AccountApi:
    def __init__(self, store: Store, now: Callable[[], dt.datetime]) -> None:
        self.store = store
        self.now = now

    def install(self, router: Router) -> None:
        router.add("GET", "/api/accounts", self.list_accounts)
        router.add("POST", "/api/accounts", self.create_account)
        router.add("GET", "/api/accounts/{name}", self.get_account)
        router.add("DELETE", "/api/accounts/{name}", self.remove_account)
        router.add("GET", "/api/accounts/{name}/tokens", self.list_tokens)
        router.add("POST", "/api/accounts/{name}/tokens", self.create_token)
        router.add("DELETE", "/api/accounts/{name}/tokens/{token_name}", self.revoke_token)

    async def _read(self, job: Callable[[Session], T]) -> T:
        return _raise_refusal(await self.store.read(_outcome(job)))

    async def _write(self, job: Callable[[Session], T]) -> T:
        return _raise_refusal(await self.store.write(_outcome(job)))

    @staticmethod
    def _own(call: Call, name: str) -> None:
        """404 for an account other than the caller's, unless the caller is an admin."""
        if not call.caller.admin and name != call.caller.account:
            raise ApiError(404, f"no account {name!r}")

    async def list_accounts(self, call: Call) -> Any:
        call.query(())
        only = None if call.caller.admin else call.caller.account
        found = await self._read(partial(accounts.list_accounts, only=only))
        return {"accounts": [a.to_json() for a in found]}

    async def create_account(self, call: Call) -> Any:
        call.query(())
        call.require_admin()
        body = call.json_object()
        check_keys(body, "the body", {"name"}, frozenset({"admin"}))
        admin = body.get("admin", False)
        if not isinstance(admin, bool):
            raise ApiError(400, f"admin must be true or false, got {admin!r}")
        info = await self._write(partial(accounts.create_account, name=body["name"], admin=admin, now=self.now()))
        return Reply(info.to_json(), 201)

    async def get_account(self, call: Call, name: str) -> Any:
        call.query(())
        self._own(call, name)
        return (await self._read(partial(accounts.get_account, name=name))).to_json()

    async def remove_account(self, call: Call, name: str) -> Any:
        call.query(())
        self._own(call, name)
        call.require_admin()
        await self._write(partial(accounts.remove_account, name=name))
        return {"deleted": name}

    async def list_tokens(self, call: Call, name: str) -> Any:
        call.query(())
        self._own(call, name)
        found = await self._read(partial(accounts.list_tokens, account=name))
        return {"tokens": [t.to_json() for t in found]}

    async def create_token(self, call: Call, name: str) -> Any:
        call.query(())
        self._own(call, name)
        body = call.json_object()
        check_keys(body, "the body", {"name"})
        token = await self._write(partial(accounts.create_token, account=name, name=body["name"], now=self.now()))
        return Reply({"account": name, "name": body["name"], "token": token}, 201)

    async def revoke_token(self, call: Call, name: str, token_name: str) -> Any:
        call.query(())
        self._own(call, name)
        await self._write(partial(accounts.revoke_token, account=name, name=token_name))
        return {"revoked": token_name, "account": name}
