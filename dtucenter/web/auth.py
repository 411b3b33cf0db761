"""The API's bearer tokens: where the configured one comes from, and the record of who calls (``Caller``)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import attrs
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from twisted.logger import Logger

log = Logger()

TOKEN_FILE_NAME = "dtucenter.token"
ENVIRONMENT_VARIABLE = "DTUCENTER_API_TOKEN"


class TokenFileError(Exception):
    """The token file cannot be read or written; the message is for the operator."""


def token_file_for(db_url: str, working_directory: Path | None = None) -> Path:
    """Beside the SQLite database file; in the working directory for other databases."""
    here = working_directory or Path.cwd()
    try:
        url = make_url(db_url)
    except ArgumentError:
        return here / TOKEN_FILE_NAME
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return (here / url.database).resolve().parent / TOKEN_FILE_NAME
    return here / TOKEN_FILE_NAME


def load_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one written there (mode 0600) if there is none."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"cannot read the API token file {path}: {e}") from None
    if token:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warn("API token file {path} is readable by others; chmod 600 it", path=str(path))
        log.info("API token: using the one in {path}", path=str(path))
        return token
    token = secrets.token_urlsafe(32)
    try:
        # Created 0600 from the start: there is no moment when others could read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
    except OSError as e:
        raise TokenFileError(f"cannot write the API token file {path}: {e.strerror}") from None
    log.info("API token: created a new one in {path}", path=str(path))
    return token


def resolve_token(configured: str | None, db_url: str) -> str:
    """The configured token (--api-token, $DTUCENTER_API_TOKEN or api_token), else the token file's."""
    if configured is not None:
        log.info("API token: the configured one")
        return configured
    return load_or_create_token(token_file_for(db_url))




# -- who is calling ------------------------------------------------------------------------------

#: The configured token's name in the audit trails: it acts for the first admin account.
CONFIGURED_TOKEN_NAME = "api-token"


@attrs.frozen
class Caller:
    """Who makes an API request: the token's account and name, and whether the account is an admin.

    Handlers scope what they read and change by ``scope`` (None for an admin:
    everything) and write ``who`` in the audit trails.
    """

    account: str
    account_id: int
    token_name: str
    admin: bool

    @property
    def who(self) -> str:
        """For the audit trails: ``account/token``, as token names are unique only per account."""
        return f"{self.account}/{self.token_name}"

    @property
    def scope(self) -> int | None:
        """The account id to restrict queries to; None for an admin, who sees every account's."""
        return None if self.admin else self.account_id
