"""Accounts and their API tokens, as plain synchronous functions of a Session (like ``queries``).

A token is 256 random bits shown once at creation; only its SHA-256 is
stored, in a unique (indexed) column, so a request's token is found by
hashing it and looking the digest up, never by scanning or comparing
secrets. A fast hash is right here: the secret is random, not a password,
so there is nothing for a slow hash to protect against guessing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets

import attrs
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dtucenter.store.models import Account, ApiToken, ConsoleSession, Dtu, Meter, MeterTemplate

#: The account the schema migration makes and gives every existing DTU and meter.
FIRST_ADMIN = "admin"
#: Account and token names: short, printable, usable in a URL path segment as they are.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why, in one line."""


class NoSuchAccount(AccountError):
    pass


class AccountConflict(AccountError):
    """The request clashes with what is stored: a name taken, an account still in use."""


class NoSuchToken(AccountError):
    pass


@attrs.frozen
class AccountInfo:
    name: str
    admin: bool
    created: dt.datetime | None
    dtus: int
    meters: int
    tokens: int

    def to_json(self) -> dict[str, object]:
        body = attrs.asdict(self)
        body["created"] = self.created.isoformat() if self.created else None
        return body


@attrs.frozen
class TokenInfo:
    account: str
    name: str
    created: dt.datetime | None

    def to_json(self) -> dict[str, object]:
        return {"account": self.account, "name": self.name,
                "created": self.created.isoformat() if self.created else None}


@attrs.frozen
class TokenOwner:
    """Whose a presented token is: what the API needs to scope and audit a request."""

    account: str
    account_id: int
    token_name: str
    admin: bool


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise AccountError(f"{what} must be 1-100 letters, digits, '.', '_' or '-' (not first), got {name!r}")
    return name


def _account_row(session: Session, name: str) -> Account:
    row = session.scalar(select(Account).where(Account.name == name))
    if row is None:
        raise NoSuchAccount(f"no account {name!r}")
    return row


def account_id(session: Session, name: str) -> int:
    """The id of account ``name``; NoSuchAccount when there is none."""
    return _account_row(session, name).id


def first_admin_id(session: Session) -> int:
    """The oldest admin account: owner of enrolled DTUs and of the config file's meters.

    The schema migration makes one (``FIRST_ADMIN``); should it have been
    removed, another admin takes its place, and failing any, it is remade.
    """
    found = session.scalar(select(Account.id).where(Account.admin.is_(True)).order_by(Account.id).limit(1))
    if found is not None:
        return found
    row = Account(name=FIRST_ADMIN, admin=True, created=dt.datetime.now(dt.UTC))
    session.add(row)
    session.flush()
    return row.id


def account_name(session: Session, account: int) -> str:
    return session.get_one(Account, account).name


def first_admin_name(session: Session) -> str:
    return session.get_one(Account, first_admin_id(session)).name


def create_account(session: Session, name: str, admin: bool, now: dt.datetime) -> AccountInfo:
    check_name(name, "an account name")
    if session.scalar(select(Account.id).where(Account.name == name)) is not None:
        raise AccountConflict(f"account {name!r} exists")
    session.add(Account(name=name, admin=admin, created=now))
    session.flush()
    return get_account(session, name)


def _count(session: Session, model: type[Dtu | Meter | ApiToken | MeterTemplate], owner: int) -> int:
    return session.scalar(select(func.count()).select_from(model).where(model.account_id == owner)) or 0


def get_account(session: Session, name: str) -> AccountInfo:
    row = _account_row(session, name)
    return AccountInfo(row.name, row.admin, row.created, _count(session, Dtu, row.id), _count(session, Meter, row.id),
                       _count(session, ApiToken, row.id))


def list_accounts(session: Session, only: str | None = None) -> list[AccountInfo]:
    """All accounts by name, or just ``only``."""
    query = select(Account.name).order_by(Account.name)
    if only is not None:
        query = query.where(Account.name == only)
    return [get_account(session, name) for name in session.scalars(query)]


def remove_account(session: Session, name: str) -> None:
    """Only an account that owns nothing, and never the last admin: devices are not orphaned by a typo."""
    row = _account_row(session, name)
    owned = _count(session, Dtu, row.id) + _count(session, Meter, row.id)
    if owned:
        raise AccountConflict(f"account {name!r} still owns {owned} DTUs and meters: move or delete them first")
    # Refused rather than deleted with it: a running center holds templates by account id,
    # which the next account made may be given again.
    templates = _count(session, MeterTemplate, row.id)
    if templates:
        raise AccountConflict(f"account {name!r} still owns {templates} meter templates: delete them first")
    admins = session.scalar(select(func.count()).select_from(Account).where(Account.admin.is_(True))) or 0
    if row.admin and admins <= 1:
        raise AccountConflict(f"account {name!r} is the last admin account")
    digests = select(ApiToken.digest).where(ApiToken.account_id == row.id).scalar_subquery()
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_digest.in_(digests)))
    session.execute(delete(ApiToken).where(ApiToken.account_id == row.id))
    session.delete(row)


def create_token(session: Session, account: str, name: str, now: dt.datetime) -> str:
    """A new token for ``account``, returned once: only its digest is kept."""
    check_name(name, "a token name")
    owner = _account_row(session, account)
    taken = select(ApiToken.id).where(ApiToken.account_id == owner.id, ApiToken.name == name)
    if session.scalar(taken) is not None:
        raise AccountConflict(f"account {account!r} already has a token named {name!r}")
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(account_id=owner.id, name=name, digest=digest_of(token), created=now))
    session.flush()
    return token


def list_tokens(session: Session, account: str) -> list[TokenInfo]:
    owner = _account_row(session, account)
    rows = session.scalars(select(ApiToken).where(ApiToken.account_id == owner.id).order_by(ApiToken.name))
    return [TokenInfo(owner.name, row.name, row.created) for row in rows]


def revoke_token(session: Session, account: str, name: str) -> None:
    owner = _account_row(session, account)
    row = session.scalar(select(ApiToken).where(ApiToken.account_id == owner.id, ApiToken.name == name))
    if row is None:
        raise NoSuchToken(f"account {account!r} has no token named {name!r}")
    # Its console sessions would find no owner from now on anyway; their rows go with it.
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_digest == row.digest))
    session.delete(row)


def token_owner(session: Session, token: str) -> TokenOwner | None:
    """Whose ``token`` is, found by its digest's index; None for a token nobody has."""
    return token_owner_by_digest(session, digest_of(token))


def token_owner_by_digest(session: Session, digest: str) -> TokenOwner | None:
    """Whose the token with this digest is (a console session keeps only the digest); None if revoked."""
    row = session.execute(
        select(ApiToken.digest, ApiToken.name, Account.id, Account.name, Account.admin)
        .join(Account, Account.id == ApiToken.account_id)
        .where(ApiToken.digest == digest)
    ).first()
    # The index found it by equality; compared again in constant time all the same, as is the habit.
    if row is None or not hmac.compare_digest(row[0], digest):
        return None
    return TokenOwner(account=row[3], account_id=row[2], token_name=row[1], admin=row[4])


def first_admin_owner(session: Session, token_name: str) -> TokenOwner:
    """The first admin account, as the owner of the configured (pre-accounts) token."""
    row = session.get_one(Account, first_admin_id(session))
    return TokenOwner(account=row.name, account_id=row.id, token_name=token_name, admin=True)
