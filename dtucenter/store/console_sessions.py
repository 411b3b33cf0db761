"""Console sessions: a browser signed in with an API token, as plain functions of a Session (like ``accounts``).

The browser holds a random secret in an HttpOnly cookie; the table keeps
only its SHA-256 (``ConsoleSession.id``), so a copy of the database opens no
session. A session is as good as the token it was opened with: the caller
looks the token up again by ``token_digest`` on every request.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

import attrs
from sqlalchemy import delete
from sqlalchemy.orm import Session

from dtucenter.store.accounts import digest_of
from dtucenter.store.models import ConsoleSession


@attrs.frozen
class OpenedSession:
    """What the browser gets once: the cookie's secret and the CSRF token, and when both expire."""

    secret: str
    csrf: str
    expires: dt.datetime


@attrs.frozen
class SessionInfo:
    """A live session as a request finds it."""

    id: str
    token_digest: str
    csrf: str
    expires: dt.datetime


def open_session(session: Session, token_digest: str, now: dt.datetime, lifetime: dt.timedelta) -> OpenedSession:
    """A new session for the token with ``token_digest``; expired sessions are swept out on the way."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires <= now))
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    expires = now + lifetime
    session.add(ConsoleSession(id=digest_of(secret), token_digest=token_digest, csrf=csrf, created=now,
                               expires=expires))
    session.flush()
    return OpenedSession(secret, csrf, expires)


def find_session(session: Session, secret: str, now: dt.datetime) -> SessionInfo | None:
    """The unexpired session whose cookie holds ``secret``; None otherwise."""
    digest = digest_of(secret)
    row = session.get(ConsoleSession, digest)
    if row is None or not hmac.compare_digest(row.id, digest) or row.expires <= now:
        return None
    return SessionInfo(row.id, row.token_digest, row.csrf, row.expires)


def end_session(session: Session, session_id: str) -> bool:
    """Sign-out: the session's row goes; True if there was one."""
    row = session.get(ConsoleSession, session_id)
    if row is None:
        return False
    session.delete(row)
    return True

