"""One error body for every failure: ``{"error": {"code", "message", "hint", "field"}}``.

``AdaptrError`` carries its own status and code; FastAPI's request validation becomes a 422
naming the exact field; unknown routes 404; anything else a 500 whose details stay in the log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptr.errors import AdaptrError

log = logging.getLogger("adaptr.api")


class ErrorDetail(BaseModel):
    code: str
    message: str
    hint: str | None = None
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class TooLargeError(AdaptrError):
    """An upload over the server's size limit."""

    status = 413
    code = "too_large"


class PathRefusedError(AdaptrError):
    """A path outside what the server may read or write (import roots, an artifact's folder)."""

    status = 403
    code = "path_refused"


def body(code: str, message: str, hint: str | None = None, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint, "field": field}}


def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or str(loc[0] if loc else "input")


def install(app: FastAPI) -> None:
    @app.exception_handler(AdaptrError)
    async def adaptr_error(_: Request, e: AdaptrError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(body(e.code, e.message, e.hint), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = _field(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return JSONResponse(body("invalid_input", f"{where}: {msg}{more}", field=where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            e.status_code, "http_error"
        )
        return JSONResponse(body(code, str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(body("internal", "internal error; see the server log"), status_code=500)


ERRORS = {
    s: {"model": ErrorBody, "description": d}
    for s, d in {
        401: "No token, or an unknown, revoked or expired one",
        403: "The token's scope does not allow this, or a path is refused",
        404: "Unknown name, version, file or job",
        409: "Name taken, or a conflict with the catalog's state",
        422: "Invalid parameters; the message names the field",
    }.items()
}
