"""Bearer auth: reads need ``read`` (or nothing, with ADAPTR_API_OPEN_READS=1), writes ``write``,
removals ``admin``. Tokens are checked against their stored hash on every request."""

from __future__ import annotations

from typing import Any

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adaptr.services import tokens
from adaptr.settings import get_settings

_bearer = HTTPBearer(auto_error=False, description="An API token from `adaptr token create`.")


def require(scope: str) -> Any:
    def check(creds: HTTPAuthorizationCredentials | None = Security(_bearer)) -> dict[str, Any] | None:
        if scope == "read" and get_settings().api_open_reads:
            return None
        tok = tokens.authenticate(creds.credentials if creds else None)
        if not tokens.allows(tok["scope"], scope):
            raise tokens.ForbiddenError(
                f"this needs a token with scope {scope}; this one has {tok['scope']}",
                hint=f"create one with `adaptr token create --scope {scope}`",
            )
        return tok

    return check
