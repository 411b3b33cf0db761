"""The API's bearer token: where it comes from, and checking it."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

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


def bearer_matches(header: bytes | None, token: str) -> bool:
    """Whether an Authorization header carries ``token``, compared in constant time."""
    if header is None:
        return False
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token.encode("ascii"))
