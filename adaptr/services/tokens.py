"""REST API tokens: created with a scope and an optional expiry, stored as a hash, revocable.

A token reads ``adaptr_<id>_<secret>``; the catalog keeps ``id`` and the SHA-256 of the whole
token, never the token itself, so it is shown once, when created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import col, select

from adaptr.catalog.db import session_scope
from adaptr.catalog.models import ApiToken
from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError

SCOPES = ("read", "write", "admin")  # each includes the ones before it
_TOKEN_RE = re.compile(r"^adaptr_([0-9a-f]{12})_([A-Za-z0-9_\-]{20,100})$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UnauthorizedError(AdaptrError):
    """No token, or one that is unknown, revoked or expired."""

    status = 401
    code = "unauthorized"


class ForbiddenError(AdaptrError):
    """A valid token whose scope does not allow the request."""

    status = 403
    code = "forbidden"


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``: a positive duration."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text or "")
    if not m or int(m.group(1)) == 0:
        raise InvalidInputError(f"--expires {text!r}: give a positive duration such as 30d, 12h or 90m")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)


def _view(t: ApiToken) -> dict[str, Any]:
    now = datetime.now(UTC)
    expires, revoked = _utc(t.expires_at), _utc(t.revoked_at)
    state = "revoked" if revoked else "expired" if expires and expires <= now else "active"
    return {
        "id": t.token_id,
        "scope": t.scope,
        "name": t.name,
        "state": state,
        "created_at": _utc(t.created_at).isoformat(),
        "expires_at": expires.isoformat() if expires else None,
        "revoked_at": revoked.isoformat() if revoked else None,
    }


def create(scope: str, *, expires: timedelta | None = None, name: str | None = None) -> dict[str, Any]:
    """A new token; its secret is in ``token`` here and nowhere else, ever."""
    if scope not in SCOPES:
        raise InvalidInputError(f"--scope {scope!r}: use read, write or admin")
    token_id = secrets.token_hex(6)
    token = f"adaptr_{token_id}_{secrets.token_urlsafe(32)}"
    row = ApiToken(
        token_id=token_id,
        secret_hash=_hash(token),
        scope=scope,
        name=name,
        expires_at=datetime.now(UTC) + expires if expires else None,
    )
    with session_scope() as s:
        s.add(row)
        s.commit()
        return {**_view(row), "token": token}


def ls() -> list[dict[str, Any]]:
    with session_scope() as s:
        return [_view(t) for t in s.exec(select(ApiToken).order_by(col(ApiToken.id)))]


def revoke(token_id: str) -> dict[str, Any]:
    with session_scope() as s:
        t = s.exec(select(ApiToken).where(ApiToken.token_id == token_id)).first()
        if t is None:
            raise NotFoundError(f"token {token_id!r} does not exist; see `adaptr token ls`")
        if t.revoked_at is None:
            t.revoked_at = datetime.now(UTC)
            s.add(t)
            s.commit()
        return _view(t)


def authenticate(token: str | None) -> dict[str, Any]:
    """The token's row (as ``ls`` shows it) when it is known, active and unexpired."""
    if not token:
        raise UnauthorizedError(
            "this endpoint needs a token",
            hint="send `Authorization: Bearer TOKEN`; see `adaptr token create`",
        )
    m = _TOKEN_RE.match(token)
    if m is None:
        raise UnauthorizedError("the bearer token is malformed", hint="create one with `adaptr token create`")
    with session_scope() as s:
        t = s.exec(select(ApiToken).where(ApiToken.token_id == m.group(1))).first()
    if t is None or not hmac.compare_digest(t.secret_hash, _hash(token)):
        raise UnauthorizedError("the bearer token is not known", hint="create one with `adaptr token create`")
    view = _view(t)
    if view["state"] != "active":
        raise UnauthorizedError(f"the bearer token is {view['state']}", hint="create a new one")
    return view


def allows(scope: str, needed: str) -> bool:
    return SCOPES.index(scope) >= SCOPES.index(needed)
